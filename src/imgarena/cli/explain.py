"""`imgarena explain RUN_OR_CHECKPOINT IMAGES...`: where the model looks (class-activation maps)."""

from __future__ import annotations

import sys

from imgarena.cli.common import add_command

EXAMPLES = """
imgarena explain runs/rice-vit_t4-0001 grain.jpg                     # explain/grain.png + grain.npy
imgarena explain runs/rice-vit_t4-0001 photos/ --out maps/           # a folder: one overlay each + grid.png
imgarena explain runs/rice-vit_t4-0001 photos/ --method chefer       # gradient-weighted attention rollout (ViT)
imgarena explain runs/rice-cnn_s-0001 'shots/*.png' --target basmati # the map of one class, whatever was predicted
"""


def register(sub) -> None:
    p = add_command(sub, "explain", "show where a trained model looks: heat-map overlays and raw maps per image",
                    EXAMPLES, run)
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run folder or .safetensors checkpoint")
    p.add_argument("inputs", nargs="*", metavar="IMAGES", help="image files, folders (searched recursively) and glob patterns")
    p.add_argument("--method", default="auto", choices=["auto", "layercam", "gradcam", "rollout", "chefer"],
                   help="auto (default): rollout for models with global attention (ViT), chefer for them when --target "
                        "names a class, layercam for the rest; layercam (a weight per position), gradcam (one weight "
                        "per channel), rollout (attention, class-agnostic), chefer (gradient-weighted attention rollout)")
    p.add_argument("--target", default="predicted", metavar="CLASS",
                   help="explain each image's predicted class (default) or the named class")
    p.add_argument("--out", default="explain", metavar="DIR",
                   help="where <image stem>.png, <image stem>.npy, grid.png and explain.csv go (default ./explain)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward+backward (default 32)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (default: min(8, cores))")
    p.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint of a run folder (default best)")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")


def run(args) -> int:
    from imgarena.explain import ExplainConfig, run_explain

    cfg = ExplainConfig(checkpoint=args.checkpoint, inputs=list(args.inputs), method=args.method, target=args.target,
                        out=args.out, batch_size=args.batch_size, device=args.device, which=args.which,
                        workers=args.workers, grid=not args.no_grid)
    rows = run_explain(cfg)
    failed = [r for r in rows if r.error]
    for r in rows:
        if r.error is None:
            print(f"{r.path}: {r.label} {r.prob:.3f} -> {r.png}")
    print(f"{len(rows)} images, {len(rows) - len(failed)} explained, {len(failed)} failed"
          + (f" (first: {failed[0].path}: {failed[0].error})" if failed else "") + f"; written to {cfg.out}/",
          file=sys.stderr)
    return 1 if failed else 0
