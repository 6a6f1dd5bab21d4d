"""`imgarena compare`: train several models under identical conditions; write a comparison report."""

from __future__ import annotations

import argparse

EXAMPLES = """
imgarena compare ./rice --models mixer_s16,vit_s16,convnext_t,resnet50 --time-budget 10m
imgarena compare sample --models mixer_t4,vit_t4,mlp --epochs 3 --baseline vit_t4 --out runs/cmp
imgarena compare fashion-mnist --models mixer_t4,vit_t4 --subset 5000 --epochs 10 --recipe recommended
imgarena compare ./icons --models mlp,resnet18_cifar --epochs 5 --set lr=0.001 --set 'mlp:model_kwargs={hidden: [512]}'
imgarena compare sample --models mixer_t4,vit_t4,cnn_s --seeds 3 --time-budget 40s   # mean, CI and tests over 3 runs each
imgarena compare ./photos --models mlp,cnn_s --folds 5 --repeats 2 --group-by '^([^/]+/[^_]+)_'   # grouped 5-fold CV, twice
imgarena compare ./photos --models resnet50,mobilenetv2,convnext_t --pretrained timm --finetune linear --augment photo
imgarena compare ./photos --models mlp,cnn_s --set cnn_s:pretrained=runs/cnn_s-fashion   # cnn_s two-stage from a run, mlp from scratch
imgarena compare --config compare.yaml      # a YAML file of CompareConfig keys (data, models, epochs, ...)
(re-run the same command to resume: finished models are skipped)
"""


