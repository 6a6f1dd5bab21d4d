"""Confidence you can trust: temperature scaling, expected calibration error, reliability diagrams
and the accuracy-vs-coverage table behind `--min-prob`.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted on the validation
split by minimising the negative log-likelihood; T > 1 softens an overconfident model. It never
changes the argmax, so accuracy is untouched. Only numpy here (scipy and matplotlib are imported
where used), so the torch-free ONNX path can apply a stored temperature.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from imgarena.errors import UserError

log = logging.getLogger(__name__)

T_BOUNDS = (0.05, 20.0)
ECE_BINS = 15
MIN_FIT = 20  # fewer val images than this: no temperature is fitted (it would fit noise)
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_TINY = np.float64(np.finfo(np.float32).tiny)  # a probability that underflowed to 0 in float32


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log(probs): equal to the logits up to a per-row constant, which temperature scaling ignores."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), _TINY))


def scaled_probs(logits: np.ndarray, temperature: float | None) -> np.ndarray:
    """softmax(logits / T) in float64 (T None or 1: plain softmax)."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature:
        z = z / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def recalibrate(probs: np.ndarray, temperature: float | None) -> np.ndarray:
    """Softmax probabilities -> softmax(logits / T), without needing the logits."""
    return scaled_probs(log_probs(probs), temperature) if temperature else np.asarray(probs, dtype=np.float64)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `targets` under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    t = np.asarray(targets, dtype=np.int64)
    return float(np.mean(lse - z[np.arange(len(t)), t])) if len(t) else 0.0


def fit_temperature(logits: np.ndarray, targets: np.ndarray, bounds=T_BOUNDS) -> float:
    """The T in `bounds` minimising the NLL of softmax(logits / T) (bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        raise ValueError("fit_temperature needs at least one example")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    res = minimize_scalar(lambda s: nll(logits, targets, math.exp(s)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-4})
    t = float(math.exp(res.x))
    # the bounded search never evaluates T = 1 exactly: keep "no scaling" when it is at least as good
    return t if nll(logits, targets, t) <= nll(logits, targets, 1.0) else 1.0


def reliability_bins(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin (equal width over [0, 1]): its range, count, mean confidence and accuracy."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == targets) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)  # (lo, hi]; 0 goes to the first
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                    "confidence": float(conf[m].mean()) if n else None, "accuracy": float(correct[m].mean()) if n else None})
    return out


def ece(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    n = len(targets)
    if n == 0:
        return 0.0
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, targets, bins)
                     if b["count"]) / n)


def plot_reliability(targets: np.ndarray, curves: dict, path, *, title: str = "", bins: int = ECE_BINS) -> None:
    """Reliability diagram: accuracy against confidence per bin for each {name: probs}, with ECE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imgarena.checkpoint import atomic_write

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for (name, probs), marker in zip(curves.items(), "os^v"):
        rows = [b for b in reliability_bins(probs, targets, bins) if b["count"]]
        ax.plot([b["confidence"] for b in rows], [b["accuracy"] for b in rows], marker=marker, linewidth=1.5,
                label=f"{name} (ECE {ece(probs, targets, bins):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def coverage_table(probs: np.ndarray, targets: np.ndarray, thresholds=THRESHOLDS) -> list[dict]:
    """Per threshold P: the share of rows kept (top probability >= P), the accuracy on those, and
    how many are kept. What `--min-prob P` would give on this data."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == targets) if len(probs) else np.zeros(0, bool)
    out = []
    for p in thresholds:
        keep = conf >= p
        k = int(keep.sum())
        out.append({"threshold": float(p), "coverage": k / len(conf) if len(conf) else 0.0, "kept": k,
                    "accuracy": float(correct[keep].mean()) if k else None})
    return out


def threshold_for_coverage(probs: np.ndarray, coverage: float) -> float:
    """The largest P that still keeps at least `coverage` of these rows."""
    conf = np.sort(np.asarray(probs, dtype=np.float64).max(axis=1))[::-1]
    if not len(conf):
        return 0.0
    return float(conf[max(0, min(len(conf) - 1, math.ceil(coverage * len(conf)) - 1))])


def format_coverage(table: list[dict]) -> str:
    lines = ["min-prob  coverage  accuracy    kept"]
    for r in table:
        acc = "     -" if r["accuracy"] is None else f"{r['accuracy']:7.2%}"
        lines.append(f"{r['threshold']:8.2f}  {r['coverage']:7.1%}  {acc:>8}  {r['kept']:6d}")
    return "\n".join(lines)


def temperature_of(meta: dict, source) -> float | None:
    """A calibration temperature from checkpoint meta / an ONNX sidecar ("temperature" or
    "calibration": {"temperature": T}); None when the model is uncalibrated (or T is 1)."""
    cal = meta.get("calibration")
    t = meta.get("temperature", cal.get("temperature") if isinstance(cal, dict) else None)
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise UserError(f"{source}: calibration temperature must be a positive number, got {t!r}: re-run the calibration")
    return None if t == 1 else float(t)


def check_min_prob(value, what: str = "--min-prob") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{what} must be a probability between 0 and 1, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- the end of training

def calibrate_run(run_dir, probs: np.ndarray, targets: np.ndarray, *, title: str = "", test=None) -> dict:
    """Fit T on the val outputs of the best checkpoint, store it in best.safetensors' metadata
    (weights bitwise unchanged), draw reliability.png, and return the summary.json fields.
    `test`: optional (probs, targets) of a held-out split, scored before/after too."""
    from imgarena.checkpoint import read_checkpoint, save_checkpoint

    run_dir = Path(run_dir)
    probs = np.asarray(probs)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) < MIN_FIT:
        log.warning("no calibration: only %d val images (needs %d)", len(targets), MIN_FIT)
        return {}
    logits = log_probs(probs)
    t = fit_temperature(logits, targets)
    after = scaled_probs(logits, t)
    block = {"method": "temperature", "temperature": round(t, 6), "fit_on": "val", "n": int(len(targets)),
             "ece_before": ece(probs, targets), "ece_after": ece(after, targets),
             "nll_before": nll(logits, targets), "nll_after": nll(logits, targets, t), "bins": ECE_BINS}
    if test is not None and len(test[1]):
        tp, tt = np.asarray(test[0]), np.asarray(test[1], dtype=np.int64)
        block.update(test_ece_before=ece(tp, tt), test_ece_after=ece(recalibrate(tp, t), tt))
    path = run_dir / "best.safetensors"
    sd, meta = read_checkpoint(path)
    meta["calibration"] = block
    save_checkpoint(path, sd, meta)
    try:
        plot_reliability(targets, {"before": probs, f"after (T={t:.2f})": after}, run_dir / "reliability.png",
                         title=(title + " - " if title else "") + "reliability on val")
    except Exception as e:  # a plot is a convenience; the calibration is stored either way
        log.warning("reliability.png not written: %s", e)
    log.info("temperature %.3f fitted on %d val images: ECE %.4f -> %.4f", t, len(targets), block["ece_before"],
             block["ece_after"])
    return {"temperature": block["temperature"], "ece_before": block["ece_before"], "ece_after": block["ece_after"],
            **{k: block[k] for k in ("test_ece_before", "test_ece_after") if k in block}}
