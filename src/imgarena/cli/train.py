"""`imgarena train DATA --model NAME`: train one model; every TrainConfig field is an option.

Layering (later wins): TrainConfig defaults < `--recipe recommended` < `--config run.yaml` < flags.
`--resume runs/NAME` takes the run's own config.yaml as the file layer and continues it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from imgarena.cli.common import add_command, add_data_args, data_config_from_args, flags_for
from imgarena.config import AMP_MODES, AUGMENT_PRESETS, DISTILL_MODES, FINETUNE_MODES, OPTIMIZERS, SCHEDULES
from imgarena.errors import UserError

EXAMPLES = """
imgarena train data/rice --model mixer_t4 --img-size 32 --epochs 10
imgarena train sample --model mlp --epochs 3                          # built-in sample, offline
imgarena train fashion-mnist --model vit_t4 --recipe recommended --time-budget 5m
imgarena train data/rice --model convnext_atto_cifar --optimizer adamw --weight-decay 0.05 \\
    --label-smoothing 0.1 --drop-path 0.1 --mixup 0.2 --ema --patience 5
imgarena train --config run.yaml --lr 3e-4                             # the file, with one change
imgarena train --resume runs/mixer_t4-20240101-120000                  # continue a killed run
torchrun --nproc_per_node=2 -m imgarena train data/rice --model resnet18_cifar   # DDP (gloo on CPU)
"""

# argparse dest -> TrainConfig field, for every plain (non-data) option below.
_FIELDS = ("model", "pretrained", "epochs", "time_budget", "batch_size", "lr", "optimizer", "weight_decay",
           "momentum", "schedule", "warmup_epochs", "step_size", "gamma", "label_smoothing", "mixup", "cutmix",
           "augment", "drop_path", "ema", "ema_decay", "clip_grad", "accum_steps", "seed", "device", "amp",
           "channels_last", "compile", "patience", "class_weights", "out_dir", "name", "eval_batch_size",
           "deterministic", "state_every", "model_kwargs", "finetune", "freeze_epochs", "lr_backbone", "layer_decay",
           "feature_views", "distill_from", "distill", "distill_temperature", "distill_weight", "distill_token")


def register(sub) -> None:
    p = add_command(sub, "train", "train a model on an image folder, labels CSV or built-in dataset", EXAMPLES, run)
    p.add_argument("data", nargs="?", default=None, metavar="DATA",
                   help="image folder, labels .csv, or built-in (sample, fashion-mnist, cifar10); "
                        "optional with --config/--resume")
    p.add_argument("--model", default=None, help="model name (`imgarena models` lists them; timm/<name> works); default mixer_t4")
    p.add_argument("--config", default=None, metavar="YAML", help="options from a YAML file (e.g. a run's config.yaml); flags override it")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed/stopped run from its state.pt")
    p.add_argument("--recipe", choices=["recommended", "none"], default="none",
                   help="recommended: the model family's tuned optimizer/schedule/regularisation as a base")
    add_data_args(p)

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 10; with --time-budget alone: until the budget)")
    g.add_argument("--time-budget", default=None, metavar="DURATION", help="stop training after e.g. 90s, 5m, 1h30m (then evaluate)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch size (default 128; split across DDP ranks)")
    g.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation micro-batches per optimizer step (default 1)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="batch size for evaluation (default 256)")
    g.add_argument("--seed", type=int, default=None, help="seed of weights init, batch order and augmentation (default 0)")
    g.add_argument("--patience", type=int, default=None, help="early stopping: stop after N epochs without a better val accuracy")
    g.add_argument("--class-weights", choices=["auto", "none"], default=None, help="auto: weight the loss by inverse class frequency")

    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None, help="default adamw")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 adam/adamw, 0.1 sgd, x batch/256; linear/two-stage fine-tunes: 1e-2 adam/adamw, 0.1 sgd)")
    g.add_argument("--weight-decay", type=float, default=None, help="default 0.05 adamw, 0 adam, 5e-4 sgd (never on norms/biases/embeddings)")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    g.add_argument("--schedule", choices=list(SCHEDULES), default=None, help="learning-rate schedule, per step (default cosine)")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup length in epochs, fractions allowed (default 0)")
    g.add_argument("--step-size", type=int, default=None, help="step schedule: decay every N epochs (default 7)")
    g.add_argument("--gamma", type=float, default=None, help="step schedule: decay factor (default 0.1)")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")

    g = p.add_argument_group("regularization")
    g.add_argument("--augment", choices=list(AUGMENT_PRESETS), default=None, help="augmentation preset (default light)")
    g.add_argument("--label-smoothing", type=float, default=None, help="e.g. 0.1 (default 0)")
    g.add_argument("--mixup", type=float, default=None, help="mixup Beta alpha, e.g. 0.2 (default 0: off)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix Beta alpha, e.g. 1.0 (default 0: off)")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default 0)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="keep an EMA of the weights and checkpoint it")
    g.add_argument("--ema-decay", type=float, default=None, help="EMA decay (default 0.999)")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained", default=None, metavar="SPEC",
                   help="timm (timm's hub weights), a weights file (timm's or imgarena's format), or an earlier run folder "
                        "(its backbone, a fresh head); the weights' preprocessing becomes the run's")

    g = p.add_argument_group("fine-tuning")
    g.add_argument("--finetune", choices=list(FINETUNE_MODES), default=None,
                   help="full (train everything), linear (frozen backbone: head on stored features), two-stage "
                        "(head for --freeze-epochs, then everything); default two-stage with --pretrained, else full")
    g.add_argument("--freeze-epochs", type=int, default=None, help="two-stage: epochs that train the head only (default 1)")
    g.add_argument("--lr-backbone", type=float, default=None, help="backbone lr = --lr x this (default 0.1 for two-stage, 1 for full)")
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay from the head down the blocks, e.g. 0.75")
    g.add_argument("--feature-views", type=int, default=None,
                   help="linear: stored feature views per training image (default 1, the centre crop; N > 1: N views with --augment)")

    g = p.add_argument_group("distillation")
    g.add_argument("--distill-from", default=None, metavar="RUN", help="a trained run folder or checkpoint to learn from (the teacher)")
    g.add_argument("--distill", choices=list(DISTILL_MODES), default=None,
                   help="soft: match the teacher's tempered probabilities; hard: its predicted class as the label (default soft)")
    g.add_argument("--distill-temperature", type=float, default=None, help="soft distillation temperature (default 3)")
    g.add_argument("--distill-weight", type=float, default=None, help="share of the loss from the teacher, 0..1 (default 0.5)")
    g.add_argument("--distill-token", action=argparse.BooleanOptionalAction, default=None,
                   help="DeiT's distillation token (ViT family; default on when distilling a ViT)")
    g.add_argument("--model-kwargs", default=None, metavar="YAML", help="architecture overrides as a YAML mapping, e.g. '{depth: 4}'")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="auto (default: CUDA when available), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=list(AMP_MODES), default=None, help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels-last memory format (convnets on GPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (slow start, off by default)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None, help="deterministic algorithms (slower on GPU)")

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=None, help="parent folder of runs (default runs)")
    g.add_argument("--name", default=None, help="run folder name (default <model>-<timestamp>)")
    g.add_argument("--state-every", type=int, default=None, help="save resumable state every N optimizer steps (default 200; 0: epoch ends)")


def config_from_args(args):
    """The one argparse -> TrainConfig conversion. A bad value is named as the user wrote it:
    by its flag, or as KEY in the YAML file it came from."""
    from imgarena.config import TrainConfig, from_dict, load_yaml, mapping_of

    base: dict = {}
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise UserError(f"{run} is not a run folder (no config.yaml): pass runs/NAME written by `imgarena train`")
        if args.config:
            raise UserError("--resume continues a run with its own config.yaml: drop --config")
        where = str(run / "config.yaml")
        base = load_yaml(where, TrainConfig)
        source = mapping_of(base.get("data"), "data", where).get("source")
        if args.data is not None and str(args.data) != str(source):
            raise UserError(f"--resume {run}: the run trained on {source!r}, not "
                            f"{args.data!r}; drop DATA or start a new run")
        base.update(out_dir=str(run.parent), name=run.name, resume=True)
        file_cfg = base
    else:
        where = str(args.config) if args.config else None
        file_cfg = load_yaml(args.config, TrainConfig) if args.config else {}
        model = args.model or file_cfg.get("model") or TrainConfig.model
        if args.recipe == "recommended":
            from imgarena.recipes import recommended_recipe

            base.update(recommended_recipe(str(model), pretrained=args.pretrained or file_cfg.get("pretrained")))
        base.update(file_cfg)
    flags = {f: getattr(args, f) for f in _FIELDS if getattr(args, f, None) is not None}
    if "time_budget" in flags and "epochs" not in flags and "epochs" not in file_cfg and not args.resume:
        base["epochs"] = 100_000  # train until the budget is spent; the schedule anneals by time
    if "model_kwargs" in flags:
        flags["model_kwargs"] = _yaml_mapping(flags["model_kwargs"], "--model-kwargs")
    base.update(flags)
    data = mapping_of(base.get("data"), "data", where)
    if args.data is None and not data.get("source"):
        raise UserError("no data: pass DATA (a folder, labels .csv or built-in name such as sample), or --config/--resume")
    base["data"] = data_config_from_args(args.data, args, data, where=where)
    return from_dict(TrainConfig, base, where=where, flags=flags_for(flags))


def _yaml_mapping(text: str, flag: str) -> dict:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"{flag} {text!r} must be a YAML mapping, e.g. '{{depth: 4, hidden_dim: 256}}'")
    return value


def run(args) -> int:
    from imgarena.paths import ensure_writable_dir

    cfg = config_from_args(args)  # before importing torch: a bad option is reported at once
    ensure_writable_dir(cfg.out_dir, "--out-dir" if args.out_dir or not args.config else f"out_dir in {args.config}")
    ensure_writable_dir(cfg.data.cache_dir, "--cache-dir")
    from imgarena.engine.train import run_training

    summary = run_training(cfg, progress=True)
    if int(os.environ.get("RANK", "0")) == 0:
        line = f"best val acc {summary['best_val_acc']:.2%} at epoch {summary['best_epoch']}"
        if summary.get("test_acc") is not None:
            line += f"; test acc {summary['test_acc']:.2%} (best checkpoint)"
        run_dir = summary["run_dir"]
        print(f"{line}\nrun folder: {run_dir}\nnext: imgarena eval {run_dir} DATA   |   imgarena predict {run_dir} IMAGES")
    return 0
