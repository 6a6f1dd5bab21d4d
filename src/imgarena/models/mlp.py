"""A plain multilayer perceptron: the hand-made "MyNet" of seed 004.

Flatten the image, hidden Linear+ReLU+Dropout layers (default one of 200 units), linear head.
It has no notion of space, which is the point: it is the floor every other family should beat.
"""

from __future__ import annotations

from torch import nn

from imgarena.models._base import ClassifierMixin
from imgarena.models._registry import register_family


class MLP(ClassifierMixin, nn.Module):
    default_img_size = 28

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 28,
                 hidden: tuple | list = (200,), drop_rate: float = 0.2, drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        layers: list[nn.Module] = [nn.Flatten(1)]
        dim = in_chans * img_size * img_size  # (B, C, H, W) -> (B, C*H*W)
        for width in hidden:
            layers += [nn.Linear(dim, width), nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
            dim = width
        self.body = nn.Sequential(*layers)
        self.num_features = dim
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        return self.body(x)  # (B, hidden[-1])

    def forward_head(self, x, pre_logits: bool = False):
        return x if pre_logits else self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for layer-wise lr decay: each hidden Linear, then the head."""
        return dict(blocks=r"^body\.(\d+)")

    # Explain contract: an MLP flattens the image first, so the only map over the image it has is the
    # input itself; Grad-CAM/LayerCAM on it become gradient-times-input saliency.
    def explain_features(self, x):
        return x

    def explain_head(self, feats):
        return self.forward(feats)


VARIANTS = {
    "mlp": dict(hidden=(200,)),  # seed 004's MyNet
    "mlp_deep": dict(hidden=(512, 256)),
}


def build_mlp(**kwargs) -> MLP:
    return MLP(**kwargs)


register_family(VARIANTS, build_mlp, family="mlp")
