"""`imgarena compare`: train several architectures under identical conditions and report.

Fairness: the data is loaded once (one cache, one split) and handed to every run; every model gets
the same seeds (so the same batch orders), augmentation, batch size and budget. `recipe="recommended"`
swaps in each family's optimisation settings (optimizer, lr, weight decay, schedule, ...) but never
the conditions in HELD_EQUAL. A model with pretrained weights sees its inputs as the weights were
trained (mean/std, size, crop, interpolation: `model_data_config`), so the data is loaded once per
distinct preprocessing, every one on the first model's split (`same_split_as`).

Runs: every model trains once per (seed, fold, repeat) in `run_plan` (`seeds` seeds on one split;
`folds`/`repeats` plug in cross-validation folds, `data_for_run` being where a fold's split comes
in). Runs go round by round (every model's seed 0, then every model's seed 1...), so an
interrupted compare still holds matched runs. The verdicts come from `imgarena.stats`.

Ranking: the held-out test accuracy of each run's selected (best val) checkpoint where the data
has a test split, else the final epoch's val accuracy; best-over-epochs val accuracy is kept,
labelled optimistic (it is selected on the very images it is measured on).

Resumable: each run's record is keyed on its model name plus a hash of its fully resolved
TrainConfig (seed, pretrained weights and fine-tune mode included) and saved in `records/` when it finishes, so re-running the same
command skips finished runs and a changed option retrains only what it changes. Per-image
predictions of each run's ranked checkpoint are kept in `predictions/` (fingerprinted by the
checkpoint file). results.json/csv are rewritten after every run, the full report after the first
run, at round ends (at most once a minute) and on Ctrl-C, so the folder always holds a valid
(possibly partial) report.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import re
import statistics
import time
import traceback
from pathlib import Path

from imgarena import stats
from imgarena.checkpoint import atomic_write, atomic_write_text
from imgarena.config import CompareConfig, TrainConfig, from_dict, save_yaml, to_dict
from imgarena.errors import UserError
from imgarena.report import RUN_FIELDS, format_table, headline, read_history, strip_images, write_report

# TrainConfig fields that define "the same conditions": a recommended recipe may not change them.
HELD_EQUAL = ("data", "img_size", "epochs", "time_budget", "batch_size", "augment", "mixup", "cutmix",
              "seed", "device", "amp", "channels_last", "out_dir", "name", "eval_batch_size", "deterministic")
# Set through CompareConfig's own fields, not through the shared `train` options.
COMPARE_OWNED = ("data", "epochs", "time_budget", "batch_size", "seed", "device", "out_dir", "name", "model")

INFER_BATCH = 64  # inference throughput batch size, as in the Mixer paper's throughput column
RECORD_VERSION = 2  # records written before per-run statistics are measured again, not trusted
# Excluded from a model's key: where things are written, not what is trained.
_NOT_KEYED = ("out_dir", "name", "resume", "state_every")
_NOT_KEYED_DATA = ("cache_dir", "workers")
# Fields added after run keys existed: part of a key only when set away from their default.
_KEYED_IF_SET = ("crop_pct", "interpolation", "mean", "std", "freeze_epochs", "lr_backbone", "layer_decay",
                 "feature_views", "distill_from", "distill", "distill_temperature", "distill_weight", "distill_token")
PREDICTIONS = "predictions"
REPORT_EVERY_S = 60.0  # at most this often a mid-compare redraw of the report's figures
DISAGREE_SHOWN = 12  # images drawn per direction in the report's disagreement figure


# ---------------------------------------------------------------- configuration

def validate(cfg: CompareConfig) -> None:
    """Fail fast, before any training, on mistakes that would otherwise surface model by model."""
    from imgarena.models import get_entry

    if not cfg.models:
        raise UserError("no models to compare: pass --models a,b (see `imgarena models`)")
    dupes = sorted({m for m in cfg.models if cfg.models.count(m) > 1})
    if dupes:
        raise UserError(f"model {dupes[0]} is listed twice in --models: list each model once")
    for name in cfg.models:
        if not name.startswith("timm/"):
            get_entry(name)  # unknown name -> UserError with the closest names
    if cfg.recipe not in ("same", "recommended"):
        raise UserError(f"unknown recipe {cfg.recipe!r}: use --recipe same or --recipe recommended")
    if cfg.baseline is not None and cfg.baseline not in cfg.models:
        raise UserError(f"--baseline {cfg.baseline} is not one of --models ({', '.join(cfg.models)}): pick one of them")
    owned = sorted(set(cfg.train) & set(COMPARE_OWNED))
    if owned:
        raise UserError(f"option {owned[0]!r} is set for all models by compare itself: use its own flag (e.g. --{owned[0].replace('_', '-')})")
    stray = sorted(set(cfg.per_model) - set(cfg.models))
    if stray:
        raise UserError(f"per-model options name {stray[0]!r}, which is not in --models ({', '.join(cfg.models)})")
    from imgarena.engine.train import check_config

    for name in cfg.models:  # unknown keys, impossible values (epochs, budget...) -> UserError now, not hours later
        check_config(model_train_config(cfg, name, recipe_overrides(cfg, name)))


def compare_dir(cfg: CompareConfig) -> Path:
    """The compare folder: --out, else runs/compare-<data source name> (stable, so a re-run resumes)."""
    if cfg.out:
        return Path(cfg.out)
    src = Path(str(cfg.data.source).rstrip("/\\"))
    return Path("runs") / f"compare-{slug(src.stem if src.suffix.lower() == '.csv' else src.name) or 'data'}"


def recipe_overrides(cfg: CompareConfig, model: str) -> dict:
    """The family's recommended optimisation settings, minus the conditions held equal."""
    if cfg.recipe != "recommended":
        return {}
    from imgarena.recipes import recommended_recipe

    pretrained = cfg.per_model.get(model, {}).get("pretrained", cfg.train.get("pretrained"))
    return {k: v for k, v in recommended_recipe(model, pretrained=pretrained).items() if k not in HELD_EQUAL}


