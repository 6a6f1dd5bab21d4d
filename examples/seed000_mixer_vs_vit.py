"""Seed 000: MLP-Mixer vs ViT fine-tuned on your own 3-class folder, with timm's pretrained weights.

    python examples/make_fashion_folder.py seed000 --out data/fashion3
    python examples/seed000_mixer_vs_vit.py                       # examples/seed000_mixer_vs_vit.yaml as is
    python examples/seed000_mixer_vs_vit.py data/fashion3 --epochs 3 --set lr=1e-4   # any `imgarena compare` flag
    python examples/seed000_mixer_vs_vit.py --set mixer_b16:pretrained=weights/mixer/   # offline: a downloaded copy

It runs `imgarena compare --config examples/seed000_mixer_vs_vit.yaml [your flags]`, first checking
that every model's pretrained weights can be had. When some cannot (offline: timm's hub is
unreachable; a missing file; a model without a timm counterpart), it says why, trains every model
from random init instead (fine-tune mode full), and writes to `<out>-random-init` so the two kinds
of result never mix in one report. A fine-tuning learning rate is small for training from scratch:
raise --set lr=... for such a run.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG = Path(__file__).with_suffix(".yaml")


def pretrained_specs(cfg) -> dict[str, str | None]:
    """Each model's pretrained spec: its per-model option, else the shared one."""
    return {m: cfg.per_model.get(m, {}).get("pretrained", cfg.train.get("pretrained")) for m in cfg.models}


def pretrained_problem(specs: dict[str, str | None]) -> str | None:
    """Why some model's weights cannot be loaded (None when all can, or none are asked for)."""
    from imgarena.errors import UserError
    from imgarena.models.pretrained import fetch_timm_state_dict, resolve_source

    try:
        for name, spec in specs.items():
            if spec is None:
                continue
            src = resolve_source(spec, name)  # a missing file, or weights of another architecture
            if src.kind == "timm":
                fetch_timm_state_dict(src.timm_name)  # downloads into timm's hub cache, which training then reads
    except UserError as e:
        return str(e)
    return None


def compare_argv(argv: list[str]) -> list[str]:
    """The `imgarena compare` command line to run: the config, the user's flags, and — when some
    pretrained weights are unavailable — the random-init fallback."""
    from imgarena.cli import build_parser
    from imgarena.cli.compare import build_config
    from imgarena.comparison import compare_dir

    full = ["compare", "--config", str(CONFIG), *argv]
    cfg = build_config(build_parser().parse_args(full))
    specs = pretrained_specs(cfg)
    why = pretrained_problem(specs)
    if why is None:
        return full
    out = f"{compare_dir(cfg)}-random-init"
    print(f"NOTE: pretrained weights unavailable ({why}).\n"
          f"NOTE: training every model from RANDOM INIT instead; results go to {out}. They show the speed "
          f"comparison, not the seed's fine-tuning accuracy.", flush=True)
    scratch = [a for m in specs for a in ("--set", f"{m}:pretrained=null", "--set", f"{m}:finetune=full")]
    return [*full, "--set", "pretrained=null", "--set", "finetune=full", *scratch, "--out", out]


def main(argv: list[str] | None = None) -> int:
    from imgarena.cli import main as imgarena_main
    from imgarena.errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    try:
        full = compare_argv(argv)
    except UserError as e:  # the same one-line message and exit code as the imgarena command
        print(f"imgarena: error: {e}", file=sys.stderr)
        return 2
    return imgarena_main(full)


if __name__ == "__main__":
    sys.exit(main())
