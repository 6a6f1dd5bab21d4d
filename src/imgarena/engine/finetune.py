"""Fine-tune modes: which parameters train in which epoch, at which lr, and the linear probe's setup.

- full: everything trains; the backbone's lr is lr * lr_backbone (default 1).
- linear: the backbone (everything outside get_classifier()) is frozen -- no gradients, bitwise
  unchanged, its modules kept in eval mode (`ClassifierMixin.freeze_backbone`) -- and only the head
  trains. run_training then trains the head on stored pooled features (`LinearProbe`), unless
  mixup/cutmix need the images (then the frozen model runs on them every step).
- two-stage (fastai's `fine_tune`): the head alone for freeze_epochs epochs (frozen as linear),
  then everything, the backbone at lr * lr_backbone (default 0.1). The lr curve (warmup + anneal)
  restarts when the backbone joins (`optim.Schedule(restart_epoch=...)`); whether the backbone is
  frozen is a function of the epoch alone, so a run resumed in any epoch continues exactly.

`--layer-decay D` scales every backbone layer's lr by D ** (head layer - layer), layers from the
model's group_matcher, on top of lr_backbone (`optim.param_groups`). The groups are printed at the
start and written to the run folder as param_groups.json (`describe`, `write_record`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgarena.checkpoint import atomic_write_text, unwrap_model

log = logging.getLogger(__name__)

RECORD = "param_groups.json"
TWO_STAGE_LR_BACKBONE = 0.1


@dataclass(frozen=True)
class FinetunePlan:
    mode: str  # full | linear | two-stage
    freeze_epochs: int  # epochs the backbone is frozen from the start (linear: all of them)
    lr_backbone: float
    layer_decay: float | None

    @classmethod
    def from_config(cls, cfg) -> FinetunePlan:
        mode = cfg.finetune_mode
        lr_backbone = cfg.lr_backbone if cfg.lr_backbone is not None else (
            TWO_STAGE_LR_BACKBONE if mode == "two-stage" else 1.0)
        freeze = int(cfg.freeze_epochs) if mode == "two-stage" else (cfg.epochs if mode == "linear" else 0)
        if mode == "two-stage" and freeze >= cfg.epochs:
            log.warning("two-stage with freeze_epochs %d >= epochs %d: the backbone never trains (a linear probe "
                        "on images)", freeze, cfg.epochs)
        return cls(mode, freeze, float(lr_backbone), cfg.layer_decay)

    def frozen_at(self, epoch: int) -> bool:
        return self.mode == "linear" or (self.mode == "two-stage" and epoch < self.freeze_epochs)

    @property
    def restart_epoch(self) -> int:
        """Where the lr curve restarts: the epoch the backbone joins (two-stage), else 0 (one curve)."""
        return self.freeze_epochs if self.mode == "two-stage" else 0

    def apply(self, model, epoch: int) -> bool:
        """Freeze or unfreeze `model`'s backbone for `epoch`; True when that changed something."""
        m = unwrap_model(model)
        frozen = self.frozen_at(epoch)
        if m.backbone_frozen == frozen:
            return False
        m.freeze_backbone(frozen)
        return True

    def optimizer_kwargs(self) -> dict:
        """build_optimizer's fine-tuning arguments. Two-stage keeps the frozen backbone in the
        optimizer from the start (no gradient, so untouched) so its groups and state layout never
        change across the switch or a resume."""
        return {"lr_backbone": self.lr_backbone, "layer_decay": self.layer_decay,
                "include_frozen": self.mode == "two-stage"}

    def summary(self) -> dict:
        return {"mode": self.mode, "freeze_epochs": self.freeze_epochs if self.mode == "two-stage" else None,
                "lr_backbone": self.lr_backbone, "layer_decay": self.layer_decay, "param_groups": RECORD}


def describe(model, optimizer) -> list[dict]:
    from imgarena.engine.optim import describe_groups

    return describe_groups(unwrap_model(model), optimizer)


def group_lines(groups: list[dict]) -> list[str]:
    """The param-group table printed at the start of a run."""
    lines = [f"param groups ({len(groups)}):  {'name':<22} {'layer':>5} {'tensors':>7} {'params':>11} "
             f"{'lr':>9} {'wd':>7}"]
    for g in groups:
        layer = "-" if g["layer_id"] is None else str(g["layer_id"])
        lines.append(f"{'':20}{g['name']:<22} {layer:>5} {g['tensors']:>7} {g['params']:>11,} {g['lr']:>9.3g} "
                     f"{g['weight_decay']:>7.3g}")
    return lines


