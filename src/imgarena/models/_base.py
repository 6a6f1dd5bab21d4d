"""The contract every model family shares.

`forward_features(x)` -> features before pooling; `forward_head(feats, pre_logits=False)` -> pooled
features or logits; `forward(x) = forward_head(forward_features(x))`; `num_classes`;
`reset_classifier(n)`; `input_spec` (size, channels, mean, std). compare/predict/export use only
these and never branch on architecture.

Fine-tuning adds: the head is `get_classifier()` and `get_classifier()(forward_head(feats,
pre_logits=True)) == forward(x)` in eval mode; `group_matcher(coarse)` (timm's format) orders the
parameters into layers for layer-wise lr decay (`layer_ids`); `no_weight_decay()` names the
embeddings that must not decay; `freeze_backbone()` freezes everything outside the head and keeps
it in eval mode.
"""

from __future__ import annotations

import re
from itertools import chain
from typing import Callable, NamedTuple

import torch
from torch import nn

from imgarena.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MATCH_PREV_GROUP = 99999  # timm's: a group_matcher suffix that joins the matched parameters to the previous layer


class ClassifierMixin:
    """Shared pieces of the contract. Subclasses define `head` (nn.Linear or nn.Identity),
    `num_features`, `num_classes`, `forward_features`, `forward_head`."""

    model_name: str = ""
    default_img_size: int = 224

    @property
    def model_kwargs(self) -> dict:
        """The architecture kwargs that rebuild this module (set by `create_model`); one dict per
        instance, so editing one model's kwargs never leaks into another's checkpoint metadata."""
        kw = self.__dict__.get("_model_kwargs")
        if kw is None:
            kw = self.__dict__["_model_kwargs"] = {}
        return kw

    @model_kwargs.setter
    def model_kwargs(self, value: dict) -> None:
        self.__dict__["_model_kwargs"] = dict(value)

    @property
    def input_spec(self) -> dict:
        size = getattr(self, "img_size", None) or self.default_img_size
        chans = getattr(self, "in_chans", 3)
        mean = IMAGENET_MEAN if chans == 3 else (0.5,) * chans
        std = IMAGENET_STD if chans == 3 else (0.5,) * chans
        return {"img_size": int(size), "in_chans": int(chans), "mean": list(mean), "std": list(std)}

    def get_classifier(self) -> nn.Module:
        return self.head

    # ---- fine-tuning: parameter grouping, weight-decay exclusions, a frozen backbone.
    # The backbone is every parameter outside get_classifier(); its pooled output,
    # forward_head(forward_features(x), pre_logits=True), is what get_classifier() maps to logits.

    def group_matcher(self, coarse: bool = False) -> dict | Callable[[str], tuple]:
        """Layer grouping in timm's format, for layer-wise lr decay (`layer_ids`): a dict of
        {group: regex or [(regex, suffix), ...]} over parameter names, numbers captured by the regexes
        ordering the layers (`(MATCH_PREV_GROUP,)` as suffix joins the layer before), or a callable
        name -> ordinal tuple. Unmatched parameters (the head) form the last layer. Each family
        defines its own; this default puts everything in one layer."""
        return {}

    def no_weight_decay(self) -> set[str]:
        """Names of parameters with ndim >= 2 that must not be weight-decayed (position/class tokens,
        relative position tables); 1-D parameters (norms, biases) never are (`engine.optim`)."""
        return set()

    @property
    def backbone_frozen(self) -> bool:
        return bool(self.__dict__.get("_backbone_frozen", False))

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Stop (or restart) training everything outside get_classifier(): requires_grad off, and the
        backbone's modules stay in eval mode through `train()` (BatchNorm statistics, dropout and drop
        path unchanged) until unfrozen."""
        head = {id(p) for p in classifier_parameters(self)}
        for p in self.parameters():
            if id(p) not in head:
                p.requires_grad_(not frozen)
        self.__dict__["_backbone_frozen"] = bool(frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.backbone_frozen:
            for m in backbone_modules(self):
                m.training = False
        return self

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head for a new class count (fresh weights), keeping everything else."""
        self.num_classes = num_classes
        dev = next(self.parameters()).device
        self.head = nn.Linear(self.num_features, num_classes).to(dev) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- explain (`imgarena.explain`): the activations a class-activation map is drawn on.
    # The forward is split as explain_head(explain_features(x)) == forward(x); explain_grid views
    # those features (or their gradient: it must be a pure reshape) as a (B, C, h, w) map over the
    # image. The default fits every family whose forward_features is already a 4-D map (the last
    # conv stage of CNN, ResNet, MobileNet, ConvNeXt); token models override explain_grid.

    def explain_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def explain_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.forward_head(feats)

    def explain_grid(self, feats: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        """`explain_features` output (or its gradient) as a (B, C, h, w) map; `input_hw` is the input's size."""
        if feats.ndim == 4:
            return feats
        raise NotExplainable(f"{self.model_name or type(self).__name__}: its features {tuple(feats.shape)} are not a "
                             "2-D map over the image, so there is nothing to draw a class-activation map on")

    def attention_trace(self, x: torch.Tensor) -> AttentionTrace:
        """Logits plus every layer's attention probabilities, for attention rollout (global attention only).
        The logits must be computed from those very tensors, so that gradient-weighted rollout can take
        d logit / d attention."""
        raise NotExplainable(f"{self.model_name or type(self).__name__} has no global self-attention to roll out: "
                             "use --method gradcam or layercam")


class NotExplainable(UserError):
    """This model (or this method on it) cannot produce a class-activation map; the message says why."""


class AttentionTrace(NamedTuple):
    """What attention rollout needs from a model with global self-attention."""

    logits: torch.Tensor  # (B, num_classes)
    attentions: list  # per layer (B, heads, T, T) softmax probabilities, T = num_prefix + h * w; logits depend on them
    num_prefix: int  # class/register tokens before the patch tokens
    grid: tuple[int, int]  # (h, w) of the patch tokens, row-major
    readout: str  # "token": the head reads prefix token 0; "avg": the mean of the patch tokens


# ---- helpers over the fine-tuning contract

def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of get_classifier() (a module, or a tuple of them as timm's distilled ViTs return)."""
    clf = model.get_classifier()
    return [p for m in (clf if isinstance(clf, (tuple, list)) else (clf,)) for p in m.parameters()]


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """Every submodule that holds no classifier parameter and is not inside a classifier module:
    what a frozen backbone keeps in eval mode. Modules holding both (the model itself, a timm head
    that wraps norm + fc) keep their mode; parameter-free modules (dropout, drop path) of the
    backbone are included."""
    head = {id(p) for p in classifier_parameters(model)}
    out, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(h + ".") for h in inside):
            continue
        own = {id(p) for p in m.parameters()}
        if own and own <= head:
            inside.append(name)  # a classifier module: it and its children train
        elif not own & head:
            out.append(m)
    return out


def layer_ids(model: nn.Module, coarse: bool = False) -> dict[str, int]:
    """Parameter name -> layer id (0 = stem ... max = head) from `model.group_matcher(coarse)`,
    timm's rule (timm.models._manipulate.group_with_matcher): names are ordered by the ordinal the
    matcher gives them; unmatched names (the head and anything after the last block) come last."""
    ordinal = matcher_fn(model.group_matcher(coarse=coarse))
    names = [n for n, _ in model.named_parameters()]
    keys = {n: ordinal(n) for n in names}
    ids, lid = {}, -1
    for k in sorted(set(keys.values())):
        if lid < 0 or k[-1] != MATCH_PREV_GROUP:
            lid += 1
        ids[k] = lid
    return {n: ids[keys[n]] for n in names}


def matcher_fn(matcher) -> Callable[[str], tuple]:
    """A timm group_matcher (dict of regexes, or a callable) as one function name -> ordinal tuple."""
    if callable(matcher):
        return lambda name: tuple(float(v) for v in _as_tuple(matcher(name)))
    compiled = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        for regex, suffix in (spec if isinstance(spec, (list, tuple)) else [(spec, None)]):
            compiled.append((re.compile(regex), (ordinal,), suffix))

    def ordinal_of(name: str) -> tuple:
        for regex, prefix, suffix in compiled:
            m = regex.match(name)
            if m:
                return tuple(float(v) for v in chain.from_iterable(filter(None, (prefix, m.groups(), suffix))))
        return (float("inf"),)

    return ordinal_of


def prefixed_matcher(matcher, prefix: str) -> Callable[[str], tuple]:
    """`matcher` (over a submodule's parameter names) applied to names under `prefix` (e.g. "model.")."""
    inner = matcher_fn(matcher)
    return lambda name: inner(name[len(prefix):]) if name.startswith(prefix) else (float("inf"),)


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
