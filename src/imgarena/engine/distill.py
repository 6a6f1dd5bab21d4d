"""Knowledge distillation: a trained model (the teacher) teaches the model being trained.

    soft: (1 - a) CE(student, labels) + a T^2 KL(softmax(teacher / T) || softmax(student / T))
          (Hinton et al. 2015, https://arxiv.org/abs/1503.02531; T^2 keeps the gradient scale of the
          soft term independent of T)
    hard: (1 - a) CE(student, labels) + a CE(student, argmax teacher)   (DeiT's hard distillation)

With DeiT's distillation token (Touvron et al. 2021, https://arxiv.org/abs/2012.12877) the student
returns two logits in training: the class head takes the label term, the distillation head the
teacher's; accuracy and evaluation use their average.

The teacher is any imgarena checkpoint trained on the same classes, frozen in eval mode. Its own
preprocessing may differ from the student's: every batch is mapped back to pixels, converted to
the teacher's channels and size and normalised with the teacher's mean/std (`Teacher.inputs`).

Teacher logits are computed once per training image and stored when the training inputs are fixed
(augment none, no mixup/cutmix), then gathered by the samples' positions in the split; otherwise
the teacher runs on every (augmented, mixed) batch. They are kept in the feature store
(`imgarena.engine.features`, `<cache_dir>/features/`) like the linear probe's features, so a later
run with the same teacher and images reuses them.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgarena.engine.evaluate import autocast
from imgarena.engine.loop import compute_loss
from imgarena.errors import UserError

log = logging.getLogger(__name__)

STORED, ON_THE_FLY = "stored", "on the fly"
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as Pillow's convert("L") and imgarena's cache use


# ---------------------------------------------------------------------- the student side

def token_enabled(cfg, builder_accepts_distilled: bool) -> bool:
    """Whether the student gets DeiT's distillation token: cfg.distill_token, or (None) whenever a
    teacher is set and the model family has one."""
    if not cfg.distill_from:
        if cfg.distill_token:
            raise UserError("--distill-token needs a teacher: set --distill-from RUN too (or drop --distill-token)")
        return False
    if cfg.distill_token is None:
        return builder_accepts_distilled
    if cfg.distill_token and not builder_accepts_distilled:
        raise UserError(f"--distill-token: model {cfg.model!r} has no distillation token (the ViT family has one); "
                        "drop --distill-token to distil through its single head")
    return bool(cfg.distill_token)


def student_kwargs(cfg, model_kwargs: dict) -> dict:
    """The student's architecture kwargs: `model_kwargs` plus `distilled=True` when the distillation
    token is on. A `distilled` already there (--model-kwargs, or the run folder --pretrained names) decides."""
    from imgarena.models._registry import accepted_options, get_entry

    kwargs = dict(model_kwargs)
    if "distilled" in kwargs:
        return kwargs
    accepts = (not cfg.model.startswith("timm/")
               and "distilled" in (accepted_options(get_entry(cfg.model).builder) or ()))
    # Automatic only from scratch: pretrained weights bring no distillation token to start it from.
    if token_enabled(cfg, accepts and (cfg.distill_token or not cfg.pretrained)):
        kwargs["distilled"] = True
    return kwargs


# ---------------------------------------------------------------------- the teacher

def _names(classes) -> str:
    shown = ", ".join(str(c) for c in list(classes)[:8])
    return f"[{shown}{', ...' if len(classes) > 8 else ''}] ({len(classes)})"


class Teacher:
    """A frozen checkpoint and the conversion of the student's normalised batches to its inputs:
    back to pixels, to the teacher's channels (luma or repeat) and img_size (F.interpolate with its
    interpolation), normalised with its mean/std. The student's view is the teacher's view: its
    crop fraction is not applied again."""

    def __init__(self, model, meta: dict, path: Path, *, mean, std, channels: int, img_size: int):
        self.model, self.meta, self.path = model, meta, Path(path)
        pre = meta["preprocessing"]
        self.size, self.channels = int(pre["img_size"]), int(pre["channels"])
        self.interpolation = pre.get("interpolation") or "bilinear"
        dev = next(iter(model.parameters())).device

        def col(v, c):
            v = [float(a) for a in v]
            return torch.tensor(v * c if len(v) == 1 else v, dtype=torch.float32, device=dev).view(1, -1, 1, 1)

        self.s_mean, self.s_std = col(mean, channels), col(std, channels)
        self.t_mean, self.t_std = col(pre["mean"], self.channels), col(pre["std"], self.channels)
        # The same preprocessing: the student's batch is the teacher's input as it is (bitwise).
        self.same = (self.channels == channels and self.size == img_size and self.s_mean.shape == self.t_mean.shape
                     and torch.equal(self.s_mean, self.t_mean) and torch.equal(self.s_std, self.t_std))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The student's normalised batch (B, C, H, W) as the teacher's normalised input."""
        if self.same:
            return x
        u = x.float() * self.s_std + self.s_mean  # pixels in [0, 1]
        if u.shape[1] != self.channels:
            if self.channels == 1:
                w = torch.tensor(_LUMA, dtype=u.dtype, device=u.device).view(1, 3, 1, 1)
                u = (u * w).sum(dim=1, keepdim=True)
            else:
                u = u.expand(-1, self.channels, -1, -1)
        if tuple(u.shape[-2:]) != (self.size, self.size):
            mode = self.interpolation
            smooth = mode in ("bilinear", "bicubic")
            u = F.interpolate(u, size=(self.size, self.size), mode=mode,
                              align_corners=False if smooth else None, antialias=smooth)
            if mode == "bicubic":
                u = u.clamp(0.0, 1.0)
        return (u - self.t_mean) / self.t_std

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, K), float32, no graph (no_grad, not inference_mode: the loss uses them)."""
        return self.model(self.inputs(x)).float()


def load_teacher(spec: str, data, device) -> Teacher:
    """The checkpoint `spec` (a run folder or .safetensors) as a frozen teacher for `data`; one line
    naming both class lists when they differ."""
    from imgarena.checkpoint import load_model, resolve_checkpoint

    try:
        path = resolve_checkpoint(spec, "auto")
        model, meta = load_model(path, device=device)
    except UserError as e:
        raise UserError(f"--distill-from {spec}: {e}") from None
    names = list(meta.get("class_names") or [])
    if names != list(data.classes):
        same_set = sorted(names) == sorted(data.classes)
        raise UserError(f"--distill-from {spec}: the teacher was trained on classes {_names(names)} but this run's "
                        f"data {data.source} has {_names(data.classes)}"
                        + ("; the same names in another order" if same_set else "")
                        + ": distil from a run trained on the same classes")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, meta, path, mean=data.mean, std=data.std, channels=data.channels, img_size=data.img_size)


# ---------------------------------------------------------------------- stored teacher logits

def _images_hash(images, chunk: int = 4096) -> str:
    """sha256 of images that are not pixel-cache rows (an in-memory split), in split order."""
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    for start in range(0, len(images), chunk):
        h.update(np.ascontiguousarray(images[start : start + chunk]).tobytes())
    return "sha256:" + h.hexdigest()


def teacher_logits_table(teacher: Teacher, data, cache_dir: str, *, device, amp=None, batch_size: int = 256,
                         channels_last: bool = False):
    """(N, K) float32 CPU teacher logits of `data.train`'s eval views -- the exact training inputs
    without augmentation -- row i for split position i, and the FeatureStore they live in
    (`store.computed` / `store.reused`: rows computed / read back by this call).

    Keyed like the linear probe's features (imgarena.engine.features): the teacher's weights and
    preprocessing, the pixel cache entry (or, for images not from the cache, their bytes), the
    student's preprocessing (the conversion's input) and the autocast dtype; one row per pixel-cache
    row, so other subsets, folds and seeds of the same images reuse the entry."""
    from imgarena.engine.features import FeatureStore, forward_rows, pixel_key, split_rows, weights_digest

    split = data.train
    rows, pixels = split_rows(split), pixel_key(data)
    if rows is not None and pixels:
        images = split.images.base  # forward_rows reads pixel-cache rows
    else:
        images, rows, pixels = split.images, np.arange(len(split), dtype=np.int64), _images_hash(split.images)
    parts = {"kind": "teacher_logits", "teacher": weights_digest(teacher.model, include_head=True),
             "teacher_preprocessing": dict(teacher.meta["preprocessing"]), "pixels": pixels,
             "preprocessing": dict(data.preprocessing), "amp": str(amp).replace("torch.", "") if amp else "fp32"}
    store = FeatureStore(cache_dir, parts)

    def compute(missing: np.ndarray) -> np.ndarray:
        return forward_rows(teacher, images, missing, img_size=data.img_size, mean=data.mean, std=data.std,
                            device=device, amp=amp, batch_size=batch_size, channels_last=channels_last)

    logits = torch.from_numpy(np.ascontiguousarray(store.get_or_compute(rows, compute), dtype=np.float32))
    log.info("teacher logits of %d training images: %d computed, %d reused from %s", len(rows), store.computed,
             store.reused, store.path)
    return logits, store


# ---------------------------------------------------------------------- the loss

def soft_distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    T = float(temperature)
    log_s = F.log_softmax(student.float() / T, dim=1)
    log_t = F.log_softmax(teacher.float() / T, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (T * T)


def hard_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student.float(), teacher.argmax(dim=1))


class DistillLoss:
    """The training loss with a teacher; the loop calls it instead of `compute_loss`.

    `table`: stored (N, K) teacher logits gathered by the batch's split positions, or None to run the
    teacher on each batch as the student sees it (augmented, mixed)."""

    def __init__(self, teacher: Teacher, *, mode: str = "soft", temperature: float = 3.0, weight: float = 0.5,
                 token: bool = False, table: torch.Tensor | None = None, device=None):
        if mode not in ("soft", "hard"):
            raise ValueError(f"distillation mode must be soft or hard, not {mode!r}")
        self.teacher, self.mode, self.temperature, self.weight, self.token = teacher, mode, temperature, weight, token
        # Small tables live on the training device (a gather per step); big ones stay in host memory.
        if table is not None and device is not None and table.numel() * 4 <= 512 << 20:
            table = table.to(device)
        self.table = table
        self.teacher_logits = STORED if table is not None else ON_THE_FLY

    def targets(self, x: torch.Tensor, idx: torch.Tensor | None, amp=None) -> torch.Tensor:
        if self.table is not None:
            if idx is None:
                raise RuntimeError("stored teacher logits need the loader's sample positions (return_index=True)")
            rows = idx if self.table.device == idx.device else idx.to(self.table.device)
            return self.table[rows].to(x.device, non_blocking=True)
        with autocast(x.device, amp):
            return self.teacher(x)

    def __call__(self, out, target: torch.Tensor, s, *, x: torch.Tensor, idx: torch.Tensor | None = None):
        """(loss, logits for the accuracy): `out` is the student's logits, or (class, distillation)
        logits from a model with the distillation token."""
        cls_out, dist_out = out if isinstance(out, tuple) else (out, out)
        t = self.targets(x, idx, s.amp)
        kd = (soft_distill_loss(dist_out, t, self.temperature) if self.mode == "soft"
              else hard_distill_loss(dist_out, t))
        loss = (1.0 - self.weight) * compute_loss(cls_out, target, s) + self.weight * kd
        logits = (cls_out + dist_out) / 2 if isinstance(out, tuple) else out
        return loss, logits

    def record(self) -> dict:
        """summary.json's "distill"."""
        return {"teacher": str(self.teacher.path), "mode": self.mode, "temperature": self.temperature,
                "weight": self.weight, "token": self.token, "teacher_logits": self.teacher_logits}


def can_store(cfg) -> bool:
    """The training inputs are a fixed function of each image: no augmentation, no mixing."""
    return cfg.augment == "none" and not cfg.mixup and not cfg.cutmix


def build_distill_loss(cfg, teacher: Teacher, model, data, *, device, amp=None, dist=None) -> DistillLoss:
    """The DistillLoss for run_training: stored teacher logits when the inputs allow (under torchrun
    rank 0 computes and stores them, then the others read them), else the teacher on each batch."""
    from imgarena.checkpoint import unwrap_model
    from imgarena.engine import distributed

    inner = unwrap_model(model)
    token = bool(getattr(inner, "distilled", False))
    if token:
        inner.set_distilled_training(True)
    table = None
    if can_store(cfg):
        enabled = dist is not None and dist.enabled
        if enabled and not dist.is_main:
            distributed.barrier(dist)  # rank 0 has stored them
        try:
            table, _ = teacher_logits_table(teacher, data, cfg.data.cache_dir, device=device, amp=amp,
                                            batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last)
        finally:
            if enabled and dist.is_main:
                distributed.barrier(dist)
    return DistillLoss(teacher, mode=cfg.distill, temperature=cfg.distill_temperature, weight=cfg.distill_weight,
                       token=token, table=table, device=device)
