"""`imgarena export RUN --format onnx|torchscript`: a deployable model file, parity-checked against PyTorch."""

from __future__ import annotations

from imgarena.cli.common import add_command

EXAMPLES = """
imgarena export runs/rice-mixer_s16-0001                              # ONNX, batch size 1
imgarena export runs/rice-mixer_s16-0001 --dynamic-batch --opset 18 --out deploy/rice.onnx
imgarena export runs/rice-mixer_s16-0001 --format torchscript
imgarena export runs/rice-mixer_s16-0001 --quantize int8              # + mixer_s16-int8.onnx, checked on val
imgarena export runs/rice-mixer_s16-0001 --check-images new_photos/   # parity on your own images
imgarena predict deploy/rice.onnx new_photos/                         # then: no torch needed
"""


def register(sub) -> None:
    from imgarena.config import CHECKPOINTS, EXPORT_FORMATS, OPSET_RANGE

    p = add_command(sub, "export", "export a run's best checkpoint to ONNX or TorchScript and verify it against PyTorch",
                    EXAMPLES, run)
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run folder or .safetensors checkpoint")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="onnx", help="default onnx")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output file (default RUN/export/<model>.onnx or .pt); PATH.json gets the preprocessing")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size (default: exactly 1); TorchScript always is")
    p.add_argument("--opset", type=int, default=17, help=f"ONNX opset, {OPSET_RANGE[0]}..{OPSET_RANGE[1]} (default 17)")
    p.add_argument("--check-images", nargs="+", default=[], metavar="PATHS",
                   help="images for the parity check (default: the run's split files, else the embedded sample)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="ONNX: also write <name>-int8.onnx (onnxruntime static quantization calibrated on the run's "
                        "training images, dynamic where static does not apply), checked against fp32 on val")
    p.add_argument("--max-acc-drop", type=float, default=1.0, metavar="POINTS",
                   help="--quantize: exit 1 when int8 val accuracy is more than POINTS below fp32 (default 1.0)")
    p.add_argument("--force", action="store_true", help="--quantize: exit 0 even when the accuracy drop is over the tolerance")
    p.add_argument("--which", choices=list(CHECKPOINTS), default="best", help="checkpoint of a run folder (default best)")


def run(args) -> int:
    from imgarena.cli.common import flags_for
    from imgarena.config import ExportConfig, from_dict
    from imgarena.export import run_export
    from imgarena.paths import check_output_file

    d = dict(checkpoint=args.checkpoint, format=args.format, out=args.out, dynamic_batch=args.dynamic_batch,
             opset=args.opset, check_images=list(args.check_images), which=args.which,
             quantize=args.quantize, max_acc_drop=args.max_acc_drop, force=args.force)
    cfg = from_dict(ExportConfig, d, flags={**flags_for(d), "checkpoint": "RUN_OR_CHECKPOINT"})
    if cfg.out is not None:
        check_output_file(cfg.out, "--out")
    result = run_export(cfg)
    print(result.summary())
    if not result.parity.ok:
        return 1
    if result.quantization is not None and not result.quantization["ok"]:
        return 0 if cfg.force else 1
    return 0