def model_train_config(cfg: CompareConfig, model: str, recipe: dict, out: Path | None = None) -> TrainConfig:
    """TrainConfig of one model: defaults < recipe < shared options < compare's conditions < per-model
    options; its data options left unset are filled from its pretrained weights' preprocessing."""
    d = dict(recipe)
    d.update(cfg.train)
    d.update(data=to_dict(cfg.data), model=model, batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
             epochs=cfg.epochs if cfg.epochs is not None else (10_000 if cfg.time_budget else 10),
             time_budget=cfg.time_budget)
    d.update(cfg.per_model.get(model, {}))
    tc = from_dict(TrainConfig, d, where=f"options for {model}")
    tc.data = model_data_config(tc)
    if out is not None:
        tc.out_dir = str(out)
        tc.name = f"{slug(model)}-{config_key(tc)}"
    return tc


def model_data_config(tc: TrainConfig):
    """The DataConfig `tc` trains on, as `imgarena train` resolves it: the data options left unset
    filled from its pretrained weights' preprocessing (and photo's crop fraction). Compare loads
    the data itself, once per distinct DataConfig, so it resolves this first."""
    from imgarena.engine.preprocessing import resolve_data_config

    try:
        return resolve_data_config(tc)
    except UserError as e:
        raise UserError(f"{tc.model}: {e}") from None


def config_key(tc: TrainConfig) -> str:
    """Short hash of everything that changes what gets trained (not where it is written): the
    resolved config with the fine-tune mode in effect, and the size and time of a local weights file
    (so replacing the file, or retraining the run folder it names, trains anew)."""
    d = _keyed(to_dict(tc), TrainConfig, _NOT_KEYED)
    d["data"] = _keyed(d["data"], type(tc.data), _NOT_KEYED_DATA)
    d.pop("finetune", None)
    if tc.pretrained or tc.finetune_mode != "full":
        d["finetune"] = tc.finetune_mode
        d["pretrained_files"] = _weights_fingerprint(tc.pretrained) if tc.pretrained else []
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _keyed(d: dict, cls, drop) -> dict:
    """`d` without the unkeyed fields, and without the fields added since keys were introduced while
    they hold their defaults (so a compare folder written before them still resumes)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {k: v for k, v in d.items()
            if k not in drop and not (k in _KEYED_IF_SET and k in defaults and v == defaults[k])}


_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _weights_fingerprint(spec: str) -> list[str]:
    """name:size:mtime of a local weights file, or of the weights in a run folder ([] for hub specs)."""
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            found = [p for d in (path, path / "checkpoints") if d.is_dir() for p in sorted(d.iterdir())
                     if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
            return [_fingerprint(p) for p in found]
        return [_fingerprint(path)] if path.is_file() else []
    except OSError:  # vanished between the checks: the training run reports it
        return []


def slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def conditions_text(cfg: CompareConfig, data, tcs: dict | None = None) -> str:
    """The report's "same conditions" sentence; `tcs` (RunSpec -> TrainConfig) adds each model's
    weights and fine-tune mode when any starts from pretrained weights."""
    budget = []
    if cfg.epochs is not None or not cfg.time_budget:
        budget.append(f"{cfg.epochs or 10} epochs")
    if cfg.time_budget:
        budget.append(f"{cfg.time_budget:g}s of training")
    shared = ", ".join(f"{k}={v}" for k, v in sorted(cfg.train.items()))
    per = "; ".join(f"{m}: {o}" for m, o in cfg.per_model.items())
    n_val = len(data.val) if data.val is not None else 0
    return (f"Same conditions for every model: {data.source} ({len(data.train)} train / {n_val} val images, "
            f"{len(data.classes)} classes, {data.img_size}px, {data.channels} channel(s)), split seed "
            f"{cfg.data.split_seed}, {_seeds_text(cfg)}, batch {cfg.batch_size}, budget {' or '.join(budget)} per model, "
            f"recipe {cfg.recipe}" + (f", shared options {shared}" if shared else "")
            + (f". Per-model options: {per}" if per else "") + "." + _weights_text(tcs or {}))


def _weights_text(tcs: dict) -> str:
    by_model = {}
    for spec, tc in tcs.items():
        by_model.setdefault(spec.model, tc)
    if not any(tc.pretrained for tc in by_model.values()):
        return ""
    parts = []
    for m, tc in by_model.items():
        d = tc.data
        pre = [f"{d.img_size}px" if d.img_size else None, f"crop {d.crop_pct:g}" if d.crop_pct else None,
               d.interpolation, f"mean/std {_floats(d.mean)}/{_floats(d.std)}" if d.mean is not None else None]
        pre = [x for x in pre if x]
        parts.append(f"{m}: {tc.finetune_mode} from {tc.pretrained or 'random init'}"
                     + (f" ({', '.join(pre)})" if pre else ""))
    return (" Weights and fine-tuning (a model with pretrained weights sees its inputs as they were trained with, "
            "on the same split): " + "; ".join(parts) + ".")


def _floats(vals) -> str:
    return ",".join(f"{v:.3g}" for v in vals)


def _seeds_text(cfg: CompareConfig) -> str:
    runs = cfg.seeds * cfg.folds * cfg.repeats
    seeds = f"seed {cfg.seed}" if cfg.seeds == 1 else f"seeds {cfg.seed}-{cfg.seed + cfg.seeds - 1}"
    folds = f" x {cfg.folds} folds" + (f" x {cfg.repeats} repeats" if cfg.repeats > 1 else "") if cfg.folds > 1 else ""
    return seeds + folds + (f" ({runs} runs per model)" if runs > 1 else "")


# ---------------------------------------------------------------- the run plan

@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training of one model. fold/repeat are 0 when the data's own split is used (folds=1)."""

    model: str
    seed: int
    fold: int = 0
    repeat: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        """What matches runs of different models: same seed on the same split or fold."""
        return (self.seed, self.fold, self.repeat)


