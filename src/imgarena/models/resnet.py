"""ResNet: deep residual learning with identity shortcuts.

Paper: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385 (18/34/50 from its Table 1).

    stem     7x7 conv stride 2 (64) + BN + ReLU + 3x3 max-pool stride 2
    stage i  `layers[i]` residual blocks at widths 64, 128, 256, 512; stages 2-4 halve the map in
             their first block, whose shortcut is then a 1x1 strided conv + BN (the paper's option B)
    block    BasicBlock (two 3x3 convs; ResNet-18/34) or Bottleneck (1x1 reduce, 3x3, 1x1 expand x4;
             ResNet-50), each conv followed by BN, ReLU after the sum with the shortcut
    head     global average pool -> Linear

Like timm and torchvision (ResNet "v1.5"), the Bottleneck strides in its 3x3 conv rather than the
first 1x1; the parameter count is the paper's either way. `stem="small"` is the usual CIFAR stem:
one 3x3 stride-1 conv and no max-pool, so a 32 px image keeps 32x32 maps in stage 1.

The last BN of each residual branch starts at zero (`zero_init_last`, Goyal et al. 2017), so every
block starts as the identity. Activations run in channels-last memory: convolutions and batch norm
are faster that way on CPU (oneDNN) and on tensor-core GPUs. On CPU, inference folds BN into the
convs and fuses ReLU and the residual add, and convs with a 1x1 output (stage 4 at 28-32 px) run as
one matmul (`_fastpaths.py`). Parameter names are timm's; only the
classifier is renamed (timm `fc` -> our `head`).
"""

from __future__ import annotations

import torch
from torch import nn

from imgarena.errors import UserError
from imgarena.models._base import ClassifierMixin
from imgarena.models._fastpaths import SmallMapConv2d, conv_bn_act, fast_path_ok
from imgarena.models._layers import DropPath, he_init_, to_channels_last
from imgarena.models._registry import register_family


def conv_bn(in_chans: int, out_chans: int, stride: int) -> nn.Sequential:
    """The projection shortcut: 1x1 conv (strided) + BN, timm's `downsample.0` / `downsample.1`."""
    conv = SmallMapConv2d(in_chans, out_chans, 1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_chans))


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut, ReLU. Output width = planes."""

    expansion = 1

    def __init__(self, in_chans: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = SmallMapConv2d(in_chans, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = SmallMapConv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        out = planes * self.expansion
        self.downsample = conv_bn(in_chans, out, stride) if stride != 1 or in_chans != out else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and fast_path_ok(x):  # CPU inference: BN folded, ReLU and add fused
            shortcut = x if self.downsample is None else conv_bn_act(x, *self.downsample, act="none")
            return conv_bn_act(conv_bn_act(x, self.conv1, self.bn1), self.conv2, self.bn2, residual=shortcut)
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))  # (B, planes, H/s, W/s)
        y = self.bn2(self.conv2(y))
        return self.act2(self.drop_path(y) + shortcut)


class Bottleneck(nn.Module):
    """1x1 conv (reduce to planes), 3x3 conv (stride), 1x1 conv (expand to 4*planes), + shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_chans: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = SmallMapConv2d(in_chans, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = SmallMapConv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = SmallMapConv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = conv_bn(in_chans, out, stride) if stride != 1 or in_chans != out else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and fast_path_ok(x):  # CPU inference: BN folded, ReLU and add fused
            shortcut = x if self.downsample is None else conv_bn_act(x, *self.downsample, act="none")
            y = conv_bn_act(conv_bn_act(x, self.conv1, self.bn1), self.conv2, self.bn2)
            return conv_bn_act(y, self.conv3, self.bn3, residual=shortcut)
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        y = self.act2(self.bn2(self.conv2(y)))  # (B, planes, H/s, W/s)
        y = self.bn3(self.conv3(y))  # (B, 4*planes, H/s, W/s)
        return self.act3(self.drop_path(y) + shortcut)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(ClassifierMixin, nn.Module):
    """ResNet with `layers[i]` blocks of type `block` ("basic" or "bottleneck") per stage."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int | None = None,
                 block: str = "basic", layers: tuple = (2, 2, 2, 2), widths: tuple = (64, 128, 256, 512),
                 stem: str = "imagenet", stem_width: int = 64, zero_init_last: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if block not in BLOCKS:
            raise UserError(f"ResNet block must be one of {sorted(BLOCKS)}, got {block!r}")
        if stem not in ("imagenet", "small"):
            raise UserError(f"ResNet stem must be 'imagenet' (7x7/2 + max-pool) or 'small' (3x3/1), got {stem!r}")
        if len(layers) != len(widths):
            raise UserError(f"ResNet: layers {tuple(layers)} and widths {tuple(widths)} need one entry per stage")
        block_cls = BLOCKS[block]
        self.default_img_size = 32 if stem == "small" else 224  # only for input_spec: any size works
        self.num_classes, self.in_chans = num_classes, in_chans
        self.img_size = img_size or self.default_img_size
        if stem == "small":
            self.conv1 = SmallMapConv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = SmallMapConv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()

        # Stages are named layer1..layer4 (timm / torchvision key names). Stochastic depth, where
        # asked for, rises linearly from 0 to drop_path_rate over all blocks (timm's rule).
        n = sum(layers)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        chans, idx = stem_width, 0
        for i, (depth, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block_cls(chans, planes, stride, drop_path=rates[idx]))
                chans, idx = planes * block_cls.expansion, idx + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.num_features = chans
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(zero_init_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H/32, W/32) (H/8 with the small stem), channels-last."""
        x = to_channels_last(x)
        if not self.training and fast_path_ok(x):
            x = self.maxpool(conv_bn_act(x, self.conv1, self.bn1))
        else:
            x = self.maxpool(self.act1(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4); small stem: (B, 64, H, W)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))  # global average pool: (B, C)
        return x if pre_logits else self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping: stem, each residual block (each stage when coarse), head."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        """He (fan-out) normal convs, BN at 1/0, PyTorch's default Linear init; optionally zero-init
        the last BN of every residual branch (timm's and torchvision's choice)."""
        he_init_(self)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()


VARIANTS = {
    #                  block type                   blocks per stage
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2), _paper=True, _timm="resnet18"),
    "resnet34": dict(block="basic", layers=(3, 4, 6, 3), _paper=True, _timm="resnet34"),
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3), _paper=True, _timm="resnet50"),
    # Small-input stem (3x3 stride 1, no max-pool) for 28-64 px images.
    "resnet18_cifar": dict(img_size=32, stem="small", block="basic", layers=(2, 2, 2, 2)),
    "resnet50_cifar": dict(img_size=32, stem="small", block="bottleneck", layers=(3, 4, 6, 3)),
}


def build_resnet(**kwargs) -> ResNet:
    return ResNet(**kwargs)


register_family(VARIANTS, build_resnet, family="resnet")
