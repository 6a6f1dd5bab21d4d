"""Will this model fit? A parameter count taken before any weight is allocated, checked against
the memory the machine really has, so `--img-size 4096` on an MLP is one clear line, not a 40 GB
allocation that ends in the OOM killer.

The count comes from building the model on the "meta" device (shapes only, no memory). Weight-init
ops are skipped there (`_SkipInitOnMeta`): several of them (normal_, trunc_normal_) have only Python
meta kernels that import torch._dynamo on first use, seconds of start-up for a count that does not
depend on values. The footprint is an estimate: fp32 weights; training adds gradients and AdamW's
two moments (4 x the weights). Activations depend on the batch size and are not included.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from imgarena.errors import UserError

try:
    import resource
except ImportError:  # Windows: no rlimits
    resource = None

TRAIN_FACTOR = 4  # weights + gradients + AdamW exp_avg + exp_avg_sq
# In-place ops that change a tensor's shape or metadata: these must still run on meta.
_SHAPE_OPS = {"resize_", "resize_as_", "set_", "as_strided_", "requires_grad_", "squeeze_", "unsqueeze_", "t_",
              "transpose_", "swapdims_", "swapaxes_", "share_memory_"}


class _SkipInitOnMeta(TorchFunctionMode):
    """Turn value-only in-place ops (init: normal_, uniform_, zero_, copy_, ...) on meta tensors into no-ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and name not in _SHAPE_OPS:
            t = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes the tensor by keyword
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def count_params_on_meta(build: Callable[[], torch.nn.Module]) -> int | None:
    """Parameters of `build()` built on the meta device, or None when the model can't be built there.

    A UserError (a bad option) is raised as is: the real build would raise the same. Anything else
    means only "not meta-constructible" (e.g. an init that reads values back); the real build then
    runs unchecked and raises its own error, with its traceback, if there is a real bug.
    """
    try:
        with torch.device("meta"), _SkipInitOnMeta():
            model = build()
    except UserError:
        raise
    except Exception:
        return None
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def default_device_is_meta() -> bool:
    return torch.empty(0).is_meta


# ---------------------------------------------------------------- what the machine has

def _read_kv(path: str) -> dict[str, str]:
    out = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":") if ":" in line else line.partition(" ")
                out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


def _kib(text: str | None) -> int | None:
    try:
        return int(str(text).split()[0]) * 1024
    except (ValueError, IndexError, TypeError):
        return None


def host_available() -> tuple[int | None, str]:
    """(bytes this process can still get, what limits it): the least of MemAvailable, the cgroup's
    headroom and the address-space rlimit's (ulimit -v). (None, "") where none can be read (non-Linux)."""
    limits = []
    mem = _kib(_read_kv("/proc/meminfo").get("MemAvailable"))
    if mem is not None:
        limits.append((mem, "this machine has"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                used = int(f.read())
            stat = _read_kv("/sys/fs/cgroup/memory.stat")
            reclaimable = int(stat.get("inactive_file", "0").split()[0] or 0)
            limits.append((max(0, int(cap) - used + reclaimable), "this container's memory limit leaves"))
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS) if resource else (None, None)
    if resource and soft != resource.RLIM_INFINITY:
        vm = _kib(_read_kv("/proc/self/status").get("VmSize"))
        limits.append((max(0, soft - (vm or 0)), "the address-space limit (ulimit -v) leaves"))
    return min(limits) if limits else (None, "")


def host_available_bytes() -> int | None:
    return host_available()[0]


def device_available_bytes(device) -> tuple[int | None, str]:
    """(free bytes, what they are) on `device`: host memory for CPU, free GPU memory for CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free), f"{device} has"
        except (RuntimeError, AssertionError):
            return None, ""
    if device.type == "cpu":
        return host_available()
    return None, ""  # mps, xpu...: no reliable free-memory query; don't refuse


# ---------------------------------------------------------------- the check

def _count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n < 10e9 else f"{n / 1e9:.0f} GB"


def check_fits(name: str, n_params: int, *, img_size: int | None = None, train_device=None,
               bytes_per_param: int | None = None) -> None:
    """UserError when the weights don't fit in host memory (the model is built there), or, with
    `train_device`, when weights + gradients + AdamW state don't fit on that device."""
    per = bytes_per_param or torch.empty(0, device="cpu").element_size()
    weights = n_params * per
    train = weights * TRAIN_FACTOR
    what = f"{name}{f' at {img_size} px' if img_size else ''} needs {_count(n_params)} parameters"
    advice = "use a smaller --img-size or a smaller model (fewer/narrower layers)"
    host, where = host_available()
    if host is not None and weights > host:
        raise UserError(f"{what} ({_gb(weights)} of weights, ~{_gb(train)} to train with AdamW); {where} "
                        f"{_gb(host)} available: {advice}")
    if train_device is not None:
        free, where = device_available_bytes(train_device)
        if free is not None and train > free:
            raise UserError(f"{what} (~{_gb(train)} to train with AdamW: weights, gradients and optimizer state, "
                            f"before activations); {where} {_gb(free)} available: {advice}")
