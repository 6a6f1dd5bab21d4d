"""Any timm model as `timm/<name>`, wrapped to our contract.

The wrapped timm module lives in `.model` (so its state-dict keys are timm's with a `model.` prefix).
`forward_features`, `forward_head(pre_logits)`, `reset_classifier` delegate to timm; `input_spec`
comes from timm's pretrained config (mean/std) and the requested size/channels. `model_kwargs`
records what rebuilds the same module from a checkpoint.
"""

from __future__ import annotations

from torch import nn

from imgarena.errors import UserError, closest_matches
from imgarena.models._base import ClassifierMixin


class TimmModel(ClassifierMixin, nn.Module):
    """A timm model behind the shared contract."""

    def __init__(self, model: nn.Module, img_size: int | None, in_chans: int):
        super().__init__()
        self.model = model
        self.in_chans = in_chans
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self._mean = tuple(cfg.get("mean", ())) or None
        self._std = tuple(cfg.get("std", ())) or None
        self.img_size = img_size or (cfg.get("input_size") or (3, 224, 224))[-1]

    # timm keeps these on the model; expose them under our names.
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def head(self) -> nn.Module:
        return self.model.get_classifier()

    @property
    def input_spec(self) -> dict:
        spec = ClassifierMixin.input_spec.fget(self)
        if self._mean and self._std and self.in_chans == len(self._mean):
            spec.update(mean=list(self._mean), std=list(self._std))
        return spec

    def reset_classifier(self, num_classes: int) -> None:
        self.model.reset_classifier(num_classes)

    def group_matcher(self, coarse: bool = False):
        """timm's own grouping of the wrapped model, over our `model.`-prefixed names."""
        from imgarena.models._base import prefixed_matcher

        inner = getattr(self.model, "group_matcher", None)
        return prefixed_matcher(inner(coarse=coarse), "model.") if inner is not None else {}

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in inner()} if inner is not None else set()

    def forward_features(self, x):
        return self.model.forward_features(x)

    def forward_head(self, x, pre_logits: bool = False):
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.model(x)

    def explain_grid(self, feats, input_hw):
        """Explain contract for whatever timm's forward_features returns: an NCHW or NHWC map, or
        (B, prefix + h*w, C) tokens of a patch grid; anything else cannot be drawn over the image."""
        import math

        from imgarena.models._base import NotExplainable

        C = self.num_features
        if feats.ndim == 4 and feats.shape[1] == C:
            return feats
        if feats.ndim == 4 and feats.shape[-1] == C:
            return feats.permute(0, 3, 1, 2)
        if feats.ndim == 3 and feats.shape[-1] == C:
            tokens = feats[:, int(getattr(self.model, "num_prefix_tokens", 0) or 0):]
            n, (H, W) = tokens.shape[1], input_hw
            # the patch grid keeps the input's aspect: h * w == n with h / w == H / W
            h = round(math.sqrt(n * H / W)) if n else 0
            if h and n % h == 0:
                return tokens.transpose(1, 2).reshape(feats.shape[0], C, h, n // h)
        raise NotExplainable(f"{self.model_name}: timm's forward_features gives {tuple(feats.shape)}, not a final "
                             "feature map or a patch-token grid, so there is nothing to draw a class-activation map on")

    def attention_trace(self, x):
        """Rollout for timm ViT-style models: their attention modules compute the probabilities explicitly
        (and pass them through `attn_drop`, hooked here) when `fused_attn` is off."""
        import math

        from imgarena.models._base import AttentionTrace, NotExplainable

        mods = [m for m in self.model.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)]
        prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        if not mods:
            raise NotExplainable(f"{self.model_name} has no timm attention layers to roll out: use --method gradcam or layercam")
        attns: list = []
        hooks = [m.attn_drop.register_forward_hook(lambda _m, _i, y: attns.append(y)) for m in mods]
        fused = [m.fused_attn for m in mods]
        try:
            for m in mods:
                m.fused_attn = False
            logits = self.model(x)
        finally:
            for m, f in zip(mods, fused):
                m.fused_attn = f
            for h in hooks:
                h.remove()
        n, (H, W) = attns[0].shape[-1] - prefix, x.shape[-2:]
        gh = round(math.sqrt(n * H / W)) if n > 0 else 0
        if not gh or n % gh or any(a.shape[-1] != attns[0].shape[-1] for a in attns):
            raise NotExplainable(f"{self.model_name}: its attention is not global over one patch grid (e.g. windowed), "
                                 "so it cannot be rolled out; use --method gradcam or layercam")
        readout = "token" if getattr(self.model, "global_pool", "token") == "token" and prefix else "avg"
        return AttentionTrace(logits, attns, prefix, (gh, n // gh), readout)


def create_timm_model(name: str, num_classes: int = 1000, in_chans: int = 3, img_size: int | None = None,
                      drop_path_rate: float = 0.0, pretrained: str | None = None, train_device=None,
                      **kw) -> TimmModel:
    """Build timm model `name` wrapped as a `TimmModel`. Unknown names -> UserError with close matches.

    `img_size` is passed to timm for architectures built for a fixed size (ViT-like); CNNs take any
    size and get none. `pretrained="timm"` (or "timm:<name.tag>") downloads timm's weights through
    its hub; a path loads a local state dict in timm's format or an imgarena run's weights (see
    `imgarena.models.pretrained`).
    """
    import timm

    if not timm.is_model(name):
        near = closest_matches(name, timm.list_models())
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise UserError(f"unknown timm model {name!r}{hint} (`timm.list_models()` lists them)")
    args = dict(kw)
    if drop_path_rate:
        args["drop_path_rate"] = drop_path_rate
    from imgarena.models._registry import build_checked

    # Options timm rejects (TypeError: unexpected keyword) become a UserError naming them; with no
    # options, an error from timm is a bug and keeps its traceback. Memory is checked on meta first.
    model = build_checked(f"timm/{name}", lambda: _build(name, num_classes, in_chans, img_size, args), kw,
                          img_size=img_size, train_device=train_device)
    wrapped = TimmModel(model, img_size, in_chans)
    wrapped.model_name = f"timm/{name}"
    wrapped.model_kwargs = {**args, **({"img_size": img_size} if img_size else {})}
    if pretrained:
        from imgarena.models.pretrained import load_pretrained

        load_pretrained(wrapped, pretrained)
    return wrapped


def _build(name: str, num_classes: int, in_chans: int, img_size: int | None, args: dict) -> nn.Module:
    import timm

    common = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **args)
    if img_size:
        try:
            return timm.create_model(name, img_size=img_size, **common)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, **common)  # a CNN: any input size works