def run_plan(cfg: CompareConfig) -> list[RunSpec]:
    """Every (model, seed, fold, repeat), round by round: all models' first run, then their second..."""
    return [RunSpec(m, cfg.seed + s, f, r) for r in range(cfg.repeats) for f in range(cfg.folds)
            for s in range(cfg.seeds) for m in cfg.models]


def data_for_run(data, cfg: CompareConfig, spec: RunSpec):
    """The PreparedData that `spec` trains and is scored on. folds=1: the loaded split itself.

    folds>1: the fold's split of the same images, from the data layer's
    `imgarena.data.folds.fold_data(data, folds=K, fold=i, repeat=r, seed=split_seed)`, which must
    return a PreparedData whose val split is fold i of repeat r and whose `split_record` names it
    (so every run folder says which images it validated on)."""
    if cfg.folds == 1:
        return data
    from imgarena.data.folds import fold_data

    return fold_data(data, folds=cfg.folds, fold=spec.fold, repeat=spec.repeat, seed=cfg.data.split_seed)


def run_train_config(cfg: CompareConfig, spec: RunSpec, recipe: dict, out: Path) -> TrainConfig:
    """The TrainConfig of one run: its model's config with the run's seed, in its own run folder."""
    tc = dataclasses.replace(model_train_config(cfg, spec.model, recipe), seed=spec.seed, out_dir=str(out))
    key = config_key(tc)
    if cfg.folds > 1:  # the fold is part of what is trained
        key = hashlib.sha1(f"{key}/{cfg.folds}/{spec.fold}/{spec.repeat}".encode()).hexdigest()[:10]
        tc.name = f"{slug(spec.model)}-f{spec.fold}r{spec.repeat}-{key}"
    else:  # with seeds=1 the same name as before repeats existed, so older compare folders resume
        tc.name = f"{slug(spec.model)}-{key}"
    return tc


def _split_of(data) -> list[list[str]]:
    return [[str(p) for p in part.paths] if part is not None else [] for part in (data.train, data.val, data.test)]


def same_split_as(data, ref):
    """`data` (the same files under another preprocessing) split exactly as `ref`. The split is a
    function of the files and the split options, except for the near-duplicate groups, which are
    found on the decoded pixels and so may differ at another size or crop: `ref`'s groups decide."""
    if _split_of(data) == _split_of(ref):
        return data
    from imgarena.data.prepare import split_pool

    pool, ref_pool = data.pool, ref.pool
    if pool is None or ref_pool is None or list(pool.ids) != list(ref_pool.ids):
        raise RuntimeError("two preprocessings of one data source listed different files")
    pool = dataclasses.replace(pool, groups=ref_pool.groups, group_counts=dict(ref_pool.group_counts))
    out = split_pool(pool, pool.cfg, data.warnings)
    if _split_of(out) != _split_of(ref):
        raise RuntimeError("re-splitting with the same groups gave another split")
    return out


def _validate_design(cfg: CompareConfig) -> None:
    if cfg.repeats > 1 and cfg.folds == 1:
        raise UserError("--repeats reshuffles cross-validation folds: use it with --folds K (K >= 2); "
                        "for several runs on one split use --seeds N")


# ---------------------------------------------------------------- measuring one run

