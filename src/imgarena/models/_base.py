"""The contract every model family shares.

`forward_features(x)` -> features before pooling; `forward_head(feats, pre_logits=False)` -> pooled
features or logits; `forward(x) = forward_head(forward_features(x))`; `num_classes`;
`reset_classifier(n)`; `input_spec` (size, channels, mean, std). compare/predict/export use only
these and never branch on architecture.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from imgarena.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
