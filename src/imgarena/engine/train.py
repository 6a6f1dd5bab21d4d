"""`run_training(cfg)`: the whole training run, top to bottom.

setup -> data -> model -> optimizer -> resume -> epochs (train_one_epoch, evaluate, checkpoint,
early stop, time budget) -> final artifacts. Everything a run leaves goes to `out_dir/name/`:
config.yaml, metrics.csv/.jsonl, best/last.safetensors (+.json), state.pt, split.json, curves.png,
confusion_matrix.png, per_class.csv, errors.png, summary.json and TensorBoard events in tb/.
Under torchrun every rank trains its shard; only rank 0 writes, and only rank 0 holds the run
folder's lock (one process per run folder, see run_lock).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from imgarena import __version__
from imgarena.checkpoint import atomic_write_text, save_checkpoint, unwrap_model
from imgarena.config import TrainConfig, save_yaml, to_dict
from imgarena.engine import distributed, finetune
from imgarena.engine.console import Console
from imgarena.engine.ema import ModelEma
from imgarena.engine.evaluate import evaluate, metrics_from_sums, resolve_amp
from imgarena.engine.loop import EpochMeter, StepSettings, TrainClock, TrainingDiverged, check_finite, train_one_epoch
from imgarena.engine.optim import (Schedule, build_optimizer, resolve_lr,
                                   resolve_weight_decay)
from imgarena.engine.run_lock import RunLock
from imgarena.engine.state import capture_rng, load_state, restore_rng, save_state
from imgarena.errors import UserError

# train_time: seconds of training steps so far (what --time-budget counts); wall_time: seconds since
# the first epoch began, evaluation and checkpoint writes included; both carried across resumes.
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "epoch_time",
                  "train_time", "wall_time", "train_img_s")
KILL_ENV = "IMGARENA_TEST_KILL_AT_STEP"  # tests: SIGKILL this process after that optimizer step
SPLIT_IN_META_MAX = 8 << 20  # bigger split records live only in split.json (safetensors headers stay small)


def run_training(cfg: TrainConfig, *, data=None, progress: bool = True) -> dict:
    """Train `cfg.model` on `cfg.data` (or the given PreparedData); returns summary.json's content
    plus "run_dir". Raises UserError for bad options before any work is done."""
    check_config(cfg)
    if cfg.deterministic:  # cuBLAS reads this when CUDA initialises, i.e. before the process group
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dist = distributed.setup(cfg.device)
    lock = None
    try:
        run_dir, lock = _prepare_run_dir(cfg, dist)
        summary = _run(cfg, dist, run_dir, data, progress)
        distributed.barrier(dist)  # every rank done before any tears the group down
        return summary
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup(dist)


def _run(cfg: TrainConfig, dist: distributed.DistInfo, run_dir: Path, data, progress: bool) -> dict:
    # ------------------------------------------------------------------ setup
    device = dist.device
    amp = resolve_amp(cfg.amp, device)
    console = Console(progress and dist.is_main)
    _set_determinism(cfg.deterministic, device)

    # ------------------------------------------------------------------ data
    from imgarena.engine.preprocessing import check_prepared, resolve_data_config
    from imgarena.models.pretrained import pretrained_record, source_model_kwargs

    # A run's weights bring its architecture options (explicit ones win) and every source its
    # preprocessing (what the user left unset); both are checked before any image is decoded.
    # A resumed run reads neither again: its config.yaml holds the merged options and preprocessing,
    # state.pt the weights, the last checkpoint the record (the source may be gone by now).
    if cfg.resume:
        model_kwargs, resumed_data = _resumed_settings(cfg, run_dir)
        pretrained = _resumed_record(run_dir)
    else:
        model_kwargs = {**source_model_kwargs(cfg.pretrained, cfg.model), **cfg.model_kwargs}
        pretrained = pretrained_record(cfg.pretrained, cfg.model)
    if data is None:
        data_cfg = resolve_data_config(cfg) if not cfg.resume else resumed_data
        if data_cfg.img_size:  # refuse a model that cannot fit before decoding a single image
            from imgarena.models import check_model_fits

            check_model_fits(cfg.model, img_size=data_cfg.img_size, train_device=device, **model_kwargs)
        data = _load_data(data_cfg, dist, progress)
    else:
        data_cfg = check_prepared(data, cfg)
    classes = list(data.classes)
    num_classes = len(classes)
    if num_classes < 2:
        raise UserError(f"{data.source}: found {num_classes} class; training needs at least 2 class folders")
    teacher = None
    if cfg.distill_from:  # before the model: a teacher trained on other classes fails fast
        from imgarena.engine.distill import load_teacher

        teacher = load_teacher(cfg.distill_from, data, device)

    # ------------------------------------------------------------------ model
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run
    from imgarena.engine.distill import student_kwargs
    from imgarena.models import create_model

    model = create_model(cfg.model, num_classes=num_classes, in_chans=data.channels, img_size=data.img_size,
                         drop_path_rate=cfg.drop_path, pretrained=None if cfg.resume else cfg.pretrained,
                         train_device=device,
                         **student_kwargs(cfg, model_kwargs))  # + DeiT's distillation token when distilling a ViT
    params, flops = _count(model, (data.channels, data.img_size, data.img_size))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # Fine-tune mode: linear / two-stage start with the backbone frozen. The linear probe trains the
    # head alone (`core`) on each image's stored features, computed here once (or read back).
    plan = finetune.FinetunePlan.from_config(cfg)
    plan.apply(model, 0)
    probe = None
    if finetune.uses_features(cfg):
        probe = finetune.LinearProbe(model, data, cfg, device=device, amp=amp, dist=dist,
                                     per_rank_batch=max(1, cfg.batch_size // dist.world_size))
        console.info(probe.message())
    core = probe.head if probe is not None else model
    ema = ModelEma(core, cfg.ema_decay) if cfg.ema else None
    train_model = distributed.wrap_ddp(core, dist)
    if cfg.compile:
        train_model = torch.compile(train_model)

    # ------------------------------------------------------------------ loaders, optimizer, schedule
    from imgarena.data.loader import BatchLoader

    per_rank_batch = max(1, cfg.batch_size // dist.world_size)
    # out_size: the model's input is the centre img_size crop of the stored images (or the photo preset's random crop)
    common = dict(device=device, mean=data.mean, std=data.std, rank=dist.rank, world_size=dist.world_size,
                  channels_last=cfg.channels_last, out_size=data.img_size)
    train_loader = BatchLoader(data.train, per_rank_batch, shuffle=True, seed=cfg.seed,
                               drop_last=len(data.train) >= 2 * cfg.batch_size, augment=cfg.augment,
                               return_index=teacher is not None, **common)
    # Unpadded: every val image is scored exactly once across ranks (the per-rank sums are all-reduced).
    val_loader = BatchLoader(data.val, cfg.eval_batch_size, shuffle=False, seed=cfg.seed, augment="none",
                             pad=False, **common)
    if probe is not None:  # (features, labels) batches instead of images
        train_loader, val_loader = probe.train_loader, probe.val_loader
    lr = resolve_lr(cfg.optimizer, cfg.lr, cfg.batch_size * cfg.accum_steps, plan.mode)
    weight_decay = resolve_weight_decay(cfg.optimizer, cfg.weight_decay)
    # groups by parameter kind, backbone lr scale and layer (plan); a frozen linear backbone has none
    optimizer = build_optimizer(model, cfg.optimizer, lr=lr, weight_decay=weight_decay, momentum=cfg.momentum,
                                **plan.optimizer_kwargs())
    param_groups = finetune.describe(model, optimizer)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accum_steps)
    schedule = Schedule(optimizer, cfg.schedule, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                        warmup_epochs=cfg.warmup_epochs, step_size=cfg.step_size, gamma=cfg.gamma,
                        restart_epoch=plan.restart_epoch)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None
    settings = StepSettings(device=device, num_classes=num_classes, seed=cfg.seed, rank=dist.rank, amp=amp,
                            scaler=scaler, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad,
                            label_smoothing=cfg.label_smoothing, mixup=cfg.mixup, cutmix=cfg.cutmix,
                            class_weights=_class_weights(cfg.class_weights, data.train.labels, num_classes, device))
    if teacher is not None:
        from imgarena.engine.distill import build_distill_loss

        settings.distill = build_distill_loss(cfg, teacher, model, data, device=device, amp=amp, dist=dist)
        console.info(f"distilling from {teacher.path} ({cfg.distill}, T {cfg.distill_temperature:g}, weight "
                     f"{cfg.distill_weight:g}{', distillation token' if settings.distill.token else ''}; teacher "
                     f"logits {settings.distill.teacher_logits})")

    # The resolved config: what was actually used, so config.yaml alone reproduces the run.
    resolved = dataclasses.replace(
        cfg, lr=lr, weight_decay=weight_decay, img_size=data.img_size, name=run_dir.name, resume=False,
        out_dir=str(run_dir.parent), model_kwargs=model_kwargs,
        data=dataclasses.replace(data_cfg, source=data.source, img_size=data.img_size, channels=data.channels,
                                 resize=data.resize))
    meta_base = _meta_base(model, data, resolved, pretrained=pretrained)

    # ------------------------------------------------------------------ resume
    start_epoch, global_step, meter = 0, 0, None
    best = {"val_acc": -1.0, "epoch": 0}
    bad_epochs, history, wall_before, train_time, images_seen = 0, [], 0.0, 0.0, 0
    # finished: a resumed run whose training is over (killed while writing its final artifacts):
    # only those are written.
    finished, stop_reason = False, None
    if cfg.resume:
        st = load_state(run_dir)
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        replanned = schedule.load_state_dict(st["schedule"])
        if ema is not None and st.get("ema"):
            ema.load_state_dict(st["ema"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        restore_rng(st["rng"], device)
        start_epoch, global_step = int(st["epoch"]), int(st["global_step"])
        meter = EpochMeter.from_state(st["meter"]) if st.get("meter") else None
        best, bad_epochs, history = dict(st["best"]), int(st["bad_epochs"]), list(st["history"])
        wall_before, train_time, images_seen = float(st["elapsed"]), float(st["train_time"]), int(st["images_seen"])
        trained = train_time + (meter.time if meter is not None else 0.0)
        finished = bool(start_epoch >= cfg.epochs or (cfg.time_budget and trained >= cfg.time_budget)
                        or (cfg.patience and bad_epochs >= cfg.patience))
        if finished and (run_dir / "summary.json").is_file():
            raise UserError(f"{run_dir} already finished ({st.get('stop_reason') or 'all epochs done'}): "
                            "pass a larger --epochs or --time-budget to train on, or start a new run")
        stop_reason = st.get("stop_reason") if finished else None
        console.info(f"resuming {run_dir} at epoch {start_epoch + 1}, batch {meter.batches if meter else 0}"
                     + (f" ({'; '.join(replanned)})" if replanned else "")
                     if not finished else f"{run_dir}: training is done; writing its final artifacts")
    if dist.is_main:
        save_yaml(resolved, run_dir / "config.yaml")
        atomic_write_text(run_dir / "split.json", json.dumps(data.split_record, indent=1, default=str) + "\n")
        finetune.write_record(run_dir, plan, param_groups)

    console.info(f"training {cfg.model} ({params / 1e6:.2f}M params) on {len(data.train)} images, "
                 f"{num_classes} classes, {data.img_size}px, {device}"
                 f"{' x' + str(dist.world_size) if dist.enabled else ''}, "
                 f"{cfg.optimizer} lr {lr:.2e}, batch {cfg.batch_size}"
                 f"{'' if plan.mode == 'full' else ', finetune ' + plan.mode} -> {run_dir}")
    for line in finetune.group_lines(param_groups):
        console.info(line)
    tb = _tensorboard(run_dir, purge_step=len(history) + 1) if dist.is_main else None

    def state(epoch: int, meter_now: EpochMeter | None, stop_reason: str | None = None) -> dict:
        return {"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "ema": ema.state_dict() if ema else None,
                "scaler": scaler.state_dict() if scaler else None, "rng": capture_rng(device),
                "epoch": epoch, "global_step": global_step,
                "meter": meter_now.state_dict() if meter_now is not None else None,
                "best": best, "bad_epochs": bad_epochs, "history": history, "elapsed": wall(),
                "train_time": clock.done, "images_seen": images_seen,  # completed epochs; meter holds the rest
                "stop_reason": stop_reason, "config": to_dict(resolved)}

    # ------------------------------------------------------------------ epochs
    started = time.perf_counter()

    def wall() -> float:  # wall seconds since training began (evaluation, checkpoints included), across resumes
        return wall_before + time.perf_counter() - started

    # The budget counts training steps only, on rank 0's clock (see TrainClock).
    clock = TrainClock(cfg.time_budget, train_time, agree=lambda t: distributed.rank0_value(dist, t))
    clock.update(meter.time if meter is not None else 0.0)
    schedule.apply(global_step, clock.fraction())
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    epochs_shown = None if cfg.time_budget and cfg.epochs >= 10_000 else cfg.epochs  # None: "until the budget"

    for epoch in range(start_epoch, cfg.epochs if not finished else start_epoch):
        epoch_start = time.perf_counter()
        meter = meter or EpochMeter()
        if plan.apply(model, epoch) and probe is None:  # two-stage: the backbone joins (DDP must see its params)
            train_model = distributed.wrap_ddp(model, dist)
            if cfg.compile:
                train_model = torch.compile(train_model)
            console.info(f"epoch {epoch + 1}: backbone unfrozen (lr x {plan.lr_backbone:g})")
        train_loader.set_epoch(epoch, meter.batches)
        console.start_epoch(epoch + 1, epochs_shown, len(train_loader), meter.batches)

        def on_step(step: int, m: EpochMeter, epoch=epoch) -> bool:
            nonlocal global_step
            global_step = step
            if cfg.state_every and step % cfg.state_every == 0:
                # a diverged model never reaches state.pt (one all-reduce per save: every rank agrees)
                loss = distributed.all_reduce_sums(dist, {"loss": float(m.loss_sum), "seen": float(m.seen)})
                with _keep_last_good(run_dir, history):
                    check_finite(model, step, {"train loss": loss["loss"] / max(loss["seen"], 1.0)})
                if dist.is_main:
                    save_state(run_dir, state(epoch, m))
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # a real crash, for the resume test
            return clock.exceeded()  # the same reading on every rank, so all stop at the same step

        with _keep_last_good(run_dir, history):
            tr = train_one_epoch(train_model, train_loader, optimizer, schedule, settings, epoch=epoch, meter=meter,
                                 global_step=global_step, ema=ema, clock=clock, console=console, on_step=on_step)
        global_step = tr["global_step"]
        train_sums = distributed.all_reduce_sums(dist, {"loss": float(meter.loss_sum), "correct": float(meter.correct),
                                                        "seen": float(meter.seen)})
        clock.end_epoch(meter.time)
        images_seen += int(train_sums["seen"])

        eval_model = ema.module if ema is not None else core
        distributed.sync_buffers(eval_model, dist)
        ev = evaluate(eval_model, val_loader, num_classes=num_classes, device=device, amp=amp)
        ev = metrics_from_sums(distributed.all_reduce_sums(dist, ev["sums"]), num_classes)

        seen = max(train_sums["seen"], 1.0)
        row = {"epoch": epoch + 1, "train_loss": train_sums["loss"] / seen, "train_acc": train_sums["correct"] / seen,
               "val_loss": ev["loss"], "val_acc": ev["acc"], "val_top5": ev["top5"],
               "lr": max(g["lr"] for g in optimizer.param_groups), "epoch_time": time.perf_counter() - epoch_start,
               "train_time": clock.done, "wall_time": wall(),
               "train_img_s": train_sums["seen"] / meter.time if meter.time > 0 else 0.0}
        with _keep_last_good(run_dir, history):  # before this epoch's checkpoints replace good ones
            check_finite(eval_model, global_step, {"train loss": row["train_loss"], "val loss": row["val_loss"]})
        if num_classes <= 5:
            row.pop("val_top5")
        if tr["stopped"]:
            row["partial"] = round(tr["batches"] / max(tr["total_batches"], 1), 4)
        history.append(row)
        improved = row["val_acc"] > best["val_acc"]
        if improved:
            best = {"val_acc": row["val_acc"], "epoch": epoch + 1, "val_loss": row["val_loss"]}
            bad_epochs = 0
        else:
            bad_epochs += 1
        meter = None

        if clock.exceeded():
            stop_reason = "time_budget"
        elif cfg.patience and bad_epochs >= cfg.patience:
            stop_reason = "early_stopping"
        if dist.is_main:
            meta = {**meta_base, "epoch": epoch + 1, "metrics": _row_metrics(row)}
            saved = probe.checkpoint_state(eval_model) if probe is not None else eval_model  # the whole model
            save_checkpoint(run_dir / "last.safetensors", saved, meta)
            if improved:
                save_checkpoint(run_dir / "best.safetensors", saved, meta)
            _write_metrics(run_dir, history)
            _log_tensorboard(tb, row)
            save_state(run_dir, state(epoch + 1, None, stop_reason))
        console.end_epoch({**row, "epochs": epochs_shown, "best": improved})
        if stop_reason:
            console.info("stopping: " + ("time budget spent" if stop_reason == "time_budget"
                                         else f"no val improvement for {bad_epochs} epochs"))
            break

    # ------------------------------------------------------------------ final artifacts
    summary = None
    if dist.is_main:
        if tb is not None:
            tb.close()
        summary = _final_artifacts(run_dir, data, resolved, history, best, device=device, amp=amp, probe=probe,
                                   extra={"params": params, "flops": flops, "train_time_s": clock.done,
                                          "train_img_s": images_seen / clock.done if clock.done > 0 else 0.0,
                                          "wall_time_s": wall(), "stop_reason": stop_reason or "completed",
                                          "world_size": dist.world_size, "lr": lr, "weights": meta_base["weights"],
                                          "pretrained": meta_base["pretrained"],
                                          "finetune": {**plan.summary(), **(probe.record() if probe else {})},
                                          "distill": settings.distill.record() if settings.distill else None})
        console.info(f"best val acc {best['val_acc']:.2%} (epoch {best['epoch']}); artifacts in {run_dir}")
    summary = distributed.broadcast_object(dist, summary)
    return summary


@contextlib.contextmanager
def _keep_last_good(run_dir: Path, history: list[dict]):
    """Name the run folder and its intact checkpoints in TrainingDiverged (raised before the diverged
    epoch writes any)."""
    try:
        yield
    except TrainingDiverged as e:
        kept = f"best/last.safetensors of epoch {len(history)} are kept" if history else "no checkpoint was written"
        raise TrainingDiverged(f"{run_dir}: {e} ({kept})") from None


# ---------------------------------------------------------------------- configuration

def check_config(cfg: TrainConfig) -> None:
    """Reject impossible option values up front, each with a message naming the option.

    imgarena.config declares and checks every field (the CLI already did when it built `cfg`);
    checking again here catches fields changed by hand after construction."""
    from imgarena.config import validate

    validate(cfg)


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        if not deterministic:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _prepare_run_dir(cfg: TrainConfig, dist: distributed.DistInfo) -> tuple[Path, RunLock | None]:
    """out_dir/name, created and locked by rank 0 (the lock is returned; release it at the end).
    A fresh name is <model>-<timestamp>. An existing finished or resumable run is never overwritten
    without --resume, and a folder another live process is training in is refused."""
    name = cfg.name
    if name is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{cfg.model.replace('/', '_')}-{stamp}"
        name, k = base, 1
        while (Path(cfg.out_dir) / name).exists():
            k += 1
            name = f"{base}-{k}"
        name = distributed.broadcast_object(dist, name)  # ranks may disagree on the clock
    run_dir = Path(cfg.out_dir) / name
    lock, error = None, None
    if dist.is_main:
        try:
            lock = _claim_run_dir(run_dir, cfg.resume)
        except UserError as e:
            error = e
    # Rank 0's verdict on every rank: all fail together instead of the others waiting forever.
    message = distributed.broadcast_object(dist, None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return run_dir, lock


def _claim_run_dir(run_dir: Path, resume: bool) -> RunLock:
    """Lock `run_dir` for this process, then check what it holds (after locking, so a run that
    finishes or starts meanwhile is seen)."""
    if resume:
        if not run_dir.is_dir():
            raise UserError(f"cannot resume {run_dir}: no such run folder")
        lock = RunLock(run_dir).acquire("resume", "wait for it to finish (or stop it) first")
        if not (run_dir / "state.pt").is_file():
            lock.release()
            raise UserError(f"cannot resume {run_dir}: it has no state.pt (not a run folder, or stopped before "
                            "its first save): start it again without --resume")
        return lock
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire("train in")
    if any((run_dir / f).exists() for f in ("state.pt", "summary.json")):
        lock.release()
        raise UserError(f"{run_dir} already holds a run: continue it with `imgarena train --resume {run_dir}`, "
                        "or pick another --name")
    return lock


def _load_data(data_cfg, dist: distributed.DistInfo, progress: bool):
    from imgarena.data import load_data

    # Rank 0 builds the decoded-image cache; the others then open it instead of racing to build it.
    data = load_data(data_cfg, progress=progress) if dist.is_main else None
    distributed.barrier(dist)
    return data if data is not None else load_data(data_cfg, progress=False)


def _class_weights(mode, labels, num_classes: int, device) -> torch.Tensor | None:
    """auto: weight each class by N / (K * count), so rare classes count as much as common ones."""
    if mode != "auto":
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


def _count(model, input_shape) -> tuple[int, int | None]:
    from imgarena.models.flops import count_flops, count_params

    try:
        flops = count_flops(model, input_shape)
    except Exception:  # a model the flop counter cannot trace still trains
        flops = None
    return count_params(model), flops


# ---------------------------------------------------------------------- outputs

def _resumed_record(run_dir: Path) -> dict | None:
    """The `pretrained` record of a run being resumed, from its latest checkpoint (None before the first)."""
    from imgarena.checkpoint import read_metadata

    for name in ("last.safetensors", "best.safetensors"):
        if (run_dir / name).is_file():
            return read_metadata(run_dir / name).get("pretrained")
    return None


def _resumed_settings(cfg: TrainConfig, run_dir: Path):
    """(model kwargs, DataConfig) of a run being resumed: what its config.yaml resolved when it
    started (the source's architecture options and preprocessing) under what `cfg` sets itself."""
    from imgarena.config import load_yaml
    from imgarena.engine.preprocessing import FROM_WEIGHTS

    saved = load_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    kwargs = {**(saved.get("model_kwargs") or {}), **cfg.model_kwargs}
    data = saved.get("data") or {}
    fill = {k: data[k] for k in FROM_WEIGHTS if getattr(cfg.data, k) is None and data.get(k) is not None}
    if cfg.img_size:
        fill["img_size"] = cfg.img_size
    return kwargs, dataclasses.replace(cfg.data, **fill)


def _meta_base(model, data, cfg: TrainConfig, pretrained: dict | None = None) -> dict:
    """The metadata every checkpoint of the run shares; `pretrained`: the weights it started from."""
    split = data.split_record
    if len(json.dumps(split, default=str)) > SPLIT_IN_META_MAX:
        split = {k: v for k, v in split.items() if k != "splits"} | {"splits": "see split.json"}
    m = unwrap_model(model)
    return {"model": {"name": getattr(m, "model_name", None) or cfg.model, "kwargs": getattr(m, "model_kwargs", {})},
            "num_classes": len(data.classes), "class_names": list(data.classes),
            "preprocessing": dict(data.preprocessing), "split": split, "imgarena_version": __version__,
            "weights": "ema" if cfg.ema else "model", "pretrained": pretrained, "train_config": to_dict(cfg)}


def _row_metrics(row: dict) -> dict:
    return {k: row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5") if k in row}


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl (one JSON row per epoch) and metrics.csv (same columns), rewritten atomically."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    cols = [c for c in METRIC_COLUMNS if any(c in r for r in history)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def _tensorboard(run_dir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a run should not die without it
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)


def _log_tensorboard(tb, row: dict) -> None:
    if tb is None:
        return
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "train_img_s", "epoch_time"):
        if row.get(key) is not None:
            tb.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])
    tb.flush()


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _final_artifacts(run_dir: Path, data, cfg: TrainConfig, history: list[dict], best: dict, *, device, amp,
                     extra: dict, probe=None) -> dict:
    """Evaluate the best checkpoint on the full val split (and test, when there is one) and write
    per_class.csv, confusion_matrix.png, errors.png, curves.png and summary.json. With the linear
    probe's `probe`, the checkpoint's head scores the splits' stored features (the same numbers as
    its forward on the images: the backbone is the probe's, bitwise)."""
    from imgarena import calibration
    from imgarena.checkpoint import load_model
    from imgarena.data.loader import BatchLoader
    from imgarena.evaluation import metrics, plots

    model, _ = load_model(run_dir, which="best", device=device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    num_classes = len(data.classes)

    def run_eval(split):
        if probe is not None:
            return probe.evaluate(model, split, num_classes=num_classes)
        loader = BatchLoader(split, cfg.eval_batch_size, shuffle=False, seed=cfg.seed, device=device, augment="none",
                             mean=data.mean, std=data.std, channels_last=cfg.channels_last, out_size=data.img_size)
        return evaluate(model, loader, num_classes=num_classes, device=device, amp=amp, return_outputs=True)

    ev = run_eval(data.val)
    cm = metrics.confusion_matrix(ev["targets"], ev["preds"], num_classes)
    atomic_write_text(run_dir / "per_class.csv", metrics.per_class_csv(cm, data.classes))
    title = f"{cfg.model} on {data.source} (val, best epoch {best['epoch']})"
    plots.plot_confusion_matrix(cm, data.classes, run_dir / "confusion_matrix.png", title=title)
    plots.plot_errors(data.val.images, ev["targets"], ev["probs"], data.classes, run_dir / "errors.png", title=title)
    from imgarena.explain import write_explain_png  # where the model looked in those mistakes

    write_explain_png(run_dir, data, model, ev["probs"], title=title)
    plots.plot_curves(history, run_dir / "curves.png", title=f"{cfg.model} on {data.source}")

    peak, peak_kind = _peak_memory(device)
    summary = {
        "model": cfg.model, "run_dir": str(run_dir), "source": data.source, "num_classes": num_classes,
        "classes": list(data.classes), "train_images": len(data.train), "val_images": len(data.val),
        "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "best_val_loss": best.get("val_loss"),
        "final_val_acc": history[-1]["val_acc"] if history else None, "epochs_completed": len(history),
        "val_top5": ev["top5"], **{f"val_{k}": v for k, v in metrics.summary_from_confusion(cm).items() if k != "acc"},
        "peak_memory_mb": round(peak, 1), "peak_memory_kind": peak_kind, "device": str(device),
        "amp": str(amp).replace("torch.", "") if amp else "fp32", "optimizer": cfg.optimizer, "schedule": cfg.schedule,
        "batch_size": cfg.batch_size, **extra,
    }
    te = run_eval(data.test) if data.test is not None and len(data.test) else None
    if te is not None:
        summary.update(test_acc=te["acc"], test_loss=te["loss"], test_top5=te["top5"], test_images=len(data.test))
    # temperature scaling on val: stored in best.safetensors' metadata, plus reliability.png
    summary.update(calibration.calibrate_run(run_dir, ev["probs"], ev["targets"], title=title,
                                             test=None if te is None else (te["probs"], te["targets"])))
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary
