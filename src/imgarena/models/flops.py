"""Parameter and FLOP counts.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and
attention (a multiply-add = 2 FLOPs) by running one real forward pass of a single image. Elementwise
ops (norms, activations) are not counted, as in the papers' tables.
"""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def count_flops(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> int:
    """Forward FLOPs for one image of `input_shape` (C, H, W); default: the model's `input_spec`."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    if input_shape is None:
        spec = model.input_spec
        input_shape = (spec["in_chans"], spec["img_size"], spec["img_size"])
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_cpu_kernels(sdpa_flop_count)) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _cpu_kernels(sdpa_flop_count) -> dict:
    """FLOP formula for the CPU fused attention kernel, which PyTorch's table misses (QK^T and AV,
    counted as for the CUDA kernels). Fused oneDNN fast paths never run under a dispatch mode such
    as the counter (`_fastpaths.fast_path_ok`), so the plain ops are what gets counted."""
    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)}


def model_stats(name: str, **kwargs) -> dict:
    """{params, flops, img_size, in_chans} of registered model `name` at its default input size.

    The model is built on the "meta" device (shapes only, no memory, no init cost), so even ViT-H
    is counted instantly; a model that cannot be built that way is built for real on the CPU.
    """
    from imgarena.models import create_model

    try:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
        spec = model.input_spec
        flops = count_flops(model, (spec["in_chans"], spec["img_size"], spec["img_size"]))
    except (NotImplementedError, RuntimeError):
        model = create_model(name, **kwargs)
        spec = model.input_spec
        flops = count_flops(model, (spec["in_chans"], spec["img_size"], spec["img_size"]))
    return {"params": count_params(model), "flops": flops, "img_size": spec["img_size"], "in_chans": spec["in_chans"]}
