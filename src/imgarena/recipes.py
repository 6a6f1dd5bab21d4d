"""Recommended training recipes per model family: TrainConfig overrides (`--recipe recommended`).

Each follows its paper's recipe shape (Mixer/ViT/Swin: AdamW, warmup, cosine, label smoothing;
ConvNeXt: AdamW with weight decay 0.05 and drop path; ResNet/MobileNet: SGD with momentum; the MLP:
Adam), with values tuned for small datasets (Fashion-MNIST scale, 28-64 px) trained on a CPU for a
few minutes: short warmup, few epochs, light augmentation. benchmarks/time_to_accuracy.py measures
them. lr is left to the optimizer's default (scaled by batch size) unless the family needs another.
"""

from __future__ import annotations

RECIPES: dict[str, dict] = {
    "mlp": dict(optimizer="adam", lr=1e-3, schedule="cosine", warmup_epochs=0.0, label_smoothing=0.0,
                augment="none", epochs=15, batch_size=128),
    "mixer": dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.5,
                  label_smoothing=0.1, augment="light", clip_grad=1.0, epochs=5, batch_size=128),
    "vit": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.5,
                label_smoothing=0.1, augment="light", clip_grad=1.0, epochs=5, batch_size=128),
    "swin": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.5,
                 label_smoothing=0.1, augment="light", drop_path=0.1, clip_grad=1.0, epochs=5, batch_size=128),
    "convnext": dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.5,
                     label_smoothing=0.1, augment="light", drop_path=0.1, epochs=5, batch_size=128),
    "resnet": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=0.5,
                   label_smoothing=0.0, augment="light", epochs=5, batch_size=128),
    "mobilenet": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=4e-5, schedule="cosine",
                      warmup_epochs=0.5, label_smoothing=0.1, augment="light", epochs=5, batch_size=128),
}

# timm/<name> models: the family from the name's prefix.
_TIMM_PREFIXES = (("mixer", "mixer"), ("vit", "vit"), ("deit", "vit"), ("swin", "swin"), ("convnext", "convnext"),
                  ("resnet", "resnet"), ("mobilenet", "mobilenet"))


def family_of(model_name: str) -> str | None:
    if model_name.startswith("timm/"):
        base = model_name[len("timm/"):]
        return next((fam for prefix, fam in _TIMM_PREFIXES if base.startswith(prefix)), None)
    from imgarena.models import get_entry

    return get_entry(model_name).family


def recommended_recipe(model_name: str) -> dict:
    """TrainConfig overrides recommended for `model_name`'s family ({} for an unknown timm family).
    Unknown model names raise UserError with the closest names."""
    fam = family_of(model_name)
    return dict(RECIPES.get(fam, {})) if fam else {}
