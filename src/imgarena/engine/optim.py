"""Optimizers and learning-rate schedules.

Defaults follow the usual recipes: AdamW/Adam 1e-3 and SGD 0.1 at a batch of 256, scaled linearly
with the effective batch (batch_size * accum_steps). Weight decay goes by parameter kind: none on
1-D parameters (norm weights, biases, layer scales) and on what the model's `no_weight_decay()`
names (position/class/distillation tokens, relative position tables). Fine-tuning splits the
groups further: the backbone's lr is scaled by `lr_backbone`, and `layer_decay` D scales layer i's
lr by D ** (last layer - i), layers from the model's `group_matcher` (BEiT / timm). Schedules are
stepped once per optimizer step (not per epoch), so warmup and annealing are smooth even for a few
epochs; a two-stage fine-tune restarts the curve when the backbone joins (`restart_epoch`).
"""

from __future__ import annotations

import fnmatch
import logging
import math

import torch
from torch import nn

from imgarena.errors import UserError

from imgarena.config import OPTIMIZERS, SCHEDULES  # noqa: E402,F401  (one copy of the choice lists)
DEFAULT_LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 0.1}
# A fresh head on a pretrained backbone (linear, and two-stage whose backbone then gets x lr_backbone):
# the head alone is a convex problem on fixed features and needs far larger steps than a whole net
# from scratch; batch-scaling 1e-3 left it near chance after 20 steps on 100 images (0.29 test
# accuracy vs 0.83 at 3e-2, 0.78 at 1e-2; tests/test_transfer.py's data). 1e-2 with two-stage
# (backbone 1e-3) was best there too (0.77 vs 0.74 at 3e-3).
FINETUNE_LR = {"adamw": 1e-2, "adam": 1e-2, "sgd": 0.1}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "adam": 0.0, "sgd": 5e-4}
REFERENCE_BATCH = 256
ONECYCLE_START = 1 / 25  # torch OneCycleLR's div_factor
ONECYCLE_PCT = 0.3

log = logging.getLogger(__name__)


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    return name


def resolve_lr(optimizer: str, lr: float | None, effective_batch: int, finetune: str = "full") -> float:
    """`lr` as given, or the optimizer's default scaled by effective_batch / 256; for a linear or
    two-stage fine-tune the (unscaled) FINETUNE_LR instead."""
    if lr is not None:
        if lr <= 0:
            raise UserError(f"--lr must be positive, got {lr}")
        return float(lr)
    if finetune in ("linear", "two-stage"):
        return FINETUNE_LR[check_optimizer(optimizer)]
    return DEFAULT_LR[check_optimizer(optimizer)] * effective_batch / REFERENCE_BATCH


def resolve_weight_decay(optimizer: str, weight_decay: float | None) -> float:
    if weight_decay is not None:
        if weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {weight_decay}")
        return float(weight_decay)
    return DEFAULT_WEIGHT_DECAY[check_optimizer(optimizer)]


