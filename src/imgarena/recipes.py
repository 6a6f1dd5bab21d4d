"""Recommended training recipes per model family: TrainConfig overrides (`--recipe recommended`).

Each keeps its paper's recipe shape (Mixer/ViT/Swin: AdamW, warmup, cosine, label smoothing,
clipping; ConvNeXt: AdamW with weight decay 0.05, drop path and label smoothing; ResNet/MobileNet:
SGD with momentum; the MLP: Adam; the plain CNN: AdamW like ConvNeXt), with values tuned for Fashion-MNIST-scale data (28-64 px, tens of
thousands of images) trained for minutes on a CPU:

- batch 64: on a CPU these models process as many images per second at batch 64 as at 128-256,
  so the smaller batch gives twice the optimizer steps in the same time. Test accuracy after one
  epoch over 20,000 Fashion-MNIST training images: Mixer 82.6% vs 81.2% (batch 128), ConvNeXt
  84.5% vs 83.3%; ViT over 10,000 images 65.2% vs 57.4%.
- lr: AdamW 2e-3 for Mixer and ConvNeXt (same measure at batch 128: Mixer 1e-3 / 2e-3 / 4e-3 /
  8e-3 gave 76.3 / 81.2 / 82.1 / 81.2%; ConvNeXt 1e-3 / 2e-3 / 4e-3 gave 82.3 / 83.3 / 83.8%;
  at batch 64 Mixer 2e-3 and 4e-3 tie at 82.6%), 1e-3 for ViT (5e-4 / 1e-3 / 2e-3 on 10,000
  images: 55.8 / 57.4 / 57.5%).
- the plain CNN keeps batch 128: at ~3,000 img/s its steps are short enough that per-step overhead
  shows, and one minute on full Fashion-MNIST gave 92.9% with AdamW 2e-3 / batch 128 vs 92.7% with
  SGD 0.05 / batch 64 and 92.4% with SGD 0.1-0.2 / batch 128.
- warmup 0.2 epochs: long enough to keep AdamW stable, short enough not to eat a 5-minute budget.
- label smoothing 0.1 (Mixer without it: 81.1% vs 82.1%).

Augmentation, epochs and image size depend on the data, not the family, so recipes leave them alone
(benchmarks/time_to_accuracy.py uses --augment none: a few epochs of Fashion-MNIST underfit), with
one exception: with pretrained weights the recipe takes augment "photo" (random resized crops of
the stored photo, flip, colour jitter), the preset fine-tuning a pretrained backbone is made for.
`imgarena compare --recipe recommended` takes only the optimisation settings (not batch size, and
not the augmentation: compare holds that equal; pass --augment photo).
"""

from __future__ import annotations

RECIPES: dict[str, dict] = {
    "mlp": dict(optimizer="adam", lr=1e-3, schedule="cosine", warmup_epochs=0.0, label_smoothing=0.0),
    "cnn": dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.2,
                label_smoothing=0.1, batch_size=128),
    "mixer": dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.2,
                  label_smoothing=0.1, clip_grad=1.0, batch_size=64),
    "vit": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.2,
                label_smoothing=0.1, clip_grad=1.0, batch_size=64),
    "swin": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.2,
                 label_smoothing=0.1, drop_path=0.1, clip_grad=1.0, batch_size=64),
    "convnext": dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=0.2,
                     label_smoothing=0.1, drop_path=0.1, batch_size=64),
    "resnet": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                   warmup_epochs=0.2, label_smoothing=0.0, batch_size=64),
    "mobilenet": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=4e-5, schedule="cosine",
                      warmup_epochs=0.2, label_smoothing=0.1, batch_size=64),
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


# With pretrained weights (any --pretrained spec), on top of the family's recipe.
PRETRAINED = dict(augment="photo")


def recommended_recipe(model_name: str, *, pretrained: str | None = None) -> dict:
    """TrainConfig overrides recommended for `model_name`'s family ({} for an unknown timm family),
    plus PRETRAINED when the model starts from `pretrained` weights (a --pretrained spec).
    Unknown model names raise UserError with the closest names."""
    fam = family_of(model_name)
    recipe = dict(RECIPES.get(fam, {})) if fam else {}
    return {**recipe, **PRETRAINED} if pretrained else recipe
