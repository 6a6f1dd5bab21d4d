"""`imgarena models [PATTERN] [--family F]` and `imgarena models summary NAME`."""

from __future__ import annotations

from imgarena.cli.common import add_command
from imgarena.errors import UserError

EXAMPLES = """
imgarena models                           # every model: family, params, GFLOPs, default image size
imgarena models 'vit_*'                   # names matching a glob pattern
imgarena models --family mixer            # one family
imgarena models summary mixer_t4          # layer table: name, type, output shape, params
imgarena models summary vit_b16 --img-size 384 --num-classes 10
imgarena models summary resnet18_cifar --in-chans 1 --img-size 28
imgarena models summary timm/efficientnet_b0   # any timm model
"""


def register(sub) -> None:
    p = add_command(sub, "models", "list the model zoo (params, FLOPs) or show one model's layers", EXAMPLES, run)
    p.add_argument("pattern", nargs="?", default="*", metavar="PATTERN",
                   help="glob pattern over names (default: all), or the word `summary` followed by NAME")
    p.add_argument("name", nargs="?", default=None, metavar="NAME", help="with `summary`: the model to show")
    p.add_argument("--family", default=None,
                   help="only this family (mixer, vit, swin, convnext, resnet, mobilenet, mlp)")
    p.add_argument("--img-size", type=int, default=None, help="summary: input size (default: the model's)")
    p.add_argument("--in-chans", type=int, default=3, help="summary: input channels (default 3)")
    p.add_argument("--num-classes", type=int, default=1000, help="summary: classes of the head (default 1000)")


def run(args) -> int:
    if args.pattern == "summary":
        if not args.name:
            raise UserError("`imgarena models summary` needs a model name, e.g. `imgarena models summary mixer_t4`")
        return run_summary(args.name, img_size=args.img_size, in_chans=args.in_chans, num_classes=args.num_classes)
    if args.name:
        raise UserError(f"unexpected argument {args.name!r}: use `imgarena models PATTERN` or "
                        f"`imgarena models summary NAME`")
    return run_list(args.pattern, family=args.family)


def run_list(pattern: str, family: str | None = None) -> int:
    from imgarena.models import get_entry, list_models
    from imgarena.models.flops import model_stats

    names = list_models(pattern, family=family)
    if not names:
        known = sorted({get_entry(n).family for n in list_models()})
        what = f"family {family!r}" if family else f"pattern {pattern!r}"
        raise UserError(f"no model matches {what}; families: {', '.join(known)}; `imgarena models` lists all")
    rows = []
    for n in names:
        s = model_stats(n)
        e = get_entry(n)
        rows.append((n, e.family, f"{s['params'] / 1e6:.2f}M", f"{s['flops'] / 1e9:.2f}", str(s["img_size"]),
                     "paper" if e.paper else ""))
    header = ("name", "family", "params", "GFLOPs", "img", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = (c.rjust(w) if i in (2, 3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print("  ".join(cells).rstrip())
    print(f"\n{len(rows)} models; GFLOPs per image at the default size (multiply-add = 2). "
          f"Any timm model works as timm/<name>.")
    return 0


def run_summary(name: str, *, img_size: int | None, in_chans: int, num_classes: int) -> int:
    from imgarena.models import create_model
    from imgarena.models.summary import format_summary

    try:
        model = create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    except ValueError as e:  # e.g. a Swin grid that does not divide into windows
        raise UserError(str(e)) from None
    size = img_size or model.input_spec["img_size"]
    print(f"{name}  ({type(model).__name__}, {num_classes} classes, input {in_chans}x{size}x{size})")
    print(format_summary(model, (in_chans, size, size)))
    return 0