def record_from_history(history: list[dict]) -> dict:
    """Accuracy, loss and timing columns from a run's metrics.jsonl rows."""
    rows = [r for r in history if r.get("val_acc") is not None]
    if not rows:
        return {"epochs": len(history)}
    best = max(rows, key=lambda r: r["val_acc"])  # first epoch reaching the maximum
    last = rows[-1]
    full = [r for r in history if not r.get("partial")]  # not an epoch cut short by the time budget

    def median(key, among):
        vals = [r[key] for r in among if r.get(key)]
        return statistics.median(vals) if vals else None

    return {
        "epochs": len(history), "epochs_trained": stats.epochs_trained(history),
        "best_val_acc": best["val_acc"], "best_epoch": best.get("epoch"), "best_val_loss": best.get("val_loss"),
        "best_val_top5": best.get("val_top5"), "final_val_acc": last["val_acc"], "final_val_loss": last.get("val_loss"),
        "train_time_s": history[-1].get("train_time", history[-1].get("wall_time")), "time_per_epoch_s": median("epoch_time", full or history),
        "train_img_s": median("train_img_s", history),
        # per-epoch throughputs: the speed spread of a model that ran once
        "epoch_img_s": [r["train_img_s"] for r in (full or history) if r.get("train_img_s")],
    }


def ranked_split(data) -> tuple[str, str]:
    """(split, checkpoint) the ranking metric is measured on: test + best where there is a test split,
    else val + last (the final epoch's val accuracy)."""
    return ("test", "best") if data.test is not None and len(data.test) else ("val", "last")


def rank_rule(data) -> str:
    split, _ = ranked_split(data)
    if split == "test":
        return (f"Models are ranked by held-out test accuracy ({len(data.test)} test images) of each run's "
                "selected checkpoint (the epoch with the best val accuracy).")
    return (f"Models are ranked by the final epoch's val accuracy ({len(data.val)} val images; the data has no "
            "test split).")


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def run_predictions(out: Path, run_dir: Path, tc: TrainConfig, data) -> dict:
    """{split, checkpoint, ids, targets, preds} of the run's ranked checkpoint on the ranked split.

    Read from the compare folder's predictions/<run>.npz when its checkpoint fingerprint still
    matches, else from the run's own predictions.npz (when the engine wrote one), else scored
    here (one eval pass), and cached. Arrays are plain (no pickle)."""
    import numpy as np

    split, which = ranked_split(data)
    ckpt = run_dir / f"{which}.safetensors"
    fp = _fingerprint(ckpt)
    cache = out / PREDICTIONS / f"{run_dir.name}.npz"
    got = _read_npz(cache)
    if got is not None and str(got.get("fingerprint")) == fp and str(got.get("split")) == split:
        return {"split": split, "checkpoint": which, "ids": got["ids"], "targets": got["targets"], "preds": got["preds"]}
    part = getattr(data, split)
    own = _read_npz(run_dir / "predictions.npz")
    prefix = f"{split}_{which}_"
    if own is not None and f"{prefix}preds" in own and len(own[f"{prefix}preds"]) == len(part):
        targets, preds = own[f"{prefix}targets"].astype(np.int64), own[f"{prefix}preds"].astype(np.int64)
    else:
        targets, preds = _score(run_dir, which, tc, part, data)
    ids = np.asarray([str(p) for p in part.paths])
    if not np.array_equal(targets, np.asarray(part.labels, np.int64)):
        raise RuntimeError(f"{run_dir.name}: predictions are not aligned with the {split} split")
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda tmp: np.savez(open(tmp, "wb"), ids=ids, targets=targets, preds=preds,
                                             split=np.str_(split), checkpoint=np.str_(which), fingerprint=np.str_(fp)))
    return {"split": split, "checkpoint": which, "ids": ids, "targets": targets, "preds": preds}


def _read_npz(path: Path) -> dict | None:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError):
        return None


def _score(run_dir: Path, which: str, tc: TrainConfig, part, data):
    from imgarena.checkpoint import load_model
    from imgarena.data.loader import BatchLoader
    from imgarena.engine.distributed import resolve_device
    from imgarena.engine.evaluate import evaluate, resolve_amp

    device = resolve_device(tc.device)
    model, meta = load_model(run_dir, which=which, device=device)
    loader = BatchLoader(part, tc.eval_batch_size, shuffle=False, seed=tc.seed, device=device, augment="none",
                         mean=data.mean, std=data.std, out_size=data.img_size)  # the eval view: centre crop
    ev = evaluate(model, loader, num_classes=meta["num_classes"], device=device, amp=resolve_amp(tc.amp, device),
                  return_outputs=True)
    del model
    return ev["targets"].astype("int64"), ev["preds"].astype("int64")


def scores_from_predictions(pred: dict, num_classes: int) -> dict:
    """The ranking metric, its evaluation size and per-class F1 of one run's predictions."""
    from imgarena.evaluation import metrics

    cm = metrics.confusion_matrix(pred["targets"], pred["preds"], num_classes)
    n = int(len(pred["targets"]))
    acc = float((pred["targets"] == pred["preds"]).mean()) if n else None
    return {"rank_acc": acc, "rank_split": pred["split"], "n_eval": n,
            "class_f1": [float(x) for x in metrics.per_class_report(cm)["f1"]]}


