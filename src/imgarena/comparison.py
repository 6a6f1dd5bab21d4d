"""`imgarena compare`: train several architectures under identical conditions and report.

Fairness: the data is loaded once (one cache, one split) and handed to every run; every model gets
the same seed (so the same batch order), augmentation, batch size and budget. `recipe="recommended"`
swaps in each family's optimisation settings (optimizer, lr, weight decay, schedule, ...) but never
the conditions in HELD_EQUAL.

Resumable: each model's record is keyed on its name plus a hash of its fully resolved TrainConfig
and saved in `records/` when it finishes, so re-running the same command skips finished models and
a changed option retrains only what it changes. The report is rewritten after every model and on
Ctrl-C, so the folder always holds a valid (possibly partial) report.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import re
import statistics
import traceback
from pathlib import Path

from imgarena.checkpoint import atomic_write_text
from imgarena.config import CompareConfig, TrainConfig, from_dict, save_yaml, to_dict
from imgarena.errors import UserError
from imgarena.report import RESULT_FIELDS, format_table, headline, read_history, write_report

# TrainConfig fields that define "the same conditions": a recommended recipe may not change them.
HELD_EQUAL = ("data", "img_size", "epochs", "time_budget", "batch_size", "augment", "mixup", "cutmix",
              "seed", "device", "amp", "channels_last", "out_dir", "name", "eval_batch_size", "deterministic")
# Set through CompareConfig's own fields, not through the shared `train` options.
COMPARE_OWNED = ("data", "epochs", "time_budget", "batch_size", "seed", "device", "out_dir", "name", "model")

INFER_BATCH = 64  # inference throughput batch size, as in the Mixer paper's throughput column
# Excluded from a model's key: where things are written, not what is trained.
_NOT_KEYED = ("out_dir", "name", "resume", "state_every")
_NOT_KEYED_DATA = ("cache_dir", "workers")


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

    return {k: v for k, v in recommended_recipe(model).items() if k not in HELD_EQUAL}


def model_train_config(cfg: CompareConfig, model: str, recipe: dict, out: Path | None = None) -> TrainConfig:
    """TrainConfig of one model: defaults < recipe < shared options < compare's conditions < per-model options."""
    d = dict(recipe)
    d.update(cfg.train)
    d.update(data=to_dict(cfg.data), model=model, batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
             epochs=cfg.epochs if cfg.epochs is not None else (10_000 if cfg.time_budget else 10),
             time_budget=cfg.time_budget)
    d.update(cfg.per_model.get(model, {}))
    tc = from_dict(TrainConfig, d, where=f"options for {model}")
    if out is not None:
        tc.out_dir = str(out)
        tc.name = f"{slug(model)}-{config_key(tc)}"
    return tc


def config_key(tc: TrainConfig) -> str:
    """Short hash of everything that changes what gets trained (not where it is written)."""
    d = {k: v for k, v in to_dict(tc).items() if k not in _NOT_KEYED}
    d["data"] = {k: v for k, v in d["data"].items() if k not in _NOT_KEYED_DATA}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def conditions_text(cfg: CompareConfig, data) -> str:
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
            f"{cfg.data.split_seed}, seed {cfg.seed}, batch {cfg.batch_size}, budget {' or '.join(budget)} per model, "
            f"recipe {cfg.recipe}" + (f", shared options {shared}" if shared else "")
            + (f". Per-model options: {per}" if per else "") + ".")


# ---------------------------------------------------------------- measuring one model

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
        "epochs": len(history),
        "best_val_acc": best["val_acc"], "best_epoch": best.get("epoch"), "best_val_loss": best.get("val_loss"),
        "best_val_top5": best.get("val_top5"), "final_val_acc": last["val_acc"], "final_val_loss": last.get("val_loss"),
        "train_time_s": history[-1].get("wall_time"), "time_per_epoch_s": median("epoch_time", full or history),
        "train_img_s": median("train_img_s", history),
    }


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


def add_relative_speeds(records: list[dict], baseline: str | None) -> None:
    """speed_vs_fastest = train img/s / the fastest's (1.00x = fastest); speed_vs_baseline = / baseline's."""
    timed = [r for r in records if r.get("status") == "ok" and r.get("train_img_s")]
    fastest = max((r["train_img_s"] for r in timed), default=None)
    base = next((r["train_img_s"] for r in timed if r["model"] == baseline), None)
    for r in records:
        ok = r in timed
        r["speed_vs_fastest"] = r["train_img_s"] / fastest if ok else None
        r["speed_vs_baseline"] = r["train_img_s"] / base if ok and base else None


