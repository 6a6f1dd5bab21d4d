"""`imgarena compare`: train several models under identical conditions; write a comparison report."""

from __future__ import annotations

EXAMPLES = """
imgarena compare ./rice --models mixer_s16,vit_s16,convnext_t,resnet50 --time-budget 10m
imgarena compare sample --models mixer_t4,vit_t4,mlp --epochs 3 --baseline vit_t4 --out runs/cmp
imgarena compare fashion-mnist --models mixer_t4,vit_t4 --subset 5000 --epochs 10 --recipe recommended
imgarena compare ./icons --models mlp,resnet18_cifar --epochs 5 --set lr=0.001 --set 'mlp:model_kwargs={hidden: [512]}'
imgarena compare --config compare.yaml      # a YAML file of CompareConfig keys (data, models, epochs, ...)
(re-run the same command to resume: finished models are skipped)
"""


def register(sub) -> None:
    from imgarena.cli.common import add_command, add_data_args
    from imgarena.config import AUGMENT_PRESETS

    p = add_command(sub, "compare", "Train several architectures on the same data under the same conditions and report.",
                    EXAMPLES, run)
    p.add_argument("data", nargs="?", default=None, help="image folder, labels CSV, or built-in (sample, fashion-mnist, cifar10)")
    p.add_argument("--models", default=None, help="comma-separated model names (see `imgarena models`)")
    p.add_argument("--recipe", choices=["same", "recommended"], default=None,
                   help="same: one recipe for all (default); recommended: each family's optimizer settings")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 10 unless --time-budget is given)")
    p.add_argument("--time-budget", default=None, help="training time per model, e.g. 90s, 5m, 1h")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for every model (default 128)")
    p.add_argument("--baseline", default=None, help="report every model's speed relative to this one")
    p.add_argument("--out", default=None, help="compare folder (default runs/compare-<data name>)")
    p.add_argument("--seed", type=int, default=None, help="training seed shared by every model (default 0)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--augment", choices=list(AUGMENT_PRESETS), default=None,
                   help="augmentation for every model (default light)")
    p.add_argument("--lr", type=float, default=None, help="learning rate for every model")
    p.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default=None, help="optimizer for every model")
    p.add_argument("--set", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                   help="any `imgarena train` option (TrainConfig key) for every model, or for one with MODEL:; "
                        "VALUE is YAML (repeatable)")
    p.add_argument("--config", default=None, help="YAML file of compare options; flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_args(p)


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
    """CompareConfig from a --config file (if any) with command-line flags on top."""
    from imgarena.cli.common import data_config_from_args
    from imgarena.config import CompareConfig, from_dict, load_yaml
    from imgarena.errors import UserError, parse_duration

    base = load_yaml(args.config) if args.config else {}
    if args.data is None and "source" not in (base.get("data") or {}):
        raise UserError("no data given: pass a folder, CSV or built-in name, e.g. `imgarena compare sample --models mlp,mixer_t4`")
    d = dict(base)
    d["data"] = data_config_from_args(args.data, args, base=base.get("data"))
    if args.models:
        d["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    elif "models" not in base:
        raise UserError("no models given: pass --models a,b (see `imgarena models`)")
    for key in ("recipe", "epochs", "batch_size", "baseline", "out", "seed", "device"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    if args.time_budget is not None:
        d["time_budget"] = parse_duration(args.time_budget)
    elif d.get("time_budget") is not None:
        d["time_budget"] = parse_duration(d["time_budget"])
    shared, per = parse_set(args.set, d["models"])
    d["train"] = {**(base.get("train") or {}), **{k: getattr(args, k) for k in ("augment", "lr", "optimizer")
                                                  if getattr(args, k) is not None}, **shared}
    d["per_model"] = {m: {**(base.get("per_model") or {}).get(m, {}), **per.get(m, {})}
                      for m in {*(base.get("per_model") or {}), *per}}
    return from_dict(CompareConfig, d, where=args.config or "compare options")


def run(args) -> int:
    from imgarena.comparison import compare_dir, run_compare, summary_table
    from imgarena.report import baseline_sentences

    cfg = build_config(args)
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
    for line in baseline_sentences(results["models"], cfg.baseline):
        print(f"  {line}")
    print(f"report: {results['report']}")
    return 0 if all(r["status"] == "ok" for r in results["models"]) else 1