def measure_speed(run_dir: Path, tc: TrainConfig) -> dict:
    """Inference img/s (batch 64), latency (batch 1, p50/p95) and peak train-step memory of the
    trained model, with `imgarena.bench`'s timing functions on random inputs."""
    import torch

    from imgarena.bench import measure_inference, measure_train_step
    from imgarena.checkpoint import load_model
    from imgarena.engine.distributed import resolve_device

    device = resolve_device(tc.device)
    model, meta = load_model(run_dir, device=device)
    pre = meta["preprocessing"]
    shape = (pre["channels"], pre["img_size"], pre["img_size"])
    kw = dict(device=device, amp=tc.amp, channels_last=tc.channels_last)
    # Few repeats: these run once per model after training, and the median of a few is stable enough.
    infer = measure_inference(model, shape, INFER_BATCH, warmup=1, repeats=3, **kw)
    lat = measure_inference(model, shape, 1, warmup=2, repeats=20, **kw)
    # one step is enough for memory: the optimizer state and every activation exist during it
    train = measure_train_step(model, shape, tc.batch_size, num_classes=meta["num_classes"], warmup=0, repeats=1, **kw)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"infer_img_s": infer["img_s"], "latency_p50_ms": lat["median_ms"], "latency_p95_ms": lat["p95_ms"],
            "peak_mem_mb": train["peak_mem_mb"]}


def _empty_record(spec: RunSpec, status: str, key: str = "", run_dir: str = "", reason: str = "",
                  tc: TrainConfig | None = None) -> dict:
    rec = dict.fromkeys(RUN_FIELDS)
    rec.update(model=spec.model, seed=spec.seed, fold=spec.fold, repeat=spec.repeat, status=status,
               key=key or None, run_dir=run_dir or None, reason=reason or None, version=RECORD_VERSION)
    if tc is not None:  # what the run was asked to start from, until its own files say what it used
        rec.update(_weights_fields(tc.finetune_mode, {"source": tc.pretrained} if tc.pretrained else None))
    return rec


def _weights_fields(finetune: str | None, pretrained: dict | None) -> dict:
    pre = pretrained or {}
    return {"finetune": finetune, "pretrained": pre.get("source"), "pretrained_kind": pre.get("kind"),
            "pretrained_name": pre.get("name"), "pretrained_sha256": pre.get("sha256")}


def weights_record(run_dir: Path, summary: dict) -> dict:
    """The fine-tune mode and pretrained weights ({source, kind, name, sha256} or none) a run used, from
    its summary.json, else from its config.yaml (runs written before summaries recorded them)."""
    finetune, pretrained = summary.get("finetune"), summary.get("pretrained")
    if isinstance(finetune, dict):  # the fine-tune record: mode, freeze epochs, lrs
        finetune = finetune.get("mode")
    if finetune is None or "pretrained" not in summary:
        import yaml

        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            saved = {}
        spec = saved.get("pretrained")
        if "pretrained" not in summary:
            pretrained = {"source": str(spec)} if spec else None
        finetune = finetune or saved.get("finetune") or ("two-stage" if spec else "full")
    return _weights_fields(finetune, pretrained)


def run_state(run_dir: Path) -> str:
    """finished (summary.json written) | resumable (state.pt, no summary) | new."""
    if (run_dir / "summary.json").is_file():
        return "finished"
    return "resumable" if (run_dir / "state.pt").is_file() else "new"


def _train_one(spec: RunSpec, tc: TrainConfig, data, out: Path, progress: bool, *, speed: bool) -> dict:
    """Train, resume, or (when only its record was lost) just measure one run; returns its record.
    `speed`: also time inference (once per model: the architecture, not the seed, sets it)."""
    import shutil

    run_dir = out / tc.name
    state = run_state(run_dir)
    if state != "finished":
        if state == "resumable":
            tc = dataclasses.replace(tc, resume=True)  # interrupted earlier: continue where it stopped
        elif run_dir.exists():
            shutil.rmtree(run_dir)  # died before its first saved state: nothing there to keep
        from imgarena.engine.train import run_training

        run_training(tc, data=data, progress=progress)
    summary = json.loads((run_dir / "summary.json").read_text())
    history = read_history(run_dir)
    rec = _empty_record(spec, "ok", config_key(tc), run_dir.name)
    rec.update(record_from_history(history))
    rec.update(params=summary.get("params"), flops=summary.get("flops"), test_acc=summary.get("test_acc"))
    rec.update({k: summary.get(k) for k in ("temperature", "ece_before", "ece_after")})  # imgarena.calibration
    rec.update(weights_record(run_dir, summary))
    rec.update(scores_from_predictions(run_predictions(out, run_dir, tc, data), len(data.classes)))
    flag = stats.undertrained(history, len(data.val), train_time_s=summary.get("train_time_s") or rec["train_time_s"])
    rec.update(undertrained=flag["undertrained"], undertrained_reason=flag["reason"],
               needed_epochs=flag["needed_epochs"], needed_s=flag["needed_s"])
    if speed:
        rec.update(measure_speed(run_dir, tc))
    return rec


