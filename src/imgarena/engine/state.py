"""Resumable training state (`state.pt`): everything needed to continue a killed run exactly.

Model, optimizer, schedule, EMA, grad scaler, RNG states, position (epoch, batch within the epoch,
optimizer step), the partial epoch's running sums, best metric, patience counter and metric
history. Only tensors and plain Python containers go in, so it loads with
`torch.load(weights_only=True)`; it is written atomically, so a kill mid-write keeps the previous one.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from imgarena.checkpoint import atomic_torch_save
from imgarena.errors import UserError

STATE_FILE = "state.pt"
STATE_VERSION = 1


def capture_rng(device: torch.device | None = None) -> dict:
    """Global RNG states (torch CPU/CUDA, numpy, python) as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": _to_lists(random.getstate()),
    }
    if device is not None and device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuples(state["python"]))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """A distinct 63-bit seed per (seed, epoch, step, rank): global RNG use (dropout, drop-path) is
    reseeded from it every step, so a run resumed at any step draws the same numbers."""
    x = (int(seed) * 1_000_003 + int(epoch)) * 1_000_003 + int(step)
    x = (x * 1_009 + int(rank)) & ((1 << 63) - 1)
    # splitmix64 finaliser: neighbouring steps get unrelated seeds
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & ((1 << 64) - 1)
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def save_state(run_dir, state: dict) -> Path:
    path = Path(run_dir) / STATE_FILE
    atomic_torch_save({"version": STATE_VERSION, **state}, path)
    return path


def load_state(run_dir) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: --resume needs a run folder written by `imgarena train` "
                        "(it saves state.pt at every epoch end)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file; atomic writes mean ours are never torn
        raise UserError(f"{path} is not a readable training state ({str(e).splitlines()[0]}): "
                        "start a new run instead of --resume") from None
    if state.get("version") != STATE_VERSION:
        raise UserError(f"{path} was written by another imgarena version: start a new run")
    return state
