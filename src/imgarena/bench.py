"""Speed without data: train-step and inference throughput, latency, FLOPs, params and peak memory.

The Mixer paper's throughput column, measured on the user's own machine. Inputs are random tensors
made once on the device, so only the model is timed (no decoding, no host-to-device copies).
Every measurement runs `warmup` untimed calls first (allocator, cuDNN autotuning, lazy init), then
`repeats` timed calls, each synchronised on CUDA; we report the median (typical) and the min (best
case, least disturbed by other processes) and, for latency, the 95th percentile.

Peak memory ("peak_mem_mb") means the same thing on every device: the model's weights plus
everything the measured call allocates on top of them (activations, gradients, optimizer state,
temporaries).
- CUDA: `torch.cuda.max_memory_allocated()` growth during the call, i.e. live tensors only (the
  caching allocator's reserved-but-free blocks are not counted).
- CPU: growth of the process's peak resident set size. On Linux the peak (VmHWM) is reset through
  `/proc/self/clear_refs` first, so each measurement stands alone; elsewhere `ru_maxrss` cannot be
  reset and only growth beyond the process's earlier peak shows (a lower bound). RSS counts pages,
  so it includes allocator slack; it is a process-level number, not a tensor count.

`compare.py` reuses `measure_inference` and `measure_train_step` for its speed columns.
"""

from __future__ import annotations

import ctypes
import functools
import re
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from imgarena.config import BenchConfig
from imgarena.engine.distributed import resolve_device
from imgarena.engine.evaluate import autocast
from imgarena.config import AMP_MODES
from imgarena.engine.evaluate import resolve_amp
from imgarena.errors import UserError

MB = 1024 * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, *, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds taken by each of `repeats` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summarize_times(times: list[float], batch_size: int) -> dict:
    """Median/min/p95 milliseconds per call and images per second at the median."""
    t = torch.tensor(times, dtype=torch.float64)
    med = float(t.median())
    return {
        "median_ms": med * 1e3,
        "min_ms": float(t.min()) * 1e3,
        "p95_ms": float(torch.quantile(t, 0.95)) * 1e3,
        "img_s": batch_size / med if med > 0 else float("inf"),
        "repeats": len(times),
    }


# ---------------------------------------------------------------- peak memory