def param_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None, lr_backbone: float = 1.0,
                 layer_decay: float | None = None, include_frozen: bool = False) -> list[dict]:
    """Optimizer groups: parameters with the same lr scale and weight decay, in model order.

    Weight decay by kind: none for ndim <= 1 and for the names in `model.no_weight_decay()`
    (fnmatch patterns allowed, as timm's). Scale: lr_backbone for everything outside
    `model.get_classifier()`, times layer_decay ** (max_layer - layer) with `layer_decay`
    (`imgarena.models._base.layer_ids`). Without either that is two groups (decay, no decay).
    Each group carries "name", "lr_scale", "layer_id" (None without layer decay) and "lr" (lr * scale,
    when `lr` is given). `include_frozen`: also parameters with requires_grad False (a two-stage
    fine-tune unfreezes them later; until then they get no gradient, so the optimizer skips them).
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    patterns = [s for s in skip if any(c in s for c in "*?[")]
    from imgarena.models._base import classifier_parameters

    head = {id(p) for p in classifier_parameters(model)} if hasattr(model, "get_classifier") else set()
    split = lr_backbone != 1.0 or layer_decay is not None
    ids = max_layer = None
    if layer_decay is not None:
        from imgarena.models._base import layer_ids

        ids = layer_ids(model)
        max_layer = max(ids.values(), default=0)
        if max_layer == 0:
            log.warning("layer decay has no effect on %s: all its parameters form one layer",
                        getattr(model, "model_name", "") or type(model).__name__)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not (p.requires_grad or include_frozen):
            continue
        decay = not (p.ndim <= 1 or name in skip or any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
        is_head = id(p) in head
        layer = ids[name] if ids is not None else None
        scale = 1.0 if is_head else float(lr_backbone)
        if layer is not None:
            scale *= float(layer_decay) ** (max_layer - layer)
        part = ("head" if is_head else f"layer_{layer}" if layer is not None else "backbone") if split else "all"
        key = (part, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "name":
                           f"{part}{'' if decay else '_no_decay'}", "lr_scale": scale, "layer_id": layer}
            if lr is not None:
                groups[key]["lr"] = lr * scale
        groups[key]["params"].append(p)
    out = list(groups.values())
    if not split:  # the historical layout (decay first): existing state.pt files resume unchanged
        out.sort(key=lambda g: g["weight_decay"] == 0.0)
        if head and all(id(p) in head for g in out for p in g["params"]):  # a frozen backbone: the head alone
            for g in out:
                g["name"] = g["name"].replace("all", "head", 1)
    return out


def describe_groups(model: nn.Module, optimizer) -> list[dict]:
    """What each optimizer group holds and how it trains: name, layer id, parameter count and names,
    peak lr, lr scale, weight decay (for the printout and param_groups.json)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{"name": g.get("name", f"group_{i}"), "layer_id": g.get("layer_id"), "tensors": len(g["params"]),
             "params": int(sum(p.numel() for p in g["params"])), "lr": float(g.get("initial_lr", g["lr"])),
             "lr_scale": float(g.get("lr_scale", 1.0)), "weight_decay": float(g["weight_decay"]),
             "param_names": [names.get(id(p), "?") for p in g["params"]]}
            for i, g in enumerate(optimizer.param_groups)]


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float, momentum: float = 0.9,
                    lr_backbone: float = 1.0, layer_decay: float | None = None, include_frozen: bool = False):
    """The optimizer over `param_groups` (see there for the lr scales). The fused kernels (one op per
    step instead of ~10 per tensor) are used on CPU and CUDA: 3-4x faster optimizer steps for the
    small models here."""
    groups = param_groups(model, weight_decay, lr=lr, lr_backbone=lr_backbone, layer_decay=layer_decay,
                          include_frozen=include_frozen)
    name = check_optimizer(name)
    first = next((p for g in groups for p in g["params"]), None)
    fused = {"fused": True} if first is not None and first.device.type in ("cpu", "cuda") else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), **fused)
    if name == "adam":
        # Adam's decay is L2 in the gradient (as torch.optim.Adam); 0 by default
        return torch.optim.Adam(groups, lr=lr, **fused)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False, **fused)


