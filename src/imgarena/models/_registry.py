"""Model registry: `register_model`, `create_model`, `list_models`.

Each family file defines `VARIANTS = {name: dict(...)}` and one builder; it registers every variant
with `register_family(VARIANTS, builder, family=...)`. Names are unique across families.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

from imgarena.errors import UserError, closest_matches


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    builder: Callable
    kwargs: dict  # the variant's architecture arguments, passed to builder
    paper: bool = False  # a paper variant (param count checked against timm)
    timm_name: str | None = None  # timm's name of the same config, where one exists


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable, *, family: str, kwargs: dict | None = None,
                   paper: bool = False, timm_name: str | None = None) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered (family {_REGISTRY[name].family})")
    _REGISTRY[name] = ModelEntry(name, family, builder, dict(kwargs or {}), paper, timm_name)


def register_family(variants: dict, builder: Callable, *, family: str) -> None:
    """Register a family's VARIANTS table. Keys starting with '_' in a variant are registry metadata."""
    for name, spec in variants.items():
        spec = dict(spec)
        paper = bool(spec.pop("_paper", False))
        timm_name = spec.pop("_timm", None)
        register_model(name, builder, family=family, kwargs=spec, paper=paper, timm_name=timm_name)


def list_models(pattern: str = "*", *, family: str | None = None) -> list[str]:
    _ensure_loaded()
    names = [n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family)]
    return sorted(names)


def get_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name in _REGISTRY:
        return _REGISTRY[name]
    near = closest_matches(name, _REGISTRY)
    hint = f"; closest: {', '.join(near)}" if near else ""
    raise UserError(f"unknown model {name!r}{hint}. `imgarena models` lists them all; any timm model works as timm/<name>")


def create_model(name: str, num_classes: int = 1000, *, in_chans: int = 3, img_size: int | None = None,
                 drop_path_rate: float = 0.0, pretrained: str | None = None, **overrides):
    """Build a registered model (or `timm/<name>`) with the one contract every family shares.

    `overrides` replace the variant's architecture kwargs (e.g. depth=3). `pretrained` is "timm"
    (fetch timm's weights through its hub) or a path to a safetensors/.pth state dict in timm's format.
    """
    if name.startswith("timm/"):
        from imgarena.models.timm_wrap import create_timm_model

        model = create_timm_model(name[len("timm/"):], num_classes=num_classes, in_chans=in_chans,
                                  img_size=img_size, drop_path_rate=drop_path_rate, pretrained=pretrained, **overrides)
        return model
    entry = get_entry(name)
    kwargs = dict(entry.kwargs)
    kwargs.update(overrides)
    kwargs.update(num_classes=num_classes, in_chans=in_chans)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        model = entry.builder(**kwargs)
    except TypeError as e:
        raise UserError(f"model {name!r}: bad option ({e}); see `imgarena models summary {name}`") from None
    except ValueError as e:  # an option the architecture rejects, e.g. a width that does not divide into heads
        raise UserError(f"model {name!r}: {e}") from None
    # Self-description for checkpoints: enough to rebuild the exact module.
    model.model_name = name
    model.model_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "in_chans")}
    if pretrained:
        from imgarena.models.pretrained import load_pretrained

        load_pretrained(model, pretrained)
    return model


def _ensure_loaded() -> None:
    import imgarena.models  # noqa: F401  (importing the package registers every family)