def _empty_record(model: str, status: str, key: str = "", run_dir: str = "", reason: str = "") -> dict:
    rec = dict.fromkeys(RESULT_FIELDS)
    rec.update(model=model, status=status, key=key or None, run_dir=run_dir or None, reason=reason or None)
    return rec


def run_state(run_dir: Path) -> str:
    """finished (summary.json written) | resumable (state.pt, no summary) | new."""
    if (run_dir / "summary.json").is_file():
        return "finished"
    return "resumable" if (run_dir / "state.pt").is_file() else "new"


def _train_one(tc: TrainConfig, data, out: Path, progress: bool) -> dict:
    """Train, resume, or (when only its record was lost) just measure one model; returns its record."""
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
    rec = _empty_record(tc.model, "ok", config_key(tc), run_dir.name)
    rec.update(record_from_history(read_history(run_dir)))
    rec.update(params=summary.get("params"), flops=summary.get("flops"))
    rec.update(measure_speed(run_dir, tc))
    return rec


# ---------------------------------------------------------------- the comparison

def run_compare(cfg: CompareConfig, *, progress: bool = True, log=print) -> dict:
    """Train and measure every model; returns the results written to results.json (plus "report")."""
    from imgarena.bench import failure_reason
    from imgarena.data import load_data

    validate(cfg)
    out = compare_dir(cfg)
    records_dir = out / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "compare.yaml")

    data = load_data(cfg.data, progress=progress)  # once: every model sees the same arrays
    tcs = {m: model_train_config(cfg, m, recipe_overrides(cfg, m), out) for m in cfg.models}
    records = {m: _empty_record(m, "pending", config_key(tc)) for m, tc in tcs.items()}
    results = {"config": to_dict(cfg), "conditions": conditions_text(cfg, data), "state": "running",
               "models": list(records.values())}

    def publish(state: str) -> Path:
        add_relative_speeds(list(records.values()), cfg.baseline)
        results.update(state=state, models=list(records.values()), headline=headline(list(records.values()), cfg.baseline))
        return write_report(out, results)

    current = None
    try:
        for i, (model, tc) in enumerate(tcs.items(), 1):
            rec_path = records_dir / f"{tc.name}.json"
            saved = _read_record(rec_path)
            if saved and saved.get("status") == "ok" and saved.get("run_dir") and (out / saved["run_dir"]).is_dir():
                log(f"[{i}/{len(tcs)}] {model}: already finished ({saved['run_dir']}), skipped")
                records[model] = saved
                continue
            action = {"new": "training", "resumable": "resuming", "finished": "measuring"}[run_state(out / tc.name)]
            log(f"[{i}/{len(tcs)}] {model}: {action} -> {out / tc.name}")
            current = model
            try:
                rec = _train_one(tc, data, out, progress)
            except Exception as e:  # a model that fails must not stop the others
                reason = str(e) if isinstance(e, UserError) else failure_reason(e)
                trace = records_dir / f"{tc.name}.error.txt"
                atomic_write_text(trace, traceback.format_exc())
                rec = _empty_record(model, "failed", config_key(tc), reason=reason)
                log(f"[{i}/{len(tcs)}] {model}: FAILED ({reason}; traceback in {trace})")
            finally:
                _free_memory()
            records[model] = rec
            current = None
            atomic_write_text(rec_path, json.dumps(rec, indent=2, default=str) + "\n")
            if i < len(tcs):  # after the last model the final report follows at once
                publish("running")
    except KeyboardInterrupt:
        # Ctrl-C: the finished models stay recorded (a re-run skips them); the report says what is missing.
        if current is not None:
            records[current] = _empty_record(current, "interrupted", config_key(tcs[current]), reason="interrupted (Ctrl-C)")
        publish("interrupted")
        raise

    states = {r["status"] for r in records.values()}
    report = publish("complete" if states <= {"ok"} else "complete with failures")
    return {**results, "report": str(report), "compare_dir": str(out)}


def _free_memory() -> None:
    """Drop a finished or failed run's tensors (and cached CUDA blocks) before the next model starts."""
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
    """The terminal table printed at the end of `imgarena compare`."""
    from imgarena.report import TABLE_COLUMNS

    cols = [c for c in TABLE_COLUMNS if c[0] not in ("final_val_acc", "best_val_loss", "latency_p95_ms")]
    return format_table(results["models"], cols)
