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

    def forward_features(self, x):
        return self.model.forward_features(x)

    def forward_head(self, x, pre_logits: bool = False):
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.model(x)


def create_timm_model(name: str, num_classes: int = 1000, in_chans: int = 3, img_size: int | None = None,
                      drop_path_rate: float = 0.0, pretrained: str | None = None, **kw) -> TimmModel:
    """Build timm model `name` wrapped as a `TimmModel`. Unknown names -> UserError with close matches.

    `img_size` is passed to timm for architectures built for a fixed size (ViT-like); CNNs take any
    size and get none. `pretrained="timm"` downloads timm's weights through its hub; a path loads a
    local state dict in timm's format (see `imgarena.models.pretrained`).
    """
    import timm

    if not timm.is_model(name):
        near = closest_matches(name, timm.list_models())
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise UserError(f"unknown timm model {name!r}{hint} (`timm.list_models()` lists them)")
    args = dict(kw)
    if drop_path_rate:
        args["drop_path_rate"] = drop_path_rate
    try:
        model = _build(name, num_classes, in_chans, img_size, args)
    except TypeError as e:
        raise UserError(f"timm model {name!r}: bad option ({e})") from None
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
