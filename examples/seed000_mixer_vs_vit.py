"""Seed 000: MLP-Mixer vs ViT fine-tuned on your own 3-class folder, with timm's pretrained weights.

    python examples/make_fashion_folder.py seed000 --out data/fashion3
    python examples/seed000_mixer_vs_vit.py                       # examples/seed000_mixer_vs_vit.yaml as is
    python examples/seed000_mixer_vs_vit.py data/fashion3 --epochs 3 --set lr=1e-4   # any `imgarena compare` flag

It runs `imgarena compare --config examples/seed000_mixer_vs_vit.yaml [your flags]`, first checking
that the pretrained weights can be had. When they cannot (offline: timm's hub is unreachable; or a
model without a timm counterpart), it says why, trains every model from random init instead, and
writes to `<out>-random-init` so the two kinds of result never mix in one report. From random init
at the seed's fine-tuning rate (1e-6) nothing much is learned: raise --set lr=... for such a run.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG = Path(__file__).with_suffix(".yaml")


def pretrained_problem(models: list[str], spec) -> str | None:
    """Why `spec` weights cannot be loaded for every model (None when they can, or none are asked for)."""
    if spec is None:
        return None
    from imgarena.errors import UserError
    from imgarena.models import get_entry
    from imgarena.models.pretrained import fetch_timm_state_dict, read_state_dict

    try:
        if str(spec) != "timm":
            read_state_dict(spec)
            return None
        for name in models:
            timm_name = name[len("timm/"):] if name.startswith("timm/") else get_entry(name).timm_name
            if not timm_name:
                return f"model {name!r} has no timm counterpart with published weights"
            fetch_timm_state_dict(timm_name)  # downloads into timm's hub cache, which training then reads
    except UserError as e:
        return str(e)
    return None


def compare_argv(argv: list[str]) -> list[str]:
    """The `imgarena compare` command line to run: the config, the user's flags, and — when the
    pretrained weights are unavailable — the random-init fallback."""
    from imgarena.cli import build_parser
    from imgarena.cli.compare import build_config
    from imgarena.comparison import compare_dir

    full = ["compare", "--config", str(CONFIG), *argv]
    cfg = build_config(build_parser().parse_args(full))
    why = pretrained_problem(cfg.models, cfg.train.get("pretrained"))
    if why is None:
        return full
    out = f"{compare_dir(cfg)}-random-init"
    print(f"NOTE: pretrained weights unavailable ({why}).\n"
          f"NOTE: training every model from RANDOM INIT instead; results go to {out}. They show the speed "
          f"comparison, not the seed's fine-tuning accuracy.", flush=True)
    return [*full, "--set", "pretrained=null", "--out", out]


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
