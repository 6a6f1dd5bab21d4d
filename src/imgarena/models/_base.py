"""The contract every model family shares.

`forward_features(x)` -> features before pooling; `forward_head(feats, pre_logits=False)` -> pooled
features or logits; `forward(x) = forward_head(forward_features(x))`; `num_classes`;
`reset_classifier(n)`; `input_spec` (size, channels, mean, std). compare/predict/export use only
these and never branch on architecture.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClassifierMixin:
    """Shared pieces of the contract. Subclasses define `head` (nn.Linear or nn.Identity),
    `num_features`, `num_classes`, `forward_features`, `forward_head`."""

    model_name: str = ""
    model_kwargs: dict = {}
    default_img_size: int = 224

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