def _proc_status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where that is not possible."""
    try:
        # Give freed heap memory back first, so the baseline is not inflated by an earlier model.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, kB on Linux


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.bytes`: memory allocated on top of what was in
    use when the block started (see the module docstring for what that means on each device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif _reset_peak_rss():
            self._start = _proc_status_kb("VmRSS") * 1024
            self._read = lambda: _proc_status_kb("VmHWM") * 1024
        else:
            self._start = _maxrss_bytes()
            self._read = _maxrss_bytes
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._read()
        self.bytes = max(0, peak - self._start)
        return False


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ---------------------------------------------------------------- measurements

@functools.cache
def _prime(device: torch.device) -> None:
    """One tiny train step per process and device, so one-time costs (autograd engine threads, lazy
    kernels and imports) are not charged to the first model measured."""
    net = torch.nn.Linear(8, 2).to(device)
    opt = torch.optim.AdamW(net.parameters())
    F.cross_entropy(net(torch.randn(4, 8, device=device)), torch.zeros(4, dtype=torch.long, device=device)).backward()
    opt.step()
    with torch.inference_mode():
        net(torch.randn(4, 8, device=device))


def _input(model, batch_size: int, input_shape, device, channels_last: bool):
    x = torch.randn((batch_size, *input_shape), device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def measure_inference(model, input_shape, batch_size: int, *, device, amp: str = "auto",
                      warmup: int = 3, repeats: int = 10, channels_last: bool = False) -> dict:
    """Forward passes in eval mode on one random batch: timing summary plus peak_mem_mb."""
    _prime(device)
    model.eval()
    x = _input(model, batch_size, input_shape, device, channels_last)
    dtype = resolve_amp(amp, device)

    def step():
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    with PeakMemory(device) as pm:
        times = time_calls(step, device=device, warmup=warmup, repeats=repeats)
    out = summarize_times(times, batch_size)
    out["peak_mem_mb"] = (model_bytes(model) + pm.bytes) / MB
    return out


def measure_train_step(model, input_shape, batch_size: int, *, num_classes: int, device, amp: str = "auto",
                       warmup: int = 3, repeats: int = 10, channels_last: bool = False) -> dict:
    """Forward + cross-entropy + backward + AdamW step on one random batch (weights change in memory).

    The optimizer is created inside the measurement so its state counts towards peak memory."""
    _prime(device)
    model.train()
    x = _input(model, batch_size, input_shape, device, channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    dtype = resolve_amp(amp, device)
    with PeakMemory(device) as pm:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        times = time_calls(step, device=device, warmup=warmup, repeats=repeats)
        del opt
    model.zero_grad(set_to_none=True)
    out = summarize_times(times, batch_size)
    out["peak_mem_mb"] = (model_bytes(model) + pm.bytes) / MB
    return out


def model_stats(model, input_shape) -> dict:
    """Params and forward FLOPs per image (None where FLOP counting fails for an exotic op)."""
    from imgarena.models.flops import count_flops, count_params

    try:
        flops = count_flops(model, tuple(input_shape))
    except Exception:  # a counting failure must not hide the timings
        flops = None
    return {"params": count_params(model), "flops": flops}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def failure_reason(e: BaseException) -> str:
    """One line saying why a model failed, for tables and results files."""
    if _is_oom(e):
        return "out of memory"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def bench_model(name: str, cfg: BenchConfig, device: torch.device) -> list[dict]:
    """Rows (one per batch size and mode) for one model; a failure becomes a row with `error`."""
    from imgarena.models import create_model

    shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
    base = {"model": name, "device": str(device), "img_size": cfg.img_size}
    try:
        model = create_model(name, num_classes=cfg.num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size)
        stats = model_stats(model, shape)
        model = model.to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
    except Exception as e:
        return [{**base, "error": failure_reason(e)}]
    rows = []
    for bs in cfg.batch_sizes:
        for mode in cfg.modes:
            row = {**base, **stats, "mode": mode, "batch_size": bs}
            kw = dict(device=device, amp=cfg.amp, warmup=cfg.warmup, repeats=cfg.repeats,
                      channels_last=cfg.channels_last)
            try:
                if mode == "train":
                    row.update(measure_train_step(model, shape, bs, num_classes=cfg.num_classes, **kw))
                else:
                    row.update(measure_inference(model, shape, bs, **kw))
            except Exception as e:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row["error"] = failure_reason(e)
            rows.append(row)
    return rows


def validate_bench(cfg: BenchConfig) -> None:
    from imgarena.models import get_entry

    if not cfg.models:
        raise UserError("no models to bench: pass --models a,b (see `imgarena models`)")
    for name in cfg.models:
        if not name.startswith("timm/"):
            get_entry(name)  # unknown name -> UserError with close matches
    if not cfg.batch_sizes or any(b < 1 for b in cfg.batch_sizes):
        raise UserError(f"batch sizes must be positive integers, got {cfg.batch_sizes}: e.g. --batch-sizes 1,64")
    bad = set(cfg.modes) - {"train", "infer"}
    if bad or not cfg.modes:
        raise UserError(f"unknown bench mode {sorted(bad)}: use --modes train,infer")
    if cfg.amp not in AMP_MODES:
        raise UserError(f"unknown amp mode {cfg.amp!r}: use one of {', '.join(AMP_MODES)}")
    if cfg.img_size < 1 or cfg.in_chans < 1 or cfg.warmup < 0 or cfg.repeats < 1:
        raise UserError("--img-size, --in-chans and --repeats must be >= 1 and --warmup >= 0")


def run_bench(cfg: BenchConfig, *, on_row=None) -> list[dict]:
    """Bench every model at every batch size; `on_row(row)` is called as each row is measured."""
    validate_bench(cfg)
    device = resolve_device(cfg.device)
    rows = []
    for name in cfg.models:
        for row in bench_model(name, cfg, device):
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
