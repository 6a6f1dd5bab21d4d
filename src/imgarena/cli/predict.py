"""`imgarena predict RUN_OR_CHECKPOINT PATHS...`: class names and probabilities for image files.

A `.onnx` file (from `imgarena export`) is run with onnxruntime only: nothing on that path imports torch.
"""

from __future__ import annotations

import glob
import os
import sys

from imgarena.cli.common import add_command

EXAMPLES = """
imgarena predict runs/rice-mixer_s16-0001 new_photos/                  # a folder, recursively
imgarena predict runs/rice-mixer_s16-0001 a.jpg b.png --topk 1
imgarena predict runs/rice-mixer_s16-0001 'shots/**/*.jpg' --format csv > preds.csv
imgarena predict runs/rice-mixer_s16-0001/best.safetensors photos/ --tta flip --format json
imgarena predict runs/rice-mixer_s16-0001/export/mixer_s16.onnx photos/   # torch-free (onnxruntime)
imgarena predict runs/rice-mixer_s16-0001 photos/ --min-prob 0.7     # "unknown" when unsure (calibrated)
"""


def register(sub) -> None:
    from imgarena.config import AMP_MODES, CHECKPOINTS

    p = add_command(sub, "predict", "classify image files with a trained run, checkpoint or exported .onnx", EXAMPLES, run)
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run folder, .safetensors checkpoint or .onnx export")
    p.add_argument("inputs", nargs="*", metavar="PATHS", help="image files, folders (searched recursively) and glob patterns")
    p.add_argument("--topk", type=int, default=3, help="classes shown per image, most likely first (default 3)")
    p.add_argument("--min-prob", type=float, default=None, metavar="P",
                   help="label an image 'unknown' when its top probability is below P (the top-k still shows "
                        "the classes); `imgarena eval` prints accuracy vs coverage per P")
    p.add_argument("--uncalibrated", action="store_true",
                   help="raw softmax: ignore the temperature fitted on val at the end of training")
    p.add_argument("--tta", nargs="?", const="flip", default="none", metavar="MODE",
                   help="test-time augmentation: none, flip (the default when --tta is given alone), crop, flip-crop")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the output to FILE instead of stdout")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=list(AMP_MODES), default="auto",
                   help="mixed precision: auto = bf16 on CUDA, fp32 on CPU (default)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (default: min(8, cores))")
    p.add_argument("--which", choices=list(CHECKPOINTS), default="best", help="checkpoint of a run folder (default best)")


def run(args) -> int:
    from imgarena.cli.common import flags_for
    from imgarena.config import TTA_MODES, PredictConfig, from_dict
    from imgarena.errors import UserError
    from imgarena.paths import check_output_file
    from imgarena.predict import format_rows, run_predict

    if args.tta not in TTA_MODES and (os.path.exists(args.tta) or glob.has_magic(args.tta)):
        # `predict RUN --tta photos/`: argparse gave the first path to --tta's optional value
        args.inputs, args.tta = [args.tta, *args.inputs], "flip"
    d = dict(checkpoint=args.checkpoint, inputs=list(args.inputs), topk=args.topk, tta=args.tta,
             batch_size=args.batch_size, device=args.device, amp=args.amp, workers=args.workers, which=args.which,
             min_prob=args.min_prob, calibrated=not args.uncalibrated)
    cfg = from_dict(PredictConfig, d, flags={**flags_for(d), "checkpoint": "RUN_OR_CHECKPOINT", "inputs": "PATHS"})
    if not cfg.inputs:
        raise UserError(f"no images given: pass image files, folders or glob patterns after {cfg.checkpoint}")
    for item in cfg.inputs:
        if not os.path.exists(item) and glob.has_magic(item) and not glob.glob(item, recursive=True):
            raise UserError(f"{item!r} matches no files: check the pattern (and quote it so the shell leaves it alone)")
    if args.out:
        check_output_file(args.out, "--out")
    rows = run_predict(cfg)
    text = format_rows(rows, args.format, topk=cfg.topk if all(r.error for r in rows) else None)
    if args.out:
        from imgarena.checkpoint import atomic_write_text

        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    failed = [r for r in rows if r.error]
    unknown = sum(r.unknown for r in rows)
    print(f"{len(rows)} images, {len(rows) - len(failed)} predicted"
          + (f" ({unknown} unknown: top probability below {cfg.min_prob:g})" if cfg.min_prob is not None else "")
          + f", {len(failed)} failed"
          + (f" (first: {failed[0].path}: {failed[0].error})" if failed else "")
          + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if failed else 0