def write_record(run_dir: Path, plan: FinetunePlan, groups: list[dict]) -> Path:
    path = Path(run_dir) / RECORD
    atomic_write_text(path, json.dumps({**plan.summary(), "groups": groups}, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------- the linear probe on stored features

def uses_features(cfg) -> bool:
    """Linear mode trains the head on stored features, unless mixup/cutmix must mix the images."""
    return cfg.finetune_mode == "linear" and not (cfg.mixup > 0 or cfg.cutmix > 0)


class LinearProbe:
    """The linear fast path: each image's pooled features computed once (or read back from the
    store), then the head trains on them through the normal engine. `head` is the model's own
    classifier (trained in place, so the model saved is the backbone plus the trained head);
    `train_loader` / `val_loader` yield (features, labels); `evaluate` scores a saved checkpoint of
    this run on a split through its features (the final val/test evaluation)."""

    def __init__(self, model, data, cfg, *, device, amp, dist, per_rank_batch: int):
        from imgarena.engine.features import FeatureLoader, feature_key_parts, pooled, weights_digest

        self.model = unwrap_model(model)
        self.head = self.model.get_classifier()
        self.cache_dir, self.dist, self.device, self.amp = cfg.data.cache_dir, dist, device, amp
        self.eval_batch_size = cfg.eval_batch_size
        views = int(cfg.feature_views)
        if views > 1 and cfg.augment == "none":
            log.warning("feature_views %d with augment none: every view would be the same centre crop; storing 1", views)
            views = 1
        elif views == 1 and cfg.augment != "none":
            log.info("linear probe: features of the centre crop only (augment %s applies with feature_views > 1)",
                     cfg.augment)
        self.views = views
        self.stats: dict = {}
        # convnets extract in channels-last memory: timm's ResNet-50 runs 1.5x faster so on CPU (ours
        # are channels-last inside already); the weights keep their values, and their layout after
        self.channels_last = cfg.channels_last or is_convnet(self.model)
        self.keep_layout = cfg.channels_last
        self.common = dict(img_size=data.img_size, mean=data.mean, std=data.std, device=device, amp=amp,
                           batch_size=min(cfg.eval_batch_size, extraction_batch(data.img_size)),
                           channels_last=self.channels_last, stats=self.stats)
        self.fn = pooled(self.model)
        self.computed = self.reused = 0
        self.paths: list[str] = []
        was_training = self.model.training
        self.model.eval()
        weights = weights_digest(self.model)
        try:
            self._layout(True)
            self.center = feature_key_parts(self.model, data, weights=weights, amp=amp)
            if views == 1:
                train_f, val_f = self.features([data.train, data.val], self.center)
                train_views = [train_f]
            else:
                (val_f,) = self.features([data.val], self.center)
                train_views = [self.features([data.train], feature_key_parts(
                    self.model, data, weights=weights, amp=amp, view=v, augment=cfg.augment, seed=cfg.seed),
                    augment=cfg.augment, seed=cfg.seed, view=v)[0] for v in range(views)]
        finally:
            self._layout(False)
            self.model.train(was_training)
        self.seconds = float(self.stats.get("seconds", 0.0))
        self.images_per_s = self.stats.get("images", 0) / self.seconds if self.seconds > 0 else None
        self.train_loader = FeatureLoader(torch.from_numpy(np.stack(train_views)), data.train.labels, per_rank_batch,
                                          shuffle=True, seed=cfg.seed, drop_last=len(data.train) >= 2 * cfg.batch_size,
                                          device=device, rank=dist.rank, world_size=dist.world_size)
        # every val image scored once across ranks: each rank gets its own contiguous slice
        base_n, extra = divmod(len(data.val), dist.world_size)
        a = dist.rank * base_n + min(dist.rank, extra)
        b = a + base_n + (dist.rank < extra)
        self.val_loader = FeatureLoader(torch.from_numpy(val_f[a:b])[None], np.asarray(data.val.labels)[a:b],
                                        cfg.eval_batch_size, shuffle=False, device=device)
        log.debug("%s", self.message())

    def features(self, splits: list, key_parts: dict, *, collective: bool = True, **view) -> list[np.ndarray]:
        """Pooled features of each split's images (`view`: forward_rows' augment/seed/view), through
        the store when they are pixel-cache rows. `collective`: every rank calls this (rank 0 computes
        and writes, the others then read)."""
        from imgarena.engine import distributed
        from imgarena.engine.features import FeatureStore, forward_rows, split_rows

        rows = [split_rows(sp) for sp in splits]
        if any(r is None for r in rows) or not key_parts["pixels"]:
            log.info("features: not stored (the images are not rows of the pixel cache)")
            self.computed += sum(len(sp) for sp in splits)
            return [forward_rows(self.fn, np.asarray(sp.images), np.arange(len(sp)), **self.common, **view)
                    for sp in splits]
        base = splits[0].images.base
        store = FeatureStore(self.cache_dir, key_parts)
        wanted = np.concatenate(rows)

        def compute(missing):
            return forward_rows(self.fn, base, missing, **self.common, **view)

        if self.dist.is_main or not collective:
            values = store.get_or_compute(wanted, compute)
            self.computed += store.computed
            self.reused += store.reused
        if collective:
            distributed.barrier(self.dist)
            if not self.dist.is_main:  # rank 0 stored them: read them back (or compute, if it could not write)
                values = store.get_or_compute(wanted, compute)
        if store.path not in self.paths:
            self.paths.append(store.path)
        return np.split(values, np.cumsum([len(r) for r in rows])[:-1])

    def _layout(self, extracting: bool) -> None:
        if self.channels_last and not self.keep_layout:
            self.model.to(memory_format=torch.channels_last if extracting else torch.contiguous_format)

    def evaluate(self, model, split, *, num_classes: int) -> dict:
        """engine.evaluate of `model` (a checkpoint of this run: this backbone, its own head) on
        `split`, through the split's centre-view features; rank 0 only."""
        from imgarena.engine.evaluate import evaluate
        from imgarena.engine.features import FeatureLoader

        was_training = self.model.training
        self.model.eval()
        try:
            self._layout(True)
            (feats,) = self.features([split], self.center, collective=False)
        finally:
            self._layout(False)
            self.model.train(was_training)
        loader = FeatureLoader(torch.from_numpy(feats)[None], split.labels, self.eval_batch_size, shuffle=False,
                               device=self.device)
        return evaluate(model.get_classifier(), loader, num_classes=num_classes, device=self.device, amp=self.amp,
                        return_outputs=True)

    def message(self) -> str:
        n = self.computed + self.reused
        if self.computed == 0:
            return f"features: reused {n} stored ({self.views} view{'s' if self.views > 1 else ''}) from {self._where()}"
        rate = f" at {self.images_per_s:,.0f} img/s" if self.images_per_s else ""
        return (f"features: computed {self.computed}, reused {self.reused}{rate} ({self.seconds:.1f}s) -> "
                f"{self._where()}")

    def _where(self) -> str:
        return ", ".join(self.paths) if self.paths else "memory only"

    def record(self) -> dict:
        return {"features_computed": int(self.computed), "features_reused": int(self.reused),
                "feature_views": self.views, "feature_seconds": round(self.seconds, 3),
                "feature_img_s": None if self.images_per_s is None else round(self.images_per_s, 1),
                "feature_files": list(self.paths)}

    def checkpoint_state(self, head_module) -> dict:
        """The full model's state dict with `head_module`'s weights as the classifier (an EMA of the
        head, say): what best/last.safetensors hold."""
        state = self.model.state_dict()
        if head_module is self.head:
            return state
        by_ptr = {t.data_ptr(): k for k, t in state.items()}
        for (_, mine), (_, theirs) in zip(self.head.state_dict().items(), head_module.state_dict().items()):
            key = by_ptr.get(mine.data_ptr())
            if key is None:
                raise RuntimeError("the classifier's tensors are not in the model's state dict")
            state[key] = theirs
        return state


def is_convnet(model) -> bool:
    """More than one 2-D convolution (a ViT or Mixer has one, its patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def extraction_batch(img_size: int) -> int:
    """Images per feature-extraction batch: big enough for full-speed kernels, small enough that a
    ResNet-50's activations at 224 px stay within a few hundred MB."""
    return int(max(16, min(256, 64 * (224 / max(img_size, 1)) ** 2)))
