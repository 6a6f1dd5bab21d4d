"""CPU fast paths shared by the ConvNet families (ResNet, MobileNet, ConvNeXt).

1. Fused inference kernels. In eval-mode inference a conv + BatchNorm + ReLU is one convolution with
   folded weights and the activation (and a residual add) applied in its epilogue; a Linear + GELU,
   or a Linear + residual add, is one matmul with an epilogue. These are the kernels torch.compile's
   CPU backend emits (`torch.ops.mkldnn._convolution_pointwise` / `_linear_pointwise`); calling them
   directly saves the separate BN, activation, bias and add passes without a compile step. Every
   model keeps its plain reference forward, which is what autograd, CUDA, bf16/autocast, tracing,
   ONNX export and FLOP counting see: `fast_path_ok(x)` admits only plain fp32 CPU tensors with
   autograd off and no tracing, compiling or dispatch mode active.

2. `SmallMapConv2d`: on 28-32 px inputs the last stage's maps are 1x1, where a conv is a small
   matrix product over the few input pixels its window covers, but oneDNN still reorders the whole
   (mostly padding-facing) kernel on every call, forward and backward. Computing it as that matrix
   product is the same math (the dropped taps only ever multiply zero padding; their gradient is 0).

Both give the same results as the plain ops up to fp32 rounding (tests compare them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode


def _ops_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_AVAILABLE = _ops_available()


def fast_path_ok(x: torch.Tensor) -> bool:
    """True when the fused oneDNN kernels may replace the reference forward for input `x`."""
    if not _AVAILABLE or torch.is_grad_enabled() or type(x) is not torch.Tensor:
        return False  # autograd needs the reference ops; subclasses (fake/functional tensors) too
    if x.device.type != "cpu" or x.dtype != torch.float32 or not torch.backends.mkldnn.enabled:
        return False
    if torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return _get_current_dispatch_mode() is None  # e.g. FlopCounterMode counts the reference ops


def folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the one conv equal to eval-mode bn(conv(x)).

    Recomputed on every call (one pass over the weights, small next to the activations of a batch):
    a cache would go stale when weights are edited in place behind autograd's back (`p.data`).
    """
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # bn(y) = (y - mean) * scale + beta
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


_ACT = {"relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]), "none": ("none", [])}


def conv_bn_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str = "relu",
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(bn(conv(x)) [+ residual]) in eval mode, as one oneDNN convolution where that pays.

    Folding costs a pass over the weights on every call and saves a few passes over the output, so
    layers whose output is smaller than their weights (3x3 convs on tiny maps, e.g. ResNet stage 4
    at 32 px) run the same ops unfused.
    """
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    out_h, out_w = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
    if x.shape[0] * out_h * out_w * conv.out_channels < conv.weight.numel():
        y = bn(conv(x))
        if residual is not None:
            y += residual
        return y.relu_() if act == "relu" else y.clamp_(0.0, 6.0) if act == "relu6" else y
    w, b = folded_conv_bn(conv, bn)
    attr, scalars = _ACT[act]
    args = (w, b, conv.padding, conv.stride, conv.dilation, conv.groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, *args, attr, scalars, "")
    unary = None if attr == "none" else attr  # the binary kernel wants no unary op named, not "none"
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, unary, scalars, "")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x @ weight.T + bias) for 2-D x as one oneDNN matmul (exact erf GELU, like nn.GELU)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")


def linear_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """residual + x @ weight.T + bias for 2-D x as one oneDNN matmul."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and keys) that computes a conv with a 1x1 output map as one matmul
    (groups=1) or a per-channel dot product (depthwise) over the input window it covers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.padding, str) or self.dilation != (1, 1) or self.padding_mode != "zeros" or \
                self.groups not in (1, self.in_channels) or torch.jit.is_tracing():
            return super().forward(x)  # (and export: one static graph of plain convs)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        H, W = x.shape[-2:]
        if (H + 2 * ph - kh) // sh != 0 or (W + 2 * pw - kw) // sw != 0:
            return super().forward(x)  # the output is larger than 1x1
        # The one output sees input rows -ph .. kh-1-ph; keep the real ones and their kernel taps.
        r0, r1, c0, c1 = max(0, -ph), min(H, kh - ph), max(0, -pw), min(W, kw - pw)
        xw = x[:, :, r0:r1, c0:c1]  # (B, C_in, h, w)
        w = self.weight[:, :, r0 + ph:r1 + ph, c0 + pw:c1 + pw]  # (C_out, C_in / groups, h, w)
        if self.groups == 1:
            y = F.linear(xw.flatten(1), w.flatten(1), self.bias)  # (C, h, w) order on both sides
        else:  # depthwise (and channel multipliers): out channel o reads input channel o // mult
            mult = self.out_channels // self.in_channels
            y = (xw.repeat_interleave(mult, dim=1) if mult > 1 else xw).mul(w[:, 0]).sum((2, 3))
            y = y if self.bias is None else y + self.bias
        return y[:, :, None, None]  # (B, C_out, 1, 1)
