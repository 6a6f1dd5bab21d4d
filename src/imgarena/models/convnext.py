"""ConvNeXt: a pure ConvNet modernised step by step towards a Swin-like design.

Paper: Liu et al., "A ConvNet for the 2020s", CVPR 2022, https://arxiv.org/abs/2201.03545
(T/S/B/L as defined there; atto..nano are timm's smaller versions of the same design).

    stem     4x4 conv, stride 4 ("patchify", like a ViT patch embedding) + LayerNorm
    stage i  (i > 0) LayerNorm + 2x2 conv stride 2 (downsample), then depths[i] blocks of width dims[i]
    block    x + gamma * Linear(4C -> C)(GELU(Linear(C -> 4C)(LayerNorm(DWConv7x7(x)))))
    head     global average pool -> LayerNorm -> Linear

Stochastic depth drops whole blocks with a rate rising linearly from 0 to `drop_path_rate` over
all blocks; layer scale `gamma` starts at 1e-6 so each block starts close to the identity.

The `stem="small"` option is seed 003's stem for 28-64 px images: a 2x2 stride-2 patchify, so a
32 px image gives a 16x16 map in stage 1 (the 4x4 stem would give 8x8 and end at 1x1).

Implementation note (why activations are NHWC): on CPU the depthwise 7x7 convolution is 3x faster
forward and backward on channels-last memory, and LayerNorm and the MLP work on the channel axis
anyway. So the trunk keeps one contiguous (B, H, W, C) tensor: the depthwise conv sees it as a
channels-last NCHW view (no copy), and LayerNorm / Linear run on it directly. The stem and the
downsampling convs (kernel == stride) are computed as one matmul over patches, faster here than the
strided convolution. Two more CPU speed-ups, each checked against the plain computation in the
tests: the depthwise conv's weight gradient is computed as a depthwise convolution
(`_DepthwiseConvFn`), and inference runs each block's MLP as two fused oneDNN matmuls (`_fastpaths.py`).
Parameter names and shapes are timm's, so `convert.py` only renames the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgarena.errors import UserError
from imgarena.models._base import ClassifierMixin
from imgarena.models._fastpaths import fast_path_ok, linear_add, linear_gelu
from imgarena.models._layers import DropPath, Mlp, trunc_normal_
from imgarena.models._registry import register_family


class Patchify(nn.Conv2d):
    """A conv with kernel == stride (stem and downsampling) on NHWC maps: (B, H, W, C) -> (B, H/p, W/p, O).

    The weight is stored as the conv's (O, C, p, p) (timm's layout) and applied as one F.linear over
    the non-overlapping p x p patches; trailing rows/columns that do not fill a patch are dropped, as
    the strided convolution would.
    """

    def __init__(self, in_chans: int, out_chans: int, patch: int):
        super().__init__(in_chans, out_chans, kernel_size=patch, stride=patch)
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        p = self.patch
        gh, gw = H // p, W // p
        if gh == 0 or gw == 0:
            raise ValueError(f"ConvNeXt: a {H}x{W} map is smaller than its {p}x{p} patch; use larger images "
                             f"(at least 32 px, or stem='small' for 16-64 px inputs)")
        x = x[:, :gh * p, :gw * p]
        # (B, gh, p, gw, p, C) -> (B, gh, gw, p, p, C): each patch's pixels in (kh, kw, C) order ...
        x = x.reshape(B, gh, p, gw, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, gh, gw, p * p * C)
        # ... so the conv weight is read in the same (O, kh, kw, C) order (a small copy per call).
        w = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, p * p * C)
        return F.linear(x, w, self.bias)


class _DepthwiseConvFn(torch.autograd.Function):
    """Stride-1 depthwise conv (output size = input size) whose weight gradient is itself a depthwise conv.

    dL/dw[c, i, j] = sum_{b,h,w} x_pad[b, c, h+i, w+j] * g[b, c, h, w]: a correlation of each image's
    channel with its own output gradient. Laid out as ONE depthwise conv over B*C channels (input x,
    kernel g, output kh x kw) plus a sum over the batch, oneDNN computes it 1.2-10x faster than its own
    depthwise backward-weights kernel on CPU (most at small maps / many channels, e.g. stage 4).
    The input gradient uses PyTorch's kernel, which is fast.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding: tuple[int, int]):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        B, C, H, W = x.shape
        pad = list(ctx.padding)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, x, weight, None, [1, 1], pad, [1, 1], False, [0, 0], C,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            # (1, B*C, H, W) in channels-last memory (H, W, B, C): one copy of x; one kernel per (b, c).
            xs = x.permute(2, 3, 0, 1).reshape(1, H, W, B * C).permute(0, 3, 1, 2)
            gw = F.conv2d(xs, g.reshape(B * C, 1, H, W), padding=pad, groups=B * C)  # (1, B*C, kh, kw)
            gw = gw.reshape(B, C, 1, *weight.shape[2:]).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None


