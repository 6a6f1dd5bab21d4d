"""One training epoch: forward under autocast, (soft-target) cross-entropy, gradient accumulation,
clipping, optimizer and per-step schedule, EMA.

Exact resume rests on three rules kept here: every step reseeds the global RNG from
(seed, epoch, batch, rank); mixup/cutmix draw from their own generator seeded the same way; and the
epoch's running sums live in float64 tensors that are saved as they are (`EpochMeter`), so a run
resumed at any optimizer step adds the same numbers in the same order as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from imgarena.engine.evaluate import autocast
from imgarena.engine.state import step_seed


@dataclass
class StepSettings:
    """How each step trains; built once by run_training from TrainConfig."""

    device: torch.device
    num_classes: int
    seed: int = 0
    rank: int = 0
    amp: torch.dtype | None = None
    scaler: object | None = None  # torch.amp.GradScaler for fp16 on CUDA
    accum_steps: int = 1
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    class_weights: torch.Tensor | None = None
    log_every: int = 10  # progress refresh interval in batches


@dataclass
class EpochMeter:
    """Running sums of the current epoch; saved in state.pt for mid-epoch resume."""

    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    seen: int = 0
    batches: int = 0  # batches of this epoch already consumed (the loader's start_step on resume)
    time: float = 0.0  # seconds spent in training steps this epoch

    def to(self, device) -> "EpochMeter":
        self.loss_sum = self.loss_sum.to(device)
        self.correct = self.correct.to(device)
        return self

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum.detach().cpu().clone(), "correct": self.correct.detach().cpu().clone(),
                "seen": self.seen, "batches": self.batches, "time": self.time}

    @classmethod
    def from_state(cls, s: dict) -> "EpochMeter":
        return cls(loss_sum=s["loss_sum"].clone(), correct=s["correct"].clone(), seen=int(s["seen"]),
                   batches=int(s["batches"]), time=float(s["time"]))

    def summary(self) -> dict:
        n = max(self.seen, 1)
        return {"loss": float(self.loss_sum) / n, "acc": float(self.correct) / n, "seen": self.seen,
                "time": self.time, "img_s": self.seen / self.time if self.time > 0 else 0.0}


def mixing(s: StepSettings) -> bool:
    return s.mixup > 0 or s.cutmix > 0


def compute_loss(logits: torch.Tensor, target: torch.Tensor, s: StepSettings) -> torch.Tensor:
    """Cross-entropy on hard labels (with label smoothing) or on soft targets (mixup/cutmix already
    folded the smoothing into them); optional per-class weights."""
    logits = logits.float()
    if target.ndim == 2:
        return F.cross_entropy(logits, target, weight=s.class_weights)
    return F.cross_entropy(logits, target, weight=s.class_weights, label_smoothing=s.label_smoothing)


class TrainClock:
    """Seconds of training (carried across resumes) measured against an optional time budget."""

    def __init__(self, budget: float | None = None, elapsed: float = 0.0):
        self.budget = budget
        self.base = float(elapsed)
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.base + time.perf_counter() - self.started

    def fraction(self) -> float:
        return min(1.0, self.elapsed / self.budget) if self.budget else 0.0

    def exceeded(self) -> bool:
        return bool(self.budget) and self.elapsed >= self.budget


def train_one_epoch(model, loader, optimizer, schedule, s: StepSettings, *, epoch: int, meter: EpochMeter,
                    global_step: int, ema=None, clock: TrainClock | None = None, console=None,
                    on_step: Callable[[int, EpochMeter], bool] | None = None) -> dict:
    """Train over `loader` (already positioned with set_epoch(epoch, meter.batches)).

    `on_step(global_step, meter)` runs after every optimizer step (state saving, time budget); it
    returns True to stop the epoch early. Its own duration is not counted as training time.
    Returns the epoch summary plus `global_step` and `stopped` (True when cut short).
    """
    model.train()
    meter.to(s.device)
    total = len(loader)
    stopped = False
    no_sync = getattr(model, "no_sync", None)
    mix_gen = torch.Generator(device="cpu")
    shown = meter.batches
    tick = time.perf_counter()
    for i, (x, y) in enumerate(loader, start=meter.batches):
        torch.manual_seed(step_seed(s.seed, epoch, i, s.rank))
        target = y
        if mixing(s):
            from imgarena.data.augment import mix_batch

            mix_gen.manual_seed(step_seed(s.seed + 1, epoch, i, s.rank))
            x, target = mix_batch(x, y, s.num_classes, mixup_alpha=s.mixup, cutmix_alpha=s.cutmix,
                                  generator=mix_gen, label_smoothing=s.label_smoothing)
        boundary = (i + 1) % s.accum_steps == 0 or i + 1 == total
        # DDP: skip the gradient all-reduce on accumulation micro-steps
        sync_ctx = no_sync() if (no_sync is not None and not boundary) else contextlib.nullcontext()
        with sync_ctx:
            with autocast(s.device, s.amp):
                logits = model(x)
            loss = compute_loss(logits, target, s)
            scaled = loss / s.accum_steps
            (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
        with torch.no_grad():
            hard = target.argmax(1) if target.ndim == 2 else target
            meter.loss_sum += loss.detach().double() * y.shape[0]
            meter.correct += (logits.argmax(1) == hard).sum().double()
        meter.seen += int(y.shape[0])
        meter.batches = i + 1
        if boundary:
            _optimizer_step(model, optimizer, s)
            global_step += 1
            schedule.apply(global_step, clock.fraction() if clock is not None else 0.0)
            if ema is not None:
                ema.update(model)
        now = time.perf_counter()
        meter.time += now - tick
        if console is not None and ((i + 1) % s.log_every == 0 or i + 1 == total):
            summ = meter.summary()
            console.update(i + 1 - shown, summ["loss"], summ["acc"], summ["img_s"])
            shown = i + 1
        if boundary and on_step is not None and on_step(global_step, meter) and i + 1 < total:
            stopped = True
            break
        tick = time.perf_counter()
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    out = meter.summary()
    out.update(global_step=global_step, stopped=stopped, batches=meter.batches, total_batches=total)
    return out


def _optimizer_step(model, optimizer, s: StepSettings) -> None:
    if s.scaler is not None:
        if s.clip_grad:
            s.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
        s.scaler.step(optimizer)
        s.scaler.update()
    else:
        if s.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
