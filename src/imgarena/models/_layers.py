"""Building blocks shared by the model families (module and parameter names match timm's).

DropPath (stochastic depth), Mlp (Linear-act-Linear), PatchEmbed (non-overlapping patches via a
strided conv whose weight is `proj.weight`), LayerNorm2d (LayerNorm over channels of NCHW maps),
`trunc_normal_` / `init_linears_` (the ViT/Mixer init), `he_init_` (the ConvNets' init), `split_heads` (fused qkv -> q, k, v) and
`to_channels_last` (the ConvNets' input layout, one-channel images included).
Keeping timm's names lets `convert.py` stay tiny.

Speed helpers (same values as the plain ops, checked by the tests):
  linear_residual   shortcut + Linear(x) with the add folded into the GEMM (addmm, beta=1)
  fused_cpu_inference / linear   oneDNN's fused linear(+GELU)(+add) kernels (`_fastpaths.py`) for
                    no-grad fp32 CPU inference; never under autocast, tracing or torch.compile
  plain_ops()       a context that switches all of this off (module calls everywhere)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from imgarena.errors import UserError
from imgarena.models._fastpaths import fast_path_ok, linear_add, linear_gelu


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
    """Normal init truncated at +-2 (absolute, like timm's `trunc_normal_`; at std=0.02 that is ~no truncation)."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=-2.0, b=2.0)


@torch.no_grad()
def init_linears_(module: nn.Module, std: float = 0.02) -> None:
    """timm's ViT-style init for every nn.Linear inside `module`: truncated-normal weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def he_init_(module: nn.Module) -> None:
    """He (fan-out) normal convs, batch norms at weight 1 / bias 0 (ResNet's and the plain CNN's init;
    Linear layers keep PyTorch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused qkv projection (B, N, 3*h*d) -> q, k, v views of shape (B, h, N, d).

    Unbinding the "3" axis first (timm permutes, then unbinds dim 0) means that in backward the three
    gradients are stacked straight into qkv's (B, N, 3, h, d) layout: one copy instead of a stack
    plus a permute copy.
    """
    B, N, three_hd = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, three_hd // (3 * num_heads)).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in channels-last memory, with channels-last strides even when C == 1.

    For one channel, `contiguous(memory_format=channels_last)` leaves NCHW strides (784, 784, 28, 1)
    as they are (the channel stride doesn't matter for a size-1 dim), but convolutions pick their
    layout from the strides and then run every layer NCHW: cnn_s on 28 px grayscale trained 1.7x
    slower that way on CPU. The same memory viewed with strides (HW, 1, W, 1) is read as NHWC.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 1 and x.stride(1) != 1 and not torch.jit.is_tracing():
        x = x.as_strided(x.shape, (x.shape[2] * x.shape[3], 1, x.shape[3], 1))
    return x


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero whole residual branches per sample with probability `drop_prob`, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # one draw per sample
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) for the residual branch it wraps; identity in eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


_PLAIN = [False]


@contextlib.contextmanager
def plain_ops():
    """Within this context models run the reference path: every layer is a module call, no fused
    kernels, no residual adds folded into GEMMs (used by the layer summary; same values)."""
    _PLAIN.append(True)
    try:
        yield
    finally:
        _PLAIN.pop()


def fold_residuals(x: torch.Tensor) -> bool:
    """True when a residual add may be folded into the preceding GEMM (not under autocast, whose
    lower-precision GEMM output would otherwise become the float32 residual stream)."""
    if _PLAIN[-1]:
        return False
    try:
        return not torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type without autocast (e.g. "meta" in shape-only builds)
        return True


def fused_cpu_inference(x: torch.Tensor, module: nn.Module) -> bool:
    """True when `module` may run on oneDNN's fused CPU linear kernels (bias, GELU and the residual add
    done inside the GEMM, one memory pass saved per op): `_fastpaths.fast_path_ok` (fp32 CPU, autograd
    off, no autocast/tracing/compiling/dispatch mode, so ONNX export and FLOP counting see the plain
    ops, which compute the same function) and the module in eval mode."""
    return not _PLAIN[-1] and not module.training and fast_path_ok(x)


def linear(x: torch.Tensor, layer: nn.Linear, fused: bool) -> torch.Tensor:
    """layer(x); on oneDNN when `fused` (the bias is added inside the GEMM instead of copied first)."""
    if fused:
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    return layer(x)


def linear_residual(x: torch.Tensor, layer: nn.Linear, shortcut: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """shortcut + layer(x), with the add folded into the GEMM.

    `fused`: oneDNN's linear+add kernel (CPU inference). Otherwise `addmm(shortcut, x, W^T)` accumulates
    onto the shortcut (GEMM beta=1) and the bias is added in place: one memory pass and one allocation
    fewer than `shortcut + layer(x)`, and autograd-safe (addmm's backward does not need its output).
    Under autocast (see `fold_residuals`) the plain form is kept.
    """
    if fused:
        return linear_add(x, shortcut, layer.weight, layer.bias)
    if not fold_residuals(x) or layer.bias is None or not (x.dtype == shortcut.dtype == layer.weight.dtype):
        return shortcut + layer(x)
    out = torch.addmm(shortcut.reshape(-1, shortcut.shape[-1]), x.reshape(-1, x.shape[-1]), layer.weight.t())
    return out.add_(layer.bias).view(shortcut.shape)


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout, on the last axis (timm's `Mlp`, same key names).

    `forward_residual(x, shortcut)` = shortcut + mlp(x) for a block whose drop path is inactive: the
    residual add is folded into fc2's GEMM, and in CPU inference the whole MLP runs as two fused
    oneDNN kernels (fc1+bias+GELU, fc2+bias+residual) instead of five memory passes.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    def forward_residual(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        if fused_cpu_inference(x, self) and type(self.act) is nn.GELU and self.act.approximate == "none":
            return linear_residual(linear_gelu(x, self.fc1.weight, self.fc1.bias), self.fc2, shortcut, fused=True)
        if self.training and self.drop2.p > 0:
            return shortcut + self(x)
        return linear_residual(self.drop1(self.act(self.fc1(x))), self.fc2, shortcut)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping `patch_size` squares and project each to `embed_dim`.

    Output: (B, N, E) tokens in row-major patch order when `flatten` (N = (H/p)*(W/p)), else the grid
    as NCHW; `output_fmt` "NHWC" gives the grid channels-last (Swin), "LNC" token-major (N, B, E) (Mixer). The projection is stored as a conv
    (`proj.weight` (E, C, p, p)) for timm compatibility, but computed as one matmul over patchified
    pixels: for kernel == stride this is the same linear map, and on CPU the GEMM (and its backward)
    is faster than the strided convolution.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768,
                 flatten: bool = True, norm_layer=None, output_fmt: str | None = None, strict_img_size: bool = True):
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        for s, p in zip(self.img_size, self.patch_size):
            if s % p:
                raise UserError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}: "
                                f"pick an img_size that is a multiple of {p}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.strict_img_size = strict_img_size  # False: any multiple of the patch size (ViT resamples pos-embed)
        self.output_fmt = output_fmt or ("NLC" if flatten else "NCHW")
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        (ph, pw), (gh, gw) = self.patch_size, (H // self.patch_size[0], W // self.patch_size[1])
        if (H, W) != self.img_size and (self.strict_img_size or H % ph or W % pw):
            raise ValueError(f"input is {H}x{W} but the model was built for {self.img_size[0]}x{self.img_size[1]}; "
                             f"resize the images or build the model with img_size={H}")
        # (B, C, gh, ph, gw, pw) -> (B, gh, gw, C, ph, pw) -> (B, gh*gw, C*ph*pw): patch pixels in the
        # conv weight's (C, ph, pw) order, so F.linear with proj.weight viewed as (E, C*ph*pw) == conv.
        # "LNC" (token-major, for Mixer) puts the batch after the tokens in the same single copy.
        order = (2, 4, 0, 1, 3, 5) if self.output_fmt == "LNC" else (0, 2, 4, 1, 3, 5)
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(*order).reshape(-1, C * ph * pw)
        x = F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
        x = self.norm(x)
        if self.output_fmt == "LNC":
            return x.view(gh * gw, B, -1)  # (N, B, E)
        if self.output_fmt == "NLC":
            return x.view(B, gh * gw, -1)  # (B, N, E)
        x = x.reshape(B, gh, gw, -1)  # (B, gh, gw, E)
        return x if self.output_fmt == "NHWC" else x.permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map (ConvNeXt's "channels_first" LN); timm names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
