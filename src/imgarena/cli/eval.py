"""`imgarena eval RUN_OR_CHECKPOINT DATA`: accuracy, per-class report and confusion matrix of a
trained model on any image source, using the preprocessing stored in the checkpoint."""

from __future__ import annotations

import json
import sys

from imgarena.cli.common import add_command

EXAMPLES = """
imgarena eval runs/mixer_t4-20240101-120000 data/rice_test          # a held-out folder of class subfolders
imgarena eval runs/mixer_t4-20240101-120000 fashion-mnist           # its test split
imgarena eval runs/mixer_t4-20240101-120000/last.safetensors data/rice --split val --tta flip
imgarena eval runs/mixer_t4-20240101-120000 data/rice_test --out eval-rice --json > eval.json
"""


def register(sub) -> None:
    from imgarena.config import AMP_MODES, CHECKPOINTS, EVAL_SPLITS

    p = add_command(sub, "eval", "score a trained model on a folder, labels CSV or built-in dataset", EXAMPLES, run)
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run folder or .safetensors checkpoint")
    p.add_argument("data", metavar="DATA", help="image folder (class subfolders), labels .csv, or built-in name")
    p.add_argument("--which", choices=list(CHECKPOINTS), default="best", help="checkpoint of a run folder (default best)")
    p.add_argument("--split", choices=list(EVAL_SPLITS), default="auto",
                   help="auto (default): the test split when DATA has one, else every image")
    p.add_argument("--tta", nargs="?", const="flip", default="none", metavar="MODE",
                   help="test-time augmentation: none, flip (when --tta is given alone), crop, flip-crop")
    p.add_argument("--batch-size", type=int, default=256, help="images per model call (default 256)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=list(AMP_MODES), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default=None, metavar="DIR", help="also write eval.json, per_class.csv, confusion_matrix.png, errors.png")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of the text report")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default ~/.cache/imgarena or $IMGARENA_CACHE)")
    p.add_argument("--workers", type=int, default=None, help="processes decoding images into the cache (default: all cores)")


def run(args) -> int:
    from imgarena.cli.common import data_config_from_args, flags_for
    from imgarena.config import EvalConfig, from_dict
    from imgarena.paths import ensure_writable_dir

    data = data_config_from_args(args.data, args)  # only --cache-dir and --workers exist here
    d = dict(checkpoint=args.checkpoint, data=data, which=args.which, split=args.split, batch_size=args.batch_size,
             device=args.device, amp=args.amp, tta=args.tta, out=args.out)
    cfg = from_dict(EvalConfig, d, flags={**flags_for(d), "checkpoint": "RUN_OR_CHECKPOINT"})
    ensure_writable_dir(cfg.data.cache_dir, "--cache-dir")
    if cfg.out is not None:
        ensure_writable_dir(cfg.out, "--out")
    from imgarena.engine.checkpoint_eval import evaluate_checkpoint, format_eval  # torch, once the options are good

    result = evaluate_checkpoint(cfg, progress=not args.json)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        sys.stdout.write(format_eval(result))
        if args.out:
            print(f"written to {args.out}/ (eval.json, per_class.csv, confusion_matrix.png, errors.png)")
    return 0