# ---------------------------------------------------------------- per model and per pair

def aggregate_model(model: str, runs: list[dict]) -> dict:
    """One row per model: mean and 95% interval of the ranking metric over its ok runs, means of the
    other columns (best-over-epochs val accuracy among them, labelled optimistic in the report)."""
    ok = [r for r in runs if r.get("status") == "ok"]
    statuses = [r.get("status") for r in runs]
    status = ("ok" if ok and len(ok) == len(runs) else "some failed" if ok
              else next((s for s in ("failed", "interrupted", "pending") if s in statuses), "pending"))
    row = {"model": model, "status": status, "runs": len(ok), "runs_planned": len(runs)}
    n_eval = ok[0].get("n_eval") if ok else None
    ci = stats.mean_interval([r.get("rank_acc") for r in ok], n_eval=n_eval)
    row.update(acc_mean=ci["mean"], acc_std=ci["std"], acc_lo=ci["lo"], acc_hi=ci["hi"], acc_ci=ci["method"],
               rank_split=ok[0].get("rank_split") if ok else None, n_eval=n_eval)

    def mean(key):
        vals = [r[key] for r in ok if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        return statistics.fmean(vals) if vals else None

    for key in ("best_val_acc", "final_val_acc", "test_acc", "best_val_loss", "best_val_top5", "epochs_trained",
                "train_time_s", "time_per_epoch_s", "train_img_s", "infer_img_s", "latency_p50_ms",
                "latency_p95_ms", "params", "flops", "peak_mem_mb", "temperature", "ece_before", "ece_after"):
        row[key] = mean(key)
    speeds = [r["train_img_s"] for r in ok if r.get("train_img_s")]
    row["train_img_s_std"] = statistics.stdev(speeds) if len(speeds) >= 2 else None
    flagged = [r for r in ok if r.get("undertrained")]
    row["undertrained"] = bool(flagged)
    if flagged:
        row["undertrained_reason"] = f"{len(flagged)}/{len(ok)} runs: " + flagged[0]["undertrained_reason"]
        needs = [r["needed_s"] for r in flagged if r.get("needed_s")]
        row["needed_s"] = max(needs) if needs else None
        row["needed_epochs"] = max((r["needed_epochs"] for r in flagged if r.get("needed_epochs")), default=None)
    reasons = sorted({r["reason"] for r in runs if r.get("reason")})
    row["reason"] = "; ".join(reasons) or None
    f1 = [r["class_f1"] for r in ok if r.get("class_f1")]
    row["class_f1"] = [statistics.fmean(col) for col in zip(*f1)] if f1 else None
    row["run_dir"] = ok[0]["run_dir"] if ok else None
    row["run_dirs"] = [r["run_dir"] for r in ok]
    # a model's runs differ only in seed and fold: its first (finished) run says what it started from
    src = ok[0] if ok else (runs[0] if runs else {})
    row.update({k: src.get(k) for k in ("finetune", "pretrained", "pretrained_kind", "pretrained_name",
                                         "pretrained_sha256")})
    return row


def add_relative_speeds(rows: list[dict], baseline: str | None) -> None:
    """speed_vs_fastest = train img/s / the fastest's (1.00x = fastest); speed_vs_baseline = / baseline's."""
    timed = [r for r in rows if r.get("runs") and r.get("train_img_s")]
    fastest = max((r["train_img_s"] for r in timed), default=None)
    base = next((r["train_img_s"] for r in timed if r["model"] == baseline), None)
    for r in rows:
        ok = r in timed
        r["speed_vs_fastest"] = r["train_img_s"] / fastest if ok else None
        r["speed_vs_baseline"] = r["train_img_s"] / base if ok and base else None


def _speed_samples(runs: list[dict]) -> list[float]:
    ok = [r for r in runs if r.get("status") == "ok" and r.get("train_img_s")]
    if len(ok) >= 2:
        return [r["train_img_s"] for r in ok]
    return list(ok[0].get("epoch_img_s") or [ok[0]["train_img_s"]]) if ok else []


def pairwise(models: list[str], runs: list[dict], predictions: dict[str, dict], *,
             test_train_ratio: float | None = None) -> list[dict]:
    """Every ordered pair (a, b) with a listed before b: stats.compare_pair of their matched runs,
    the train-speed ratio, and Holm-adjusted p-values over the family of pairs."""
    by_model: dict[str, dict] = {m: {} for m in models}
    for r in runs:
        if r.get("status") == "ok" and r["model"] in by_model:
            pred = predictions.get(r["run_dir"])
            correct = None if pred is None else (pred["targets"] == pred["preds"])
            by_model[r["model"]][(r["seed"], r["fold"], r["repeat"])] = {
                "acc": r["rank_acc"], "correct": correct, "ids": None if pred is None else pred["ids"]}
    pairs = []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            res = stats.compare_pair(by_model[a], by_model[b], test_train_ratio=test_train_ratio)
            sp = stats.speed_ratio(_speed_samples([r for r in runs if r["model"] == a]),
                                   _speed_samples([r for r in runs if r["model"] == b]))
            pairs.append({"a": a, "b": b, **{k: v for k, v in res.items() if k != "tests"},
                          "tests": [{k: v for k, v in t.items()} for t in res["tests"]],
                          "speed_ratio": sp["ratio"], "speed_lo": sp["lo"], "speed_hi": sp["hi"], "speed_p": sp["p"]})
    for p, adj in zip(pairs, stats.holm([p["p"] for p in pairs])):
        p["p_holm"] = adj
    return pairs


def disagreements(a: str, b: str, runs: list[dict], predictions: dict[str, dict]) -> dict | None:
    """Images one model gets right and the other wrong, each model's correctness taken as the
    majority over its runs (ties count as wrong). None without per-image predictions."""
    import numpy as np

    votes: dict[str, dict] = {a: {}, b: {}}
    info: dict = {}
    for r in runs:
        pred = predictions.get(r.get("run_dir")) if r.get("status") == "ok" else None
        if pred is None or r["model"] not in votes:
            continue
        for i, (img, t, p) in enumerate(zip(pred["ids"].tolist(), pred["targets"].tolist(), pred["preds"].tolist())):
            votes[r["model"]].setdefault(img, []).append(p)
            info[img] = (t, i, pred["split"])
    common = [img for img in votes[a] if img in votes[b]]
    if not common:
        return None

    def majority(model, img):
        preds = votes[model][img]
        vals, counts = np.unique(preds, return_counts=True)
        top = vals[counts.argmax()]
        return int(top), bool(np.sum(np.asarray(preds) == info[img][0]) * 2 > len(preds))

    only = {a: [], b: []}
    for img in common:
        (pa, ra), (pb, rb) = majority(a, img), majority(b, img)
        if ra != rb:
            only[a if ra else b].append({"id": img, "index": info[img][1], "split": info[img][2],
                                         "target": info[img][0], "pred_a": pa, "pred_b": pb})
    return {"a": a, "b": b, "n_images": len(common), "only_a": only[a], "only_b": only[b]}


# ---------------------------------------------------------------- the comparison

def explain_section(cfg: CompareConfig, records: dict, model_data: dict, out: Path) -> list:
    """The report's "Where each model looks" section: each model's map (its first run, on the first
    fold's validation images) side by side for the same images. Drawn once, for the final report.
    The grid normalises every model's input with one data's statistics, so it shows the models that
    share the first finished model's preprocessing."""
    from imgarena.engine.distributed import resolve_device
    from imgarena.explain import explain_grid_for_report
    from imgarena.report import explain_report_section

    first = {}
    for spec, r in records.items():
        if r.get("status") == "ok" and r.get("run_dir") and spec.fold == 0 and spec.repeat == 0:
            first.setdefault(spec.model, (spec, out / r["run_dir"]))
    if not first:
        return []
    spec0 = next(iter(first.values()))[0]
    data = model_data[spec0.model]
    shown = {m: rd for m, (_, rd) in first.items() if model_data[m] is data}
    path = explain_grid_for_report(out, shown, data_for_run(data, cfg, spec0), n=8, device=resolve_device(cfg.device))
    return [explain_report_section(path)] if path is not None else []


def run_compare(cfg: CompareConfig, *, progress: bool = True, log=print, extra_sections=None) -> dict:
    """Train and measure every run; returns the results written to results.json (plus "report").

    `extra_sections(results, compare_dir) -> list[report.ReportSection]` adds sections to the
    report (e.g. side-by-side explanations) just before its configuration section."""
    from imgarena.bench import failure_reason
    from imgarena.data import load_data

    validate(cfg)
    _validate_design(cfg)
    out = compare_dir(cfg)
    records_dir = out / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "compare.yaml")

    recipes = {m: recipe_overrides(cfg, m) for m in cfg.models}
    plan = run_plan(cfg)
    tcs = {spec: run_train_config(cfg, spec, recipes[spec.model], out) for spec in plan}
    # Once per distinct preprocessing (one for all models unless pretrained weights bring their own):
    # the same files, split and pixel cache for every model.
    loaded: dict[str, object] = {}
    model_data = {}
    for spec, tc in tcs.items():
        key = json.dumps(to_dict(tc.data), sort_keys=True, default=str)
        if key not in loaded:
            loaded[key] = load_data(tc.data, progress=progress)
            if len(loaded) > 1:
                loaded[key] = same_split_as(loaded[key], next(iter(loaded.values())))
        model_data[spec.model] = loaded[key]
    data = model_data[cfg.models[0]]
    records = {spec: _empty_record(spec, "pending", config_key(tc), tc=tc) for spec, tc in tcs.items()}
    results = {"config": to_dict(cfg), "conditions": conditions_text(cfg, data, tcs), "rule": rank_rule(data),
               "classes": list(data.classes), "state": "running"}
    sizes = {"train": len(data.train), "val": len(data.val), "test": len(data.test) if data.test is not None else 0}

    def publish(state: str, *, full: bool = True, sections=extra_sections) -> Path:
        runs = list(records.values())
        preds = {}
        for spec, r in records.items():
            if r.get("status") == "ok":
                try:
                    preds[r["run_dir"]] = run_predictions(out, out / r["run_dir"], tcs[spec],
                                                          data_for_run(model_data[spec.model], cfg, spec))
                except (OSError, UserError):  # the run folder went missing: its record stands, no per-image test
                    pass
        models = [aggregate_model(m, [r for r in runs if r["model"] == m]) for m in cfg.models]
        add_relative_speeds(models, cfg.baseline)
        pairs = pairwise(cfg.models, runs, preds,
                         test_train_ratio=(sizes["val"] / sizes["train"]) if cfg.folds > 1 else None)
        ranked = sorted((m for m in models if m.get("acc_mean") is not None), key=lambda m: -m["acc_mean"])
        dis = disagreements(ranked[0]["model"], ranked[1]["model"], runs, preds) if len(ranked) >= 2 else None
        if dis is not None and cfg.folds == 1:  # the images themselves, for the report's figure
            for item in dis["only_a"][:DISAGREE_SHOWN] + dis["only_b"][:DISAGREE_SHOWN]:
                item["image"] = getattr(model_data[dis["a"]], item["split"]).images[item["index"]]
        results.update(state=state, runs=runs, models=models, pairwise=pairs, disagreements=strip_images(dis),
                       headline=headline(models, pairs, cfg.baseline))
        return write_report(out, results, disagreement=dis, figures=full,
                            sections=sections(results, out) if (sections and full) else ())

    current = None
    n = len(plan)
    speed_done: set[str] = set()
    last_full = None
    try:
        for i, spec in enumerate(plan, 1):
            tc = tcs[spec]
            label = spec.model + (f" seed {spec.seed}" if cfg.seeds > 1 else "") + (
                f" fold {spec.fold + 1}/{cfg.folds}" + (f" repeat {spec.repeat + 1}" if cfg.repeats > 1 else "")
                if cfg.folds > 1 else "")
            rec_path = records_dir / f"{tc.name}.json"
            saved = _read_record(rec_path)
            if (saved and saved.get("status") == "ok" and saved.get("version") == RECORD_VERSION
                    and saved.get("run_dir") and (out / saved["run_dir"]).is_dir()):
                log(f"[{i}/{n}] {label}: already finished ({saved['run_dir']}), skipped")
                records[spec] = saved
                if saved.get("infer_img_s") is not None:
                    speed_done.add(spec.model)
                continue
            action = {"new": "training", "resumable": "resuming", "finished": "measuring"}[run_state(out / tc.name)]
            log(f"[{i}/{n}] {label}: {action} -> {out / tc.name}")
            current = spec
            try:
                rec = _train_one(spec, tc, data_for_run(model_data[spec.model], cfg, spec), out, progress,
                                 speed=spec.model not in speed_done)
                if rec.get("infer_img_s") is not None:
                    speed_done.add(spec.model)
            except Exception as e:  # a run that fails must not stop the others
                reason = str(e) if isinstance(e, UserError) else failure_reason(e)
                trace = records_dir / f"{tc.name}.error.txt"
                atomic_write_text(trace, traceback.format_exc())
                rec = _empty_record(spec, "failed", config_key(tc), reason=reason, tc=tc)
                log(f"[{i}/{n}] {label}: FAILED ({reason}; traceback in {trace})")
            finally:
                _free_memory()
            records[spec] = rec
            current = None
            atomic_write_text(rec_path, json.dumps(rec, indent=2, default=str) + "\n")
            if i < n:  # after the last run the final report follows at once
                # results.json/csv after every run; the figures and pages (seconds of drawing) after the
                # first run, then at a round's end at most every REPORT_EVERY_S, so that the report's
                # cost does not grow with the number of seeds
                round_done = i % len(cfg.models) == 0
                full = last_full is None or (round_done and time.monotonic() - last_full >= REPORT_EVERY_S)
                publish("running", full=full)
                if full:
                    last_full = time.monotonic()
    except KeyboardInterrupt:
        # Ctrl-C: the finished runs stay recorded (a re-run skips them); the report says what is missing.
        if current is not None:
            records[current] = _empty_record(current, "interrupted", config_key(tcs[current]),
                                             reason="interrupted (Ctrl-C)", tc=tcs[current])
        publish("interrupted")
        raise

    states = {r["status"] for r in records.values()}

    def final_sections(res, folder):  # the explanation maps are drawn once, for the final report
        return [*explain_section(cfg, records, model_data, folder),
                *(extra_sections(res, folder) if extra_sections else [])]

    report = publish("complete" if states <= {"ok"} else "complete with failures", sections=final_sections)
    return {**results, "report": str(report), "compare_dir": str(out)}


def _free_memory() -> None:
    """Drop a finished or failed run's tensors (and cached CUDA blocks) before the next run starts."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summary_table(results: dict) -> str:
    """The terminal table printed at the end of `imgarena compare`: one row per model."""
    from imgarena.report import TERMINAL_COLUMNS, display_rows

    return format_table(display_rows(results["models"]), TERMINAL_COLUMNS)
