"""Model registry: `register_model`, `create_model`, `list_models`.

Each family file defines `VARIANTS = {name: dict(...)}` and one builder; it registers every variant
with `register_family(VARIANTS, builder, family=...)`. Names are unique across families.
"""

from __future__ import annotations

import fnmatch
import inspect
import numbers
import re
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
                 drop_path_rate: float = 0.0, pretrained: str | None = None, train_device=None, **overrides):
    """Build a registered model (or `timm/<name>`) with the one contract every family shares.

    `overrides` replace the variant's architecture kwargs (e.g. depth=3). `pretrained` is "timm" or
    "timm:<arch.tag>" (timm's hub weights), a weights file in timm's or our format, or an imgarena run
    folder / checkpoint, whose architecture options are the base under `overrides` and whose image
    size is the default (see `imgarena.models.pretrained`). Before any weight is allocated the
    parameter count is checked against the memory available (`imgarena.models.memory`);
    `train_device` also checks the training footprint on that device.
    """
    check_common_args(num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate)
    if pretrained:  # a run's weights need its architecture: its options first, explicit ones win
        from imgarena.models.pretrained import source_img_size, source_model_kwargs

        overrides = {**source_model_kwargs(pretrained, name), **overrides}
        img_size = img_size if img_size is not None else source_img_size(pretrained, name)
    if name.startswith("timm/"):
        from imgarena.models.timm_wrap import create_timm_model

        model = create_timm_model(name[len("timm/"):], num_classes=num_classes, in_chans=in_chans,
                                  img_size=img_size, drop_path_rate=drop_path_rate, pretrained=pretrained,
                                  train_device=train_device, **overrides)
        return model
    entry = get_entry(name)
    check_option_names(f"model {name!r}", entry.builder, overrides, hint=f"see `imgarena models summary {name}`")
    kwargs = dict(entry.kwargs)
    kwargs.update(overrides)
    kwargs.update(num_classes=num_classes, in_chans=in_chans)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    model = build_checked(name, lambda: entry.builder(**kwargs), overrides, img_size=kwargs.get("img_size"),
                          train_device=train_device)
    # Self-description for checkpoints: enough to rebuild the exact module.
    model.model_name = name
    model.model_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "in_chans")}
    if pretrained:
        from imgarena.models.pretrained import load_pretrained

        load_pretrained(model, pretrained)
    return model


def check_model_fits(name: str, *, img_size: int | None = None, in_chans: int = 1, num_classes: int = 2,
                     train_device=None, **overrides) -> int | None:
    """Refuse, before any data is loaded, a model that cannot fit; returns its parameter count.

    For callers that don't know the channels / class count yet: the defaults (1 channel, 2 classes)
    give a lower bound, so this never refuses a model that would fit. Nothing is allocated.
    """
    from imgarena.models.memory import check_fits, count_params_on_meta

    n = count_params_on_meta(lambda: create_model(name, num_classes=num_classes, in_chans=in_chans,
                                                  img_size=img_size, **overrides))
    if n is not None:
        check_fits(name, n, img_size=img_size, train_device=train_device)
    return n


def check_common_args(*, num_classes, in_chans, img_size, drop_path_rate) -> None:
    """The arguments every family takes, checked once here so no builder sees a nonsense value."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if not is_int(num_classes) or num_classes < 0:
        raise UserError(f"num_classes must be a whole number >= 0 (0: no head), got {num_classes!r}")
    if not is_int(in_chans) or in_chans < 1:
        raise UserError(f"in_chans must be a whole number >= 1 (1 gray, 3 RGB), got {in_chans!r}")
    if img_size is not None and (not is_int(img_size) or img_size < 1):
        raise UserError(f"img_size must be a whole number of pixels >= 1, got {img_size!r}")
    if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) or not 0 <= drop_path_rate < 1:
        raise UserError(f"drop_path_rate must be a number in [0, 1), got {drop_path_rate!r}")


def accepted_options(builder: Callable) -> set[str] | None:
    """Keyword names `builder` accepts: its own signature, or, for a `build_x(**kwargs) -> Cls`
    builder, the class's. None when that can't be told (then the builder itself decides)."""
    try:
        sig = inspect.signature(builder, eval_str=True)
    except (NameError, TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        target = sig.return_annotation
        if not isinstance(target, type):
            return None
        try:
            params = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_option_names(what: str, builder: Callable, options: dict, *, hint: str = "") -> None:
    """UserError naming each option the architecture doesn't take, with the ones it does."""
    valid = accepted_options(builder)
    if valid is None:
        return
    unknown = sorted(set(options) - valid)
    if unknown:
        shown = sorted(valid - {"num_classes", "in_chans"})
        near = [m for u in unknown for m in closest_matches(u, shown, n=1)]
        did = f" (did you mean {', '.join(near)}?)" if near else ""
        raise UserError(f"{what}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{did}; "
                        f"it takes {', '.join(shown)}{'; ' + hint if hint else ''}")


def build_checked(name: str, build: Callable, overrides: dict, *, img_size=None, train_device=None):
    """`build()` after a parameter count on the meta device says it fits in memory.

    Option checks inside the builders raise UserError and pass through. A TypeError/ValueError from
    deeper down is a user error only when the user passed architecture options (a value of the
    wrong type, e.g. hidden='wide'); it keeps the original as its cause. Without options such an
    error is a bug and propagates untouched, traceback and all.
    """
    from imgarena.models.memory import check_fits, count_params_on_meta, default_device_is_meta

    try:
        if not default_device_is_meta():  # on meta (e.g. model_stats) nothing is allocated anyway
            n = count_params_on_meta(build)
            if n is not None:  # None: this model can't be built on meta; build it unchecked
                check_fits(name, n, img_size=img_size, train_device=train_device)
        return build()
    except UserError as e:
        msg = str(e)
        if msg.startswith((name, f"model {name!r}", "timm model")):
            raise
        raise UserError(f"model {name!r}: {msg}") from None
    except (TypeError, ValueError) as e:
        if not overrides:
            raise
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if bad:
            raise UserError(f"model {name!r}: unknown option {bad.group(1)}; remove it or check the spelling") from e
        opts = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise UserError(f"model {name!r} rejected the options {opts} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check their values and types") from e


def _ensure_loaded() -> None:
    import imgarena.models  # noqa: F401  (importing the package registers every family)
