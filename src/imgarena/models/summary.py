"""A layer-by-layer table of a model (like torchsummary in seed 004): name, type, output shape, params.

One forward pass of a single zero image records, for every leaf module (and every module that owns
parameters directly, e.g. ViT's position embedding), the shape it returns. Params per row are the
module's own (non-recursive) parameters, so the column sums to the model total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imgarena.models._layers import plain_ops
from imgarena.models.flops import count_flops, count_params


@dataclass
class LayerRow:
    name: str  # dotted module path ("blocks.0.mlp.fc1")
    type: str  # class name
    output_shape: str  # e.g. "[B, 64, 128]"; "B" marks the axis that grows with the batch ("[B*16, 16, 96]");
    # "-" for a layer whose weights its parent uses directly (see `summarize`)
    params: int  # parameters counted on this row (its own, plus those of children it uses directly)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    return None


def _trace(model: nn.Module, input_shape, batch: int) -> list[tuple[str, nn.Module, tuple]]:
    """(name, module, output shape) of every module call, in call order, for a batch of zeros."""
    calls: list = []
    names = {id(m): n for n, m in model.named_modules()}

    def pre(mod, args):
        calls.append([names[id(mod)], mod, ()])
        mod._summary_call = len(calls) - 1

    def post(mod, args, out):
        t = _first_tensor(out)
        calls[mod._summary_call][2] = tuple(t.shape) if t is not None else ()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    p = next(model.parameters(), None)
    x = torch.zeros((batch, *input_shape), device=p.device if p is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        # Module calls everywhere: plain ops (and autograd on, which also turns off the ConvNets'
        # fused inference kernels), so no fused kernel hides a layer.
        with torch.enable_grad(), plain_ops():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for m in model.modules():
            m.__dict__.pop("_summary_call", None)
    return calls


def _shape_str(one: tuple, two: tuple) -> str:
    dims = [("B" if a == 1 else f"B*{a}") if b == 2 * a and a else str(a) for a, b in zip(one, two)]
    return "[" + ", ".join(dims) + "]"


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerRow]:
    """Rows in call order: every leaf module called, every module that owns parameters directly, and
    every module whose children's weights it uses without calling them (PatchEmbed's conv, an MLP
    whose fc2 runs inside a fused residual GEMM). Such uncalled layers follow as rows of their own
    with output shape "-", so the params column always sums to the model total."""
    calls1, calls2 = _trace(model, input_shape, 1), _trace(model, input_shape, 2)
    own = {m: sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()}
    called = {id(c[1]) for c in calls1}
    names = dict(model.named_modules())
    orphans: dict[str, list[str]] = {}  # called ancestor -> its never-called, parameter-owning descendants
    for name, m in names.items():
        if own[m] and id(m) not in called:
            parent = name
            while parent and id(names[parent]) not in called:
                parent = parent.rsplit(".", 1)[0] if "." in parent else ""
            orphans.setdefault(parent, []).append(name)
    rows = []
    for (name, m, s1), (_, _, s2) in zip(calls1, calls2):
        if m is model or (name == "model" and hasattr(model, "model")):  # the root (or a wrapped timm root)
            continue
        if list(m.children()) and not own[m] and name not in orphans:
            continue
        rows.append(LayerRow(name, type(m).__name__, _shape_str(s1, s2), own[m]))
    for parent, kids in orphans.items():
        prefix = parent + "." if parent else ""
        inside = [i for i, r in enumerate(rows) if r.name == parent or r.name.startswith(prefix)]
        at = max(inside, default=len(rows) - 1)
        rows[at + 1:at + 1] = [LayerRow(k, type(names[k]).__name__, "-", own[names[k]]) for k in kids]
    return rows


def format_summary(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """The table plus totals (params, trainable, GFLOPs, activation and parameter memory in MB)."""
    rows = summarize(model, input_shape)
    header = ("Layer", "Type", "Output shape", "Params")
    body = [(r.name, r.type, r.output_shape, f"{r.params:,}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = "-" * (sum(widths) + 3 * (len(widths) - 1))

    def fmt(cols):
        return "   ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))

    total, trainable = count_params(model), count_params(model, trainable_only=True)
    act_mb = sum(4 * _numel(r.output_shape) for r in rows) * 2 / 2**20  # forward + backward, fp32, per image
    lines = [line, fmt(header), line, *map(fmt, body), line,
             f"Input shape: {list(input_shape)}",
             f"Total params: {total:,}",
             f"Trainable params: {trainable:,}",
             f"Non-trainable params: {total - trainable:,}",
             f"Forward GFLOPs per image: {count_flops(model, tuple(input_shape)) / 1e9:.3f}",
             f"Forward/backward pass size per image (MB): {act_mb:.2f}",
             f"Params size (MB): {total * 4 / 2**20:.2f}",
             line]
    return "\n".join(lines)


def _numel(shape: str) -> int:
    """Elements per image of a shape string ("[B, 64, 128]" -> 8192; "-" or "[]" -> 0)."""
    if shape in ("[]", "-"):
        return 0
    n = 1
    for d in shape.strip("[]").split(", "):
        n *= int(d.split("*")[-1]) if d != "B" else 1
    return n
