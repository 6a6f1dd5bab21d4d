"""`imgarena export RUN --format onnx|torchscript`: a deployable model file, parity-checked against PyTorch."""

from __future__ import annotations

from imgarena.cli.common import add_command

EXAMPLES = """
imgarena export runs/rice-mixer_s16-0001                              # ONNX, batch size 1
imgarena export runs/rice-mixer_s16-0001 --dynamic-batch --opset 18 --out deploy/rice.onnx
imgarena export runs/rice-mixer_s16-0001 --format torchscript
imgarena export runs/rice-mixer_s16-0001 --check-images new_photos/   # parity on your own images
imgarena predict deploy/rice.onnx new_photos/                         # then: no torch needed
"""


def register(sub) -> None:
    p = add_command(sub, "export", "export a run's best checkpoint to ONNX or TorchScript and verify it against PyTorch",
                    EXAMPLES, run)
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run folder or .safetensors checkpoint")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default onnx")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output file (default RUN/export/<model>.onnx or .pt); PATH.json gets the preprocessing")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size (default: exactly 1); TorchScript always is")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..20 (default 17)")
    p.add_argument("--check-images", nargs="+", default=[], metavar="PATHS",
                   help="images for the parity check (default: the run's split files, else the embedded sample)")
    p.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint of a run folder (default best)")


def run(args) -> int:
    from imgarena.config import ExportConfig
    from imgarena.export import run_export

    cfg = ExportConfig(checkpoint=args.checkpoint, format=args.format, out=args.out, dynamic_batch=args.dynamic_batch,
                       opset=args.opset, check_images=list(args.check_images), which=args.which)
    result = run_export(cfg)
    print(result.summary())
    return 0 if result.parity.ok else 1
