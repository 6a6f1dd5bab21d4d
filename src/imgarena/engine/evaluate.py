"""Evaluate a model on a loader: loss, accuracy, top-5, and optionally the per-image outputs.

Loss is plain cross-entropy (no label smoothing or class weights) so runs with different
recipes stay comparable. Sums are returned too, so distributed callers can all-reduce them.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch
import torch.nn.functional as F

from imgarena.errors import UserError


from imgarena.config import AMP_MODES  # noqa: E402,F401  (one copy of the choice list)
EVAL_SPLITS = ("auto", "test", "val", "train", "all")


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA, fp32 elsewhere (bf16 is ~100x slower on CPUs without AMX); off: fp32."""
    if mode not in AMP_MODES:
        raise UserError(f"--amp {mode!r}: use one of {', '.join(AMP_MODES)}")
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mode == "off":
        return None
    if device.type == "cpu":
        print(f"imgarena: warning: --amp {mode} on CPU is usually much slower than fp32", file=sys.stderr)
    return torch.bfloat16 if mode == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for `dtype` (bf16/fp16) on `device`; a no-op for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def evaluate(model, loader, *, num_classes: int, device, amp: torch.dtype | None = None,
             return_outputs: bool = False, tta: str | None = None) -> dict:
    """{loss, acc, top5 (None when num_classes <= 5), count, sums} and, with `return_outputs`,
    `probs` (N, K) float32, `preds` (N,) and `targets` (N,) numpy arrays in loader order.
    `tta` averages logits over test-time-augmented views (imgarena.evaluation.tta).

    Every image the loader yields is scored once. Under torchrun give each rank an unpadded shard
    (BatchLoader(pad=False)) and all-reduce `sums`: nothing in here is a collective, so ranks may
    run different numbers of batches (pass the bare model, not its DDP wrapper)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    probs, targets = [], []
    k = min(5, num_classes)
    if tta and tta != "none":
        from imgarena.evaluation.tta import tta_logits

        forward = lambda x: tta_logits(model, x, tta)  # noqa: E731
    else:
        forward = model
    try:
        for x, y in loader:
            with autocast(device, amp):
                logits = forward(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            if num_classes > 5:
                top5 += (logits.topk(k, dim=1).indices == y[:, None]).any(1).sum()
            count += int(y.shape[0])
            if return_outputs:
                probs.append(logits.softmax(1).cpu().numpy())
                targets.append(y.cpu().numpy())
    finally:
        model.train(was_training)
    sums = {"loss_sum": float(loss_sum), "correct": float(correct), "top5": float(top5), "count": float(count)}
    out = metrics_from_sums(sums, num_classes)
    out["sums"] = sums
    if return_outputs:
        out["probs"] = np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32)
        out["targets"] = np.concatenate(targets) if targets else np.zeros((0,), np.int64)
        out["preds"] = out["probs"].argmax(1) if len(out["probs"]) else np.zeros((0,), np.int64)
    return out


def metrics_from_sums(sums: dict, num_classes: int) -> dict:
    """loss / acc / top5 from (possibly all-reduced) sums."""
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss_sum"] / n, "acc": sums["correct"] / n,
            "top5": sums["top5"] / n if num_classes > 5 else None, "count": int(sums["count"])}
