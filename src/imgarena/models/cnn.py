"""A plain CNN: stacked 3x3 conv-BN-ReLU stages with max-pooling, then a fully connected head.

Papers: LeCun et al., "Gradient-Based Learning Applied to Document Recognition", 1998 (conv, pool,
conv, pool, fully connected: the LeNet shape), http://yann.lecun.com/exdb/publis/pdf/lecun-98.pdf;
Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", 2014
(only 3x3 convs, a max-pool halving the map after each stage, a flattening FC head),
https://arxiv.org/abs/1409.1556; each conv is followed by batch norm (Ioffe & Szegedy 2015,
https://arxiv.org/abs/1502.03167).

    stage i  `depths[i]` x (3x3 conv -> BN -> ReLU) at width `widths[i]`, then 2x2 max-pool
    head     flatten the last map (C x H/2^n x W/2^n) -> Linear(hidden) -> BN -> ReLU -> Dropout -> Linear

No residuals, no attention, no depthwise convs: every FLOP is a dense conv or matmul, the kind a CPU
runs at close to its peak, and the pooling after every stage keeps the maps small. On 28 px
Fashion-MNIST `cnn_s` trains at ~3,000 img/s on 2 CPU cores (mixer_t4: ~400) and reaches 92% test
accuracy within one minute (benchmarks/time_to_accuracy.py): the fast baseline the other families
are measured against. Like VGG's, the head flattens the map, so its size follows `img_size`
(cnn_s at 28 px: 64 x 7 x 7 -> 256); images much larger than 64 px want more stages.

On CPU, inference folds each BN into its conv and fuses the ReLU (`_fastpaths.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from imgarena.errors import UserError
from imgarena.models._base import ClassifierMixin
from imgarena.models._fastpaths import conv_bn_act, fast_path_ok
from imgarena.models._layers import he_init_, to_channels_last
from imgarena.models._registry import register_family


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias: BN follows) -> BN -> ReLU, same spatial size."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and fast_path_ok(x):
            return conv_bn_act(x, self.conv, self.bn)
        return self.act(self.bn(self.conv(x)))


class CNN(ClassifierMixin, nn.Module):
    """`len(widths)` stages of conv-BN-ReLU blocks, each ending in a 2x2 max-pool; FC head."""

    default_img_size = 28

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 28,
                 widths: tuple | list = (32, 64), depths: tuple | list = (1, 1), hidden: int = 256,
                 drop_rate: float = 0.3, drop_path_rate: float = 0.0):
        super().__init__()
        if len(widths) != len(depths) or not widths:
            raise UserError(f"CNN: widths {tuple(widths)} and depths {tuple(depths)} need one entry per stage")
        if drop_path_rate:
            raise UserError("CNN has no residual branches, so drop_path does not apply; use drop_rate")
        if img_size < 2 ** len(widths):
            raise UserError(f"CNN: img_size {img_size} is too small for {len(widths)} stages of 2x2 pooling "
                            f"(needs at least {2 ** len(widths)} px)")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        chans, stages = in_chans, []
        for width, depth in zip(widths, depths):
            blocks = []
            for _ in range(depth):
                blocks.append(ConvBNReLU(chans, width))
                chans = width
            stages.append(nn.Sequential(*blocks, nn.MaxPool2d(2)))
        self.stages = nn.Sequential(*stages)
        side = img_size // 2 ** len(widths)  # each max-pool floors H/2
        self.fc = nn.Linear(chans * side * side, hidden)  # (B, C*side*side) -> (B, hidden)
        self.fc_norm = nn.BatchNorm1d(hidden)
        self.fc_act = nn.ReLU(inplace=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_features = hidden
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, widths[-1], H/2^n, W/2^n), channels-last (faster convs on CPU)."""
        return self.stages(to_channels_last(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # flatten in (C, H, W) order whatever the memory format, so the fc weights mean the same thing
        x = self.fc_act(self.fc_norm(self.fc(x.flatten(1))))  # (B, hidden)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for layer-wise lr decay: each conv block (each stage when coarse), the fc layer, the head."""
        return dict(blocks=[(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                            (r"^fc", (len(self.stages),))])

    def init_weights(self) -> None:
        """He (fan-out) normal convs, BN at 1/0, PyTorch's default Linear init."""
        he_init_(self)


VARIANTS = {
    #               widths per stage   convs per stage   FC
    "cnn_s": dict(widths=(32, 64), depths=(1, 1), hidden=256),  # LeNet shape with 3x3 convs + BN
    "cnn_m": dict(widths=(32, 64, 128), depths=(1, 1, 1), hidden=256),
}


def build_cnn(**kwargs) -> CNN:
    return CNN(**kwargs)


register_family(VARIANTS, build_cnn, family="cnn")