class Schedule:
    """Per-step learning-rate multiplier: linear warmup, then cosine / step / onecycle / constant.

    `progress` for the annealing part is the share of optimizer steps done after warmup; with a time
    budget it is the larger of that and the share of the budget used, so `--time-budget 5m` anneals
    to the end of the five minutes even when the epoch count would take longer.

    `restart_epoch` R (a two-stage fine-tune: head only for R epochs, then everything) runs the
    curve twice, each with its own warmup (warmup_epochs, at most the stage) and anneal: over the
    first R epochs, then from R to the end; the second curve alone follows the time budget. The lr
    stays a pure function of the optimizer step (and the budget share), so resume is exact.
    """

    def __init__(self, optimizer, kind: str, *, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
                 step_size: int = 7, gamma: float = 0.1, restart_epoch: int = 0):
        if kind not in SCHEDULES:
            raise UserError(f"unknown schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
        self.optimizer = optimizer
        self.kind = kind
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.epochs = int(epochs)
        self.total = max(1, self.steps_per_epoch * self.epochs)
        self.restart = self.steps_per_epoch * int(restart_epoch) if 0 < restart_epoch < self.epochs else 0
        self.warmup_epochs = float(warmup_epochs)
        self.warmup = self._warmup_steps(self.total - self.restart)
        self.warmup_first = self._warmup_steps(self.restart) if self.restart else 0
        self.step_size, self.gamma = max(1, int(step_size)), float(gamma)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]

    def _warmup_steps(self, length: int) -> int:
        warm = self.warmup_epochs * self.steps_per_epoch
        if self.kind == "onecycle" and self.warmup_epochs <= 0:
            warm = ONECYCLE_PCT * length
        return int(round(min(warm, length)))

    def factor(self, step: int, time_frac: float = 0.0) -> float:
        if self.restart and step < self.restart:  # stage one: its own curve, by steps only
            return self._curve(step, self.restart, self.warmup_first, 0.0)
        return self._curve(step - self.restart, self.total - self.restart, self.warmup, time_frac)

    def _curve(self, step: int, total: int, warmup: int, time_frac: float) -> float:
        if step < warmup:
            start = ONECYCLE_START if self.kind == "onecycle" else 0.0
            return start + (1.0 - start) * (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        p = min(1.0, max(p, time_frac))
        if self.kind in ("cosine", "onecycle"):
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "step":
            return self.gamma ** (step // self.steps_per_epoch // self.step_size)
        return 1.0

    def apply(self, step: int, time_frac: float = 0.0) -> float:
        """Set every group's lr for optimizer step `step` (0-based); returns the first group's lr."""
        f = self.factor(step, time_frac)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "base_lrs": list(self.base_lrs), "total": self.total, "warmup": self.warmup,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "restart": self.restart,
                "warmup_first": self.warmup_first}

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue the saved plan. Returns what differs from it, for the resume message.

        Exact resume: the saved step counts (steps_per_epoch, total, warmup) are restored, so the
        lr curve is the one the run started with even if the loader's length comes out differently
        (e.g. another number of torchrun ranks). The one deliberate change is the horizon: resumed
        with another --epochs (`imgarena train --resume RUN --epochs 20` to train on), the anneal
        is stretched to the new end -- same steps per epoch and warmup, total = steps_per_epoch *
        epochs -- so the extra epochs get a real lr instead of the finished curve's zero. The peak
        lr (base_lrs) and the kind follow the current config too: they equal the saved ones unless
        --lr / --schedule were passed with --resume, and an explicit option is not ignored.
        """
        changes = []
        self.steps_per_epoch = int(state.get("steps_per_epoch", self.steps_per_epoch))
        self.warmup = int(state.get("warmup", self.warmup))
        self.restart = int(state.get("restart", 0))  # the stage switch stays where the run put it
        self.warmup_first = int(state.get("warmup_first", 0))
        saved_epochs = int(state.get("epochs", self.epochs))
        if saved_epochs == self.epochs:
            self.total = int(state.get("total", self.total))
        else:
            self.total = max(1, self.steps_per_epoch * self.epochs)
            changes.append(f"lr schedule stretched from {saved_epochs} to {self.epochs} epochs")
        saved_lrs = [float(x) for x in state["base_lrs"]]
        if len(saved_lrs) != len(self.base_lrs):
            self.base_lrs = saved_lrs  # another parameter grouping: keep the run's own lrs
        elif any(not math.isclose(a, b, rel_tol=1e-12) for a, b in zip(saved_lrs, self.base_lrs)):
            changes.append(f"peak lr {saved_lrs[0]:.3g} -> {self.base_lrs[0]:.3g}")
        if state.get("kind", self.kind) != self.kind:
            changes.append(f"schedule {state['kind']} -> {self.kind}")
        return changes
