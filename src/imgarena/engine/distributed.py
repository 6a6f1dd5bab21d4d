"""Multi-process training under `torchrun`: environment detection, process group, metric reduction.

`torchrun --nproc_per_node=N -m imgarena train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them everything here degrades to a single process and costs nothing. Backend: NCCL on CUDA, gloo on
CPU. Only rank 0 writes files (`DistInfo.is_main`).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

from imgarena.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def available_devices() -> list[str]:
    """The devices this PyTorch can use here, for messages: cpu, cuda:0.., mps."""
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The one place a --device value becomes a torch.device (train, eval, predict, compare, bench).

    'auto' -> this rank's CUDA device when available, else CPU; 'cuda' under torchrun ->
    cuda:LOCAL_RANK. A device that does not exist here is a UserError naming what does."""
    text = str(name or "auto").strip().lower()
    if text == "auto":
        text = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif text == "cuda":
        text = f"cuda:{local_rank}"
    have = available_devices()
    kind = text.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r} not understood: use auto, cpu, cuda, cuda:N or mps "
                        f"(available here: {', '.join(have)})")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {name!r} not understood: use auto, cpu, cuda, cuda:N or mps "
                        f"(available here: {', '.join(have)})") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "mps":
        if "mps" not in have:
            raise UserError(f"--device {name}: Apple MPS is not available to this PyTorch (available here: "
                            f"{', '.join(have)})")
        return dev
    if f"cuda:{dev.index}" not in have:
        seen = sum(n.startswith("cuda") for n in have)
        raise UserError(f"--device {name}: " + (f"only {seen} CUDA GPU(s) visible" if seen else
                                                 "no CUDA GPU is visible to PyTorch")
                        + f" (available here: {', '.join(have)})")
    return dev


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun; pick this rank's device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, owns_group=owns)


def cleanup(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.owns_group and dist.is_initialized():
        # Free the DDP wrappers (their reducers hold the group) while the group is alive. Without
        # this and the barrier in run_training, rank 0 of a 2-process gloo run aborted at exit in
        # ~1 run of 7 ("terminate called without an active exception", in C++ teardown after
        # Python had finished; tests/test_ddp.py); with both, 22 runs in a row exited cleanly.
        gc.collect()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.enabled:
        dist.barrier()


def all_reduce_sums(info: DistInfo, values: dict[str, float]) -> dict[str, float]:
    """Sum each value across ranks (float64 on the backend's device); identity in one process."""
    if not info.enabled or not values:
        return dict(values)
    import torch.distributed as dist

    keys = sorted(values)
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def rank0_value(info: DistInfo, value: float) -> float:
    """Rank 0's `value` on every rank (one float64 broadcast; identity in one process). Used for the
    training clock, so every rank derives the same time-based lr and stops at the same step."""
    if not info.enabled:
        return float(value)
    import torch.distributed as dist

    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    dist.broadcast(t, src=0)
    return float(t.item())


def broadcast_object(info: DistInfo, obj):
    """Rank 0's `obj` on every rank (e.g. the run folder name)."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model, info: DistInfo):
    """DistributedDataParallel around `model` when world_size > 1; the model itself otherwise."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def sync_buffers(model, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank before evaluating, so each
    rank's shard is scored by exactly the model rank 0 saves."""
    if not info.enabled:
        return
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b.data, src=0)