def register(sub) -> None:
    from imgarena.cli.common import add_command, add_data_args
    from imgarena.config import AUGMENT_PRESETS, COMPARE_RECIPES, FINETUNE_MODES, OPTIMIZERS

    p = add_command(sub, "compare", "Train several architectures on the same data under the same conditions and report.",
                    EXAMPLES, run)
    p.add_argument("data", nargs="?", default=None, help="image folder, labels CSV, or built-in (sample, fashion-mnist, cifar10)")
    p.add_argument("--models", default=None, help="comma-separated model names (see `imgarena models`)")
    p.add_argument("--recipe", choices=list(COMPARE_RECIPES), default=None,
                   help="same: one recipe for all (default); recommended: each family's optimizer settings")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 10 unless --time-budget is given)")
    p.add_argument("--time-budget", default=None, help="training time per model, e.g. 90s, 5m, 1h")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for every model (default 128)")
    p.add_argument("--baseline", default=None, help="report every model's speed relative to this one")
    p.add_argument("--out", default=None, help="compare folder (default runs/compare-<data name>)")
    p.add_argument("--seed", type=int, default=None, help="training seed shared by every model (default 0)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train every model N times (seeds SEED..SEED+N-1, same split): mean, 95%% CI and "
                        "paired tests across runs (default 1)")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="stratified, grouped K-fold cross-validation: every image is validated exactly once "
                        "(default 1: the data's own split)")
    p.add_argument("--repeats", type=int, default=None, metavar="R",
                   help="with --folds: repeat the K folds R times, reshuffled (default 1)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--augment", choices=list(AUGMENT_PRESETS), default=None,
                   help="augmentation for every model (default light)")
    p.add_argument("--lr", type=float, default=None, help="learning rate for every model")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None, help="optimizer for every model")
    p.add_argument("--pretrained", default=None, metavar="SPEC",
                   help="weights every model starts from: timm (each model's timm hub weights), timm:NAME.TAG, a "
                        "weights file or an earlier run folder; per model: --set MODEL:pretrained=SPEC (null: random init)")
    p.add_argument("--finetune", choices=list(FINETUNE_MODES), default=None,
                   help="fine-tune mode for every model: full, linear (frozen backbone, head only) or two-stage "
                        "(default: two-stage for a model with pretrained weights, else full)")
    p.add_argument("--set", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                   help="any `imgarena train` option (TrainConfig key) for every model, or for one with MODEL:; "
                        "VALUE is YAML (repeatable)")
    p.add_argument("--config", default=None, help="YAML file of compare options; flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_args(p, folds=False)  # compare's own --folds/--repeats run every fold


# Flags that set one TrainConfig option for every model (a --set MODEL:KEY=VALUE overrides them for one).
_SHARED_FLAGS = ("augment", "lr", "optimizer", "pretrained", "finetune")


def parse_set(items: list[str], models: list[str]) -> tuple[dict, dict]:
    """`--set KEY=VALUE` / `--set MODEL:KEY=VALUE` -> (shared options, per-model options)."""
    import yaml

    from imgarena.errors import UserError

    shared: dict = {}
    per: dict = {}
    for item in items:
        lhs, sep, value = item.partition("=")
        if not sep or not lhs.strip():
            raise UserError(f"--set {item!r}: write KEY=VALUE or MODEL:KEY=VALUE, e.g. --set lr=0.001")
        model, colon, key = lhs.strip().rpartition(":")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: cannot read {value!r} as a YAML value") from None
        if colon and model not in models:
            raise UserError(f"--set {item!r}: {model!r} is not one of --models ({', '.join(models)})")
        (per.setdefault(model, {}) if colon else shared)[key] = parsed
    return shared, per


def build_config(args):
    """CompareConfig from a --config file (if any) with command-line flags on top. A bad value is
    named as the user wrote it: by its flag, or as KEY in the YAML file."""
    from imgarena.cli.common import data_config_from_args, flags_for
    from imgarena.config import CompareConfig, from_dict, load_yaml, mapping_of
    from imgarena.errors import UserError

    where = str(args.config) if args.config else None
    base = load_yaml(args.config, CompareConfig) if args.config else {}
    data = mapping_of(base.get("data"), "data", where)
    if args.data is None and "source" not in data:
        raise UserError("no data given: pass a folder, CSV or built-in name, e.g. `imgarena compare sample --models mlp,mixer_t4`")
    d = dict(base)
    # compare's --folds/--repeats drive the run plan (every fold is trained); they are not the data
    # layer's single-fold selection, so the data options are read without them
    data_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("folds", "repeats")})
    d["data"] = data_config_from_args(args.data, data_args, base=data, where=where)
    given = {}
    if args.models:
        d["models"] = args.models
        given["models"] = args.models
    elif "models" not in base:
        raise UserError("no models given: pass --models a,b (see `imgarena models`)")
    for key in ("recipe", "epochs", "batch_size", "baseline", "out", "seed", "seeds", "folds", "repeats", "device",
                "time_budget"):
        if getattr(args, key) is not None:
            d[key] = given[key] = getattr(args, key)
    # The config turns "a,b" into a list and checks each name; --set needs the list first.
    models = from_dict(CompareConfig, {"models": d["models"]}, where=where, flags=flags_for(given)).models
    shared, per = parse_set(args.set, models)
    train = mapping_of(base.get("train"), "train", where)
    per_model = mapping_of(base.get("per_model"), "per_model", where)
    d["train"] = {**train, **{k: getattr(args, k) for k in _SHARED_FLAGS if getattr(args, k) is not None}, **shared}
    d["per_model"] = {m: {**mapping_of(per_model.get(m), f"per_model.{m}", where), **per.get(m, {})}
                      for m in {*per_model, *per}}
    flags = {**flags_for(given), **{f"train.{k}": f"--{k}" for k in _SHARED_FLAGS if getattr(args, k) is not None}}
    return from_dict(CompareConfig, d, where=where, flags=flags)


def run(args) -> int:
    from imgarena.comparison import compare_dir, run_compare, summary_table
    from imgarena.report import baseline_sentences

    from imgarena.paths import ensure_writable_dir

    cfg = build_config(args)
    ensure_writable_dir(compare_dir(cfg), "--out")
    ensure_writable_dir(cfg.data.cache_dir, "--cache-dir")
    try:
        results = run_compare(cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        report = compare_dir(cfg) / "report.html"
        if report.is_file():
            print(f"\npartial report: {report} (re-run the same command to resume)")
        raise
    print()
    print(summary_table(results))
    print(f"\n{results['headline']}")
    print(f"({results['rule']})")
    for line in baseline_sentences(results["models"], cfg.baseline, results.get("pairwise")):
        print(f"  {line}")
    print(f"report: {results['report']}")
    return 0 if all(r["status"] == "ok" for r in results["models"]) else 1