class DepthwiseConv2d(nn.Conv2d):
    """k x k depthwise conv, stride 1, 'same' padding (timm's `conv_dw` keys), shaped for small maps.

    Kernel taps further from the centre than the map is wide only ever see zero padding, so on maps
    smaller than the kernel (stages 3-4 of a 32 px input: 2x2, 1x1) they are cropped away, and a 1x1
    map is a per-channel scale: the same result without PyTorch's very slow tiny-map conv paths. On
    CPU with autograd on, the weight gradient comes from `_DepthwiseConvFn`.
    """

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or type(x) is not torch.Tensor:
            return super().forward(x)  # export / compile: the plain conv, one static graph
        H, W = x.shape[-2:]
        p = self.padding[0]
        weight, bias = self.weight, self.bias
        if H == 1 and W == 1:
            return x * weight[:, 0, p, p].reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
        ph, pw = min(p, H - 1), min(p, W - 1)
        if (ph, pw) != (p, p):
            weight = weight[:, :, p - ph:p + ph + 1, p - pw:p + pw + 1]
        if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _DepthwiseConvFn.apply(x, weight, bias, (ph, pw))
        return F.conv2d(x, weight, bias, padding=(ph, pw), groups=self.groups)  # CUDA, inference


class PointwiseMlp(Mlp):
    """The block MLP with its two layers stored as 1x1 convs (timm's `conv_mlp` layout, used by
    atto..nano). The same linear maps, so it is computed exactly like `Mlp`: F.linear on NHWC."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(dim, hidden)
        self.fc1 = nn.Conv2d(dim, hidden, 1)  # (hidden, C, 1, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(F.linear(x, self.fc1.weight.flatten(1), self.fc1.bias))
        return self.drop2(F.linear(self.drop1(x), self.fc2.weight.flatten(1), self.fc2.bias))


class ConvNeXtBlock(nn.Module):
    """DWConv 7x7 -> LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> layer scale, plus the skip."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, ls_init_value: float | None = 1e-6,
                 drop_path: float = 0.0, conv_mlp: bool = False):
        super().__init__()
        self.conv_dw = DepthwiseConv2d(dim, kernel_size=7)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = PointwiseMlp(dim, hidden) if conv_mlp else Mlp(dim, hidden)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init_value)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C) contiguous; permute(0, 3, 1, 2) is its channels-last NCHW view (no copy).
        y = self.norm(self.conv_dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # (B, H, W, C)
        if not self.training and fast_path_ok(x):  # CPU inference: fc1+GELU, fc2+gamma+skip fused
            return self._fused_mlp(x, y)
        y = self.mlp(y)  # (B, H, W, C)
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y)

    def _fused_mlp(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + gamma * fc2(GELU(fc1(y))) with two oneDNN matmuls: gamma scales fc2's rows."""
        C = x.shape[-1]
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        w2, b2 = fc2.weight.flatten(1), fc2.bias
        if self.gamma is not None:
            w2, b2 = w2 * self.gamma[:, None], b2 * self.gamma
        h = linear_gelu(y.reshape(-1, C), fc1.weight.flatten(1), fc1.bias)  # (B*H*W, 4C)
        return linear_add(h, x.reshape(-1, C), w2, b2).view(x.shape)


class ConvNeXtStage(nn.Module):
    """Optional downsampling (LayerNorm + 2x2 stride-2 conv), then `depth` blocks at width `out_dim`."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, downsample: bool, drop_path_rates: list[float],
                 ls_init_value: float | None, conv_mlp: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), Patchify(in_dim, out_dim, 2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(out_dim, ls_init_value=ls_init_value, drop_path=drop_path_rates[i], conv_mlp=conv_mlp)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))  # (B, H, W, C) -> (B, H', W', out_dim)


class ConvNeXt(ClassifierMixin, nn.Module):
    """ConvNeXt with `depths` blocks per stage at widths `dims`; `stem` is "patchify" (4x4/4) or "small" (2x2/2)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int | None = None,
                 depths: tuple = (3, 3, 9, 3), dims: tuple = (96, 192, 384, 768), stem: str = "patchify",
                 ls_init_value: float | None = 1e-6, conv_mlp: bool = False, head_init_scale: float = 1.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if stem not in ("patchify", "small"):
            raise UserError(f"ConvNeXt stem must be 'patchify' (4x4 stride 4) or 'small' (2x2 stride 2), got {stem!r}")
        if len(depths) != len(dims):
            raise UserError(f"ConvNeXt: depths {tuple(depths)} and dims {tuple(dims)} need one entry per stage")
        self.default_img_size = 32 if stem == "small" else 224  # only for input_spec
        self.num_classes, self.in_chans = num_classes, in_chans
        self.img_size = img_size or self.default_img_size
        min_size = (4 if stem == "patchify" else 2) * 2 ** (len(depths) - 1)  # stem, then 2x2 downsamplings
        if self.img_size < min_size:
            raise UserError(f"ConvNeXt with the {stem!r} stem needs images of at least {min_size} px, got "
                            f"{self.img_size}; use a '_cifar' variant (stem='small', from 16 px) or larger images")
        self.stem = nn.Sequential(Patchify(in_chans, dims[0], 4 if stem == "patchify" else 2),
                                  nn.LayerNorm(dims[0], eps=1e-6))
        # Stochastic depth: linearly from 0 (first block) to drop_path_rate (last block).
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # plain floats: works on device="meta"
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(ConvNeXtStage(dims[i - 1] if i else dims[0], dim, depth, downsample=i > 0,
                                        drop_path_rates=rates[start:start + depth], ls_init_value=ls_init_value,
                                        conv_mlp=conv_mlp))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.num_features = dims[-1]
        self.head_norm = nn.LayerNorm(self.num_features, eps=1e-6)  # timm: head.norm (after pooling)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, C, H/32, W/32) (H/16 with the small stem), as a channels-last view."""
        x = self.stem(x.permute(0, 2, 3, 1))  # (B, H/4, W/4, dims[0]) NHWC
        x = self.stages(x)  # (B, H/32, W/32, dims[-1])
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_norm(x.mean(dim=(2, 3)))  # global average pool, then LayerNorm: (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping: stem, each stage's downsample and blocks (each stage when coarse), head (with head_norm)."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.no_grad()
    def init_weights(self, head_init_scale: float = 1.0) -> None:
        """timm's init: truncated normal (std .02) convs and linears, zero biases; head optionally scaled."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(head_init_scale)


VARIANTS = {
    #                    blocks per stage          width per stage
    "convnext_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True, _timm="convnext_atto"),
    "convnext_femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True, _timm="convnext_femto"),
    "convnext_pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), conv_mlp=True, _timm="convnext_pico"),
    "convnext_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True, _timm="convnext_nano"),
    "convnext_t": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), _paper=True, _timm="convnext_tiny"),
    "convnext_s": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), _paper=True, _timm="convnext_small"),
    "convnext_b": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), _paper=True, _timm="convnext_base"),
    "convnext_l": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), _paper=True, _timm="convnext_large"),
    # Seed 003: the 2x2 stride-2 stem for 32 px images (stage maps 16, 8, 4, 2).
    "convnext_atto_cifar": dict(img_size=32, stem="small", depths=(2, 2, 6, 2), dims=(40, 80, 160, 320),
                                conv_mlp=True),
    "convnext_t_cifar": dict(img_size=32, stem="small", depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
}


def build_convnext(**kwargs) -> ConvNeXt:
    return ConvNeXt(**kwargs)


register_family(VARIANTS, build_convnext, family="convnext")
