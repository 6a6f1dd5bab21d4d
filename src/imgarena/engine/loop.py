"""One training epoch: forward under autocast, (soft-target) cross-entropy, gradient accumulation,
clipping, optimizer and per-step schedule, EMA, and the stop on divergence (NaN/inf weights or loss).

Exact resume rests on three rules kept here: every step reseeds the global RNG from
(seed, epoch, batch, rank); mixup/cutmix draw from their own generator seeded the same way; and the
epoch's running sums live in float64 tensors that are saved as they are (`EpochMeter`), so a run
resumed at any optimizer step adds the same numbers in the same order as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from imgarena.engine.evaluate import autocast
from imgarena.engine.state import step_seed
from imgarena.errors import UserError


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
    # imgarena.engine.distill.DistillLoss: replaces compute_loss when a teacher is set (the only
    # place that knows about a distillation token's two outputs)
    distill: Callable | None = None


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


class TrainingDiverged(UserError):
    """The weights or the loss became NaN/inf. Nothing can be learned from there, so the run stops
    before such weights are saved; the checkpoints of earlier epochs stay as they were."""


class TrainClock:
    """Training seconds -- the steps only: evaluation, checkpoint writes and start-up do not count --
    carried across resumes and measured against an optional time budget.

    The loop calls `update(seconds of this epoch's steps)` after every optimizer step. Under torchrun
    `agree` turns each rank's own reading into rank 0's (one broadcast per step, only with a budget),
    so every rank sets the same time-based lr -- DDP keeps the replicas equal only then -- and all
    stop at the same step.
    """

    def __init__(self, budget: float | None = None, done: float = 0.0,
                 agree: Callable[[float], float] | None = None):
        self.budget = budget
        self.done = float(done)  # training seconds of completed epochs
        self.agree = agree if budget else None
        self.seconds = self.done  # the latest reading, the same on every rank

    def update(self, epoch_seconds: float) -> float:
        t = self.done + epoch_seconds
        self.seconds = self.agree(t) if self.agree is not None else t
        return self.seconds

    def end_epoch(self, epoch_seconds: float) -> None:
        self.done += epoch_seconds

    def fraction(self) -> float:
        return min(1.0, self.seconds / self.budget) if self.budget else 0.0

    def exceeded(self) -> bool:
        return bool(self.budget) and self.seconds >= self.budget


def check_finite(model, step: int, losses: dict[str, float] | None = None) -> None:
    """Raise TrainingDiverged when a weight, or one of `losses` ({"train loss": ...}), is NaN/inf.

    Callers pass only values that are the same on every rank -- the weights (DDP keeps them equal)
    and all-reduced losses -- so under torchrun all ranks stop at the same step. Checking the
    weights costs one device->host sync, so the loop does it every `log_every` batches (where the
    progress display syncs anyway) and at the epoch end; run_training also checks before every
    state save and, with the epoch's train and val loss, before writing checkpoints.
    """
    bad = [f"the {name}" for name, v in (losses or {}).items() if not math.isfinite(v)]
    if not bad:
        params = list(model.parameters())
        if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return
        bad = ["the weights"]
    raise TrainingDiverged(
        f"training diverged: {' and '.join(bad)} became NaN/inf by optimizer step {step}; the learning rate "
        "is probably too high: lower --lr, add --clip-grad 1.0, or with --amp fp16 use --amp bf16 or --amp off")


def train_one_epoch(model, loader, optimizer, schedule, s: StepSettings, *, epoch: int, meter: EpochMeter,
                    global_step: int, ema=None, clock: TrainClock | None = None, console=None,
                    on_step: Callable[[int, EpochMeter], bool] | None = None) -> dict:
    """Train over `loader` (already positioned with set_epoch(epoch, meter.batches)).

    `on_step(global_step, meter)` runs after every optimizer step (state saving, time budget); it
    returns True to stop the epoch early. Its own duration is not counted as training time.
    Returns the epoch summary plus `global_step` and `stopped` (True when cut short); raises
    TrainingDiverged when the weights went NaN/inf.
    """
    model.train()
    meter.to(s.device)
    total = len(loader)
    stopped = False
    no_sync = getattr(model, "no_sync", None)
    mix_gen = torch.Generator(device="cpu")
    shown = meter.batches
    tick = time.perf_counter()
    for i, batch in enumerate(loader, start=meter.batches):
        x, y = batch[0], batch[1]
        idx = batch[2] if len(batch) > 2 else None  # positions in the split (stored teacher logits)
        torch.manual_seed(step_seed(s.seed, epoch, i, s.rank))
        target = y
        if mixing(s):
            from imgarena.data.augment import mix_batch

            mix_gen.manual_seed(step_seed(s.seed + 1, epoch, i, s.rank))
            x, target = mix_batch(x, y, s.num_classes, mixup_alpha=s.mixup, cutmix_alpha=s.cutmix,
                                  generator=mix_gen, label_smoothing=s.label_smoothing)
        boundary = (i + 1) % s.accum_steps == 0 or i + 1 == total
        # The gradient is the mean over the group's micro-batches; the epoch's last group may be short.
        group_size = min(s.accum_steps, total - (i - i % s.accum_steps))
        # DDP: skip the gradient all-reduce on accumulation micro-steps
        sync_ctx = no_sync() if (no_sync is not None and not boundary) else contextlib.nullcontext()
        with sync_ctx:
            with autocast(s.device, s.amp):
                logits = model(x)
            if s.distill is not None:
                loss, logits = s.distill(logits, target, s, x=x, idx=idx)
            else:
                loss = compute_loss(logits, target, s)
            scaled = loss / group_size
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
            if ema is not None:
                ema.update(model)
        meter.time += time.perf_counter() - tick
        if boundary:
            time_frac = 0.0
            if clock is not None:  # after this step's time is counted, so lr and budget include it
                clock.update(meter.time)
                time_frac = clock.fraction()
            schedule.apply(global_step, time_frac)
        if (i + 1) % s.log_every == 0:
            check_finite(model, global_step)
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
    check_finite(model, global_step)
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
