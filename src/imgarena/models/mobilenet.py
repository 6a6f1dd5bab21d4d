"""MobileNet V1 and V2: ConvNets built from depthwise-separable convolutions.

V1 paper: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", 2017, https://arxiv.org/abs/1704.04861 (its Table 1).
V2 paper: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
https://arxiv.org/abs/1801.04381 (its Table 2).

    V1 block   3x3 depthwise conv-BN-ReLU6, then 1x1 pointwise conv-BN-ReLU6; no shortcut
    V2 block   1x1 expand (t x) conv-BN-ReLU6, 3x3 depthwise conv-BN-ReLU6, 1x1 project conv-BN with
               NO activation (the "linear bottleneck"); a shortcut when stride 1 and widths match
               (the "inverted residual": it joins the thin ends). For t = 1 the expansion is skipped.
    both       3x3 stride-2 stem conv (32) first; V2 ends with a 1x1 conv to 1280; average pool, Linear

The width multiplier alpha scales every layer's width, rounded to a multiple of 8 (never down by
more than 10%), like the reference TensorFlow code and timm. Activations are ReLU6 in both, as in
the TensorFlow reference implementation of V1 (the V1 paper writes ReLU). `stem_stride=1` keeps a
32 px image at 32x32 in the first stage (mobilenetv2_cifar). Depthwise convs are much faster in
channels-last memory on CPU, so the trunk runs channels-last; on CPU, inference folds BN into the
convs and fuses ReLU6 and the residual add, and convs with a 1x1 output run as one matmul
(`_fastpaths.py`). Module names follow timm's
EfficientNet class (conv_stem, bn1, blocks.i.j.conv_dw, ..., conv_head, bn2); only timm's
`classifier` is renamed to our `head`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imgarena.errors import UserError
from imgarena.models._base import MATCH_PREV_GROUP, ClassifierMixin
from imgarena.models._fastpaths import SmallMapConv2d, conv_bn_act, fast_path_ok
from imgarena.models._layers import DropPath, to_channels_last
from imgarena.models._registry import register_family


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of `divisor` (at least `divisor`), bumped up if it lost more than 10% of `v`."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


class DepthwiseSeparableConv(nn.Module):
    """3x3 depthwise conv-BN-ReLU6, 1x1 pointwise conv-BN (+ ReLU6 when `pw_act`, as in V1)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1, pw_act: bool = True,
                 skip: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = SmallMapConv2d(in_chans, in_chans, 3, stride=stride, padding=1, groups=in_chans, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.act1 = nn.ReLU6(inplace=True)
        self.conv_pw = SmallMapConv2d(in_chans, out_chans, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.act2 = nn.ReLU6(inplace=True) if pw_act else nn.Identity()
        self.pw_act = "relu6" if pw_act else "none"
        self.has_skip = skip and stride == 1 and in_chans == out_chans
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and fast_path_ok(x):  # CPU inference: BN folded, ReLU6 and add fused
            y = conv_bn_act(x, self.conv_dw, self.bn1, "relu6")
            return conv_bn_act(y, self.conv_pw, self.bn2, self.pw_act, residual=x if self.has_skip else None)
        y = self.act1(self.bn1(self.conv_dw(x)))  # (B, in, H/s, W/s)
        y = self.act2(self.bn2(self.conv_pw(y)))  # (B, out, H/s, W/s)
        return x + self.drop_path(y) if self.has_skip else y


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 linear projection-BN, + shortcut when shapes match."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1, expand_ratio: float = 6.0,
                 drop_path: float = 0.0):
        super().__init__()
        mid = make_divisible(in_chans * expand_ratio)
        self.conv_pw = SmallMapConv2d(in_chans, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.ReLU6(inplace=True)
        self.conv_dw = SmallMapConv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU6(inplace=True)
        self.conv_pwl = SmallMapConv2d(mid, out_chans, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chans)  # linear bottleneck: no activation
        self.has_skip = stride == 1 and in_chans == out_chans
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and fast_path_ok(x):  # CPU inference: BN folded, ReLU6 and add fused
            y = conv_bn_act(conv_bn_act(x, self.conv_pw, self.bn1, "relu6"), self.conv_dw, self.bn2, "relu6")
            return conv_bn_act(y, self.conv_pwl, self.bn3, "none", residual=x if self.has_skip else None)
        y = self.act1(self.bn1(self.conv_pw(x)))  # (B, t*in, H, W)
        y = self.act2(self.bn2(self.conv_dw(y)))  # (B, t*in, H/s, W/s)
        y = self.bn3(self.conv_pwl(y))  # (B, out, H/s, W/s)
        return x + self.drop_path(y) if self.has_skip else y


# Stages as (expansion t, width c, repeats n, first stride s): V1 Table 1 and V2 Table 2.
# t = 0 marks V1's depthwise-separable block (no expansion, ReLU6 after the pointwise conv).
ARCH = {
    1: [(0, 64, 1, 1), (0, 128, 2, 2), (0, 256, 2, 2), (0, 512, 6, 2), (0, 1024, 2, 2)],
    2: [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)],
}


class MobileNet(ClassifierMixin, nn.Module):
    """MobileNet `version` 1 or 2 at width multiplier `width`."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int | None = None, version: int = 2,
                 width: float = 1.0, stem_stride: int = 2, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if version not in ARCH:
            raise UserError(f"MobileNet version must be 1 or 2, got {version!r}")
        if width <= 0:
            raise UserError(f"MobileNet width multiplier must be > 0, got {width}")
        self.default_img_size = 32 if stem_stride == 1 else 224  # only for input_spec: any size works
        self.num_classes, self.in_chans = num_classes, in_chans
        self.img_size = img_size or self.default_img_size
        self.version, self.width = version, width

        stem = make_divisible(32 * width)
        self.conv_stem = SmallMapConv2d(in_chans, stem, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU6(inplace=True)

        # Stochastic depth on the residual blocks: rate * block_index / num_blocks (timm's rule).
        arch = ARCH[version]
        total, idx, chans = sum(n for _, _, n, _ in arch), 0, stem
        stages = []
        for t, c, n, s in arch:
            out, blocks = make_divisible(c * width), []
            for j in range(n):
                stride, dp = (s if j == 0 else 1), drop_path_rate * idx / total
                if t == 0:  # V1
                    blocks.append(DepthwiseSeparableConv(chans, out, stride, pw_act=True))
                elif t == 1:  # V2's first block: no expansion conv, linear projection
                    blocks.append(DepthwiseSeparableConv(chans, out, stride, pw_act=False, skip=True, drop_path=dp))
                else:
                    blocks.append(InvertedResidual(chans, out, stride, t, drop_path=dp))
                chans, idx = out, idx + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)

        if version == 2:  # final 1x1 conv to 1280 (scaled up, never down, by the width multiplier)
            self.num_features = max(1280, make_divisible(1280 * width))
            self.conv_head = SmallMapConv2d(chans, self.num_features, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(self.num_features)
            self.act2 = nn.ReLU6(inplace=True)
        else:
            self.num_features = chans
            self.conv_head, self.bn2, self.act2 = nn.Identity(), nn.Identity(), nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H/32, W/32) (H/16 with stem_stride=1), channels-last."""
        x = to_channels_last(x)
        fused = not self.training and fast_path_ok(x)
        x = conv_bn_act(x, self.conv_stem, self.bn1, "relu6") if fused else self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)  # (B, 320*width (V2) or 1024*width (V1), H/32, W/32); (B, 32*width, H/2, W/2) before
        if fused and self.version == 2:
            return conv_bn_act(x, self.conv_head, self.bn2, "relu6")
        return self.act2(self.bn2(self.conv_head(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))  # global average pool: (B, num_features)
        return x if pre_logits else self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's EfficientNet grouping: stem, each block (each stage when coarse; conv_head joins the last), head."""
        return dict(stem=r"^conv_stem|bn1", blocks=[(r"^blocks\.(\d+)" if coarse else r"^blocks\.(\d+)\.(\d+)", None),
                                                    (r"conv_head|bn2", (MATCH_PREV_GROUP,))])

    @torch.no_grad()
    def init_weights(self) -> None:
        """The TensorFlow reference init (timm's `_init_weight_goog`): convs N(0, sqrt(2 / fan_out)) with
        fan_out = k*k*out/groups, BN at 1/0, Linear U(+-1/sqrt(out_features))."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[0])
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)


VARIANTS = {
    "mobilenetv1": dict(version=1, width=1.0, _paper=True, _timm="mobilenetv1_100"),
    "mobilenetv2": dict(version=2, width=1.0, _paper=True, _timm="mobilenetv2_100"),
    # Stride-1 first conv for 28-64 px images: a 32 px input ends at 2x2 instead of 1x1.
    "mobilenetv2_cifar": dict(version=2, width=1.0, stem_stride=1, img_size=32),
}


def build_mobilenet(**kwargs) -> MobileNet:
    return MobileNet(**kwargs)


register_family(VARIANTS, build_mobilenet, family="mobilenet")
