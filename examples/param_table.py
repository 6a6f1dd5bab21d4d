"""Print the parameter-count table of docs/architectures.md: ours vs timm's vs the paper's.

    python examples/param_table.py            # markdown tables on stdout (~30 s on 2 CPU cores)

Every paper variant is built at 224 px with 1000 classes (the papers' ImageNet setting), on the
"meta" device where the model allows it (shapes only: even ViT-H/14 costs no memory), else on the
CPU. timm's count is for the same config (the variant's `_timm` name; Mixer-H/14 has no timm entry
point, so timm's MlpMixer class is built with the H/14 arguments). The paper column is what the
papers print, in millions, rounded as they round.
"""

from __future__ import annotations

import torch

# name -> (the paper's params in millions as printed, where it is printed)
PAPER = {
    "mixer_s32": ("19", "Mixer Table 1"), "mixer_s16": ("18", "Mixer Table 1"),
    "mixer_b32": ("60", "Mixer Table 1"), "mixer_b16": ("59", "Mixer Table 1"),
    "mixer_l32": ("206", "Mixer Table 1"), "mixer_l16": ("207", "Mixer Table 1"),
    "mixer_h14": ("431", "Mixer Table 1"),
    "vit_ti16": ("5", "DeiT Table 1"), "vit_s16": ("22", "DeiT Table 1"),
    "vit_b16": ("86", "ViT Table 1 (Base)"), "vit_l16": ("307", "ViT Table 1 (Large)"),
    "vit_h14": ("632", "ViT Table 1 (Huge)"),
    # The ViT paper gives one count per width (Base 86M, Large 307M); /32 differs only in the patch
    # embedding and position table, so the paper has no separate number.
    "vit_s32": ("—", "not in the papers"), "vit_b32": ("(86)", "ViT Table 1 gives Base's count"),
    "vit_l32": ("(307)", "ViT Table 1 gives Large's count"),
    "convnext_t": ("28", "ConvNeXt Table 1"), "convnext_s": ("50", "ConvNeXt Table 1"),
    "convnext_b": ("89", "ConvNeXt Table 1"), "convnext_l": ("198", "ConvNeXt Table 1"),
    # The ResNet paper prints FLOPs (Table 1), not parameter counts: 1.8G, 3.6G, 3.8G.
    "resnet18": ("—", "ResNet Table 1 gives FLOPs only"), "resnet34": ("—", "ResNet Table 1 gives FLOPs only"),
    "resnet50": ("—", "ResNet Table 1 gives FLOPs only"),
    "mobilenetv1": ("4.2", "MobileNet paper (1.0 MobileNet-224)"),
    "mobilenetv2": ("3.4", "MobileNetV2 Table 4"),
    "swin_t": ("28", "Swin Table 1"),
}
# The small-image variants the examples train (10 classes, 3 channels, each at its default size).
SMALL = ("mixer_t4", "vit_t4", "convnext_atto_cifar", "convnext_t_cifar", "resnet18_cifar", "resnet50_cifar",
         "mobilenetv2_cifar", "swin_t_cifar", "mlp", "mlp_deep")
# Mixer-H/14 has no timm entry point: timm's class with the paper's H/14 arguments.
MIXER_H14_TIMM = dict(patch_size=14, num_blocks=32, embed_dim=1280, mlp_ratio=(0.5, 4.0))


def _build(fn):
    """fn() on the meta device (no memory, no init cost), else on the CPU."""
    try:
        with torch.device("meta"):
            return fn()
    except (NotImplementedError, RuntimeError):  # e.g. a model that reads tensor values while building
        return fn()


def ours(name: str) -> int:
    from imgarena.models import create_model
    from imgarena.models.flops import count_params

    return count_params(_build(lambda: create_model(name, num_classes=1000, img_size=224)))


def timms(name: str) -> int | None:
    import timm
    from timm.models.mlp_mixer import MlpMixer

    from imgarena.models import get_entry
    from imgarena.models.flops import count_params

    entry = get_entry(name)
    if name == "mixer_h14":
        return count_params(_build(lambda: MlpMixer(num_classes=1000, img_size=224, **MIXER_H14_TIMM)))
    if not entry.timm_name:
        return None
    return count_params(_build(lambda: timm.create_model(entry.timm_name, num_classes=1000)))


def rows() -> list[dict]:
    from imgarena.models import get_entry

    out = []
    for name in PAPER:
        out.append({"model": name, "family": get_entry(name).family, "ours": ours(name), "timm": timms(name),
                    "timm_name": get_entry(name).timm_name or ("MlpMixer(H/14 args)" if name == "mixer_h14" else None),
                    "paper": PAPER[name][0], "source": PAPER[name][1]})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| model | ours (params) | timm (same config) | timm name | paper (M) | paper source |",
             "|---|---:|---:|---|---:|---|"]
    for r in table:
        timm_count = f"{r['timm']:,}" if r["timm"] is not None else "—"
        lines.append(f"| `{r['model']}` | {r['ours']:,} | {timm_count} | {r['timm_name'] or '—'} | "
                     f"{r['paper']} | {r['source']} |")
    return "\n".join(lines)


def small_markdown() -> str:
    from imgarena.models.flops import model_stats

    lines = ["| model | img size | params (10 classes) | MFLOPs / image |", "|---|---:|---:|---:|"]
    for name in SMALL:
        st = model_stats(name, num_classes=10)
        lines.append(f"| `{name}` | {st['img_size']} | {st['params']:,} | {st['flops'] / 1e6:,.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows()))
    print()
    print(small_markdown())
