"""Typed configs. The CLI converts argparse results into these once; everything else takes them.

Every config round-trips through a plain dict / YAML (`to_dict`, `from_dict`, `save_yaml`,
`load_yaml`) so a run folder's `config.yaml` reproduces the run.

Every config validates itself when it is built (`__post_init__`), whoever builds it (CLI, YAML,
Python API): each field is checked against its type hint and the rule declared next to it with
`opt(...)`, and unambiguous spellings are converted (YAML's string "1e-3" to 0.001, "5m" to 300
seconds for durations, "1,64" to [1, 64] for lists). A bad value raises `ConfigValueError` (a
`UserError`) naming the field; `from_dict(..., where=FILE, flags=...)` renames it to the option as
the user wrote it (`--batch-size`, or `batch_size in run.yaml`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imgarena.errors import UserError, closest_matches

# Choice lists, defined here so the CLI (which imports no torch) and the checks share one copy.
# The engine modules keep their own copies; tests/test_config_validation.py keeps them equal.
AUGMENT_PRESETS = ("none", "flip", "light", "standard", "strong", "photo")  # imgarena.data.augment implements them
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "step", "onecycle", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
RESIZE_MODES = ("squash", "crop", "pad")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
FINETUNE_MODES = ("full", "linear", "two-stage")
DISTILL_MODES = ("soft", "hard")
TTA_MODES = ("none", "flip", "crop", "flip-crop")
CHECKPOINTS = ("best", "last")
EVAL_SPLITS = ("auto", "test", "val", "train", "all")
EXPORT_FORMATS = ("onnx", "torchscript")
OPSET_RANGE = (13, 20)
QUANTIZE_MODES = ("int8",)
BENCH_MODES = ("train", "infer")
COMPARE_RECIPES = ("same", "recommended")
CLASS_WEIGHTS = ("auto",)  # or None, written "none"


def default_cache_dir() -> str:
    return os.environ.get("IMGARENA_CACHE", str(Path.home() / ".cache" / "imgarena"))


# ---------------------------------------------------------------- declaring and checking fields

class ConfigValueError(UserError):
    """A config field with a value of the wrong type or out of range.

    `key` is the dotted field path ("data.img_size"); the message starts with `label`, which
    `from_dict` sets to what the user wrote (`--img-size`, `data.img_size in run.yaml`)."""

    def __init__(self, key: str, problem: str, value=None, label: str | None = None, *, show_value: bool = True):
        self.key, self.problem, self.value, self.show_value = key, problem, value, show_value
        self.label = label or key
        super().__init__(f"{self.label} {problem}" + (f", got {_show(value)}" if show_value else ""))

    def relabel(self, label: str) -> "ConfigValueError":
        return ConfigValueError(self.key, self.problem, self.value, label, show_value=self.show_value)

    def under(self, prefix: str) -> "ConfigValueError":
        key = f"{prefix}{self.key}"
        return ConfigValueError(key, self.problem, self.value, key if self.label == self.key else self.label,
                                show_value=self.show_value)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Rule:
    """What a field accepts beyond its type hint. Lists apply ranges and choices to each element."""

    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    nonempty: bool = False  # strings and lists
    split: bool = False  # list fields: "a,b" -> ["a", "b"] (else a lone string becomes [string])
    convert: typing.Callable | None = None  # applied to a non-None value before the type check
    check: typing.Callable | None = None  # value -> problem text ("must be ...") or None
    example: str = ""  # shown after the expectation, e.g. "e.g. 1,64"
    expect: str = ""  # replaces the generated "must be ..." text


def opt(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, **rule):
    """A dataclass field with a validation `Rule` (see Rule for the keywords)."""
    return field(default=default, default_factory=factory, metadata={"rule": Rule(**rule)})


def _duration(value):
    if isinstance(value, str):
        from imgarena.errors import parse_duration

        try:
            return parse_duration(value)
        except UserError:
            return value  # the type check then names the field
    return value


def _class_weights(value):
    if isinstance(value, str):
        value = value.strip().lower()
        return None if value == "none" else value
    return value


def _plain_name(value: str):
    if value in (".", "..") or "/" in value or "\\" in value:
        return "must be a plain folder name (it goes under --out-dir), not a path"
    return None


def _group_regex(value: str):
    try:
        re.compile(value)
    except re.error as e:
        return f"must be a valid regular expression ({e})"
    return None


_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)", re.IGNORECASE)


def _device(value: str):
    return None if _DEVICE.fullmatch(value.strip()) else "must be auto, cpu, cuda or cuda:N"


def _mapping_of_mappings(value: dict):
    bad = next((k for k, v in value.items() if not isinstance(v, Mapping)), None)
    if bad is not None:
        return f"must map each model to a mapping of its options, e.g. {{mlp: {{lr: 0.01}}}} ({bad!r} is not)"
    return None


DEVICE_RULE = dict(check=_device)
DURATION = "a positive duration such as 90s, 5m or 1h30m (a number is seconds)"


def _range_text(r: Rule) -> str:
    lo = (">=", r.ge) if r.ge is not None else (">", r.gt) if r.gt is not None else None
    hi = ("<=", r.le) if r.le is not None else ("<", r.lt) if r.lt is not None else None
    if lo and hi:
        if lo[0] == ">=" and hi[0] == "<=":
            return f" between {lo[1]:g} and {hi[1]:g}"
        return f" in {'[' if lo[0] == '>=' else '('}{lo[1]:g}, {hi[1]:g}{']' if hi[0] == '<=' else ')'}"
    if lo:
        return f" {lo[0]} {lo[1]:g}"
    if hi:
        return f" {hi[0]} {hi[1]:g}"
    return ""


def _expect(tp, r: Rule) -> str:
    """What a field must be, as the end of 'X must be ...'."""
    if r.expect:
        return r.expect
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is list:
        (elem,) = typing.get_args(tp) or (str,)
        text = f"a {'non-empty ' if r.nonempty else ''}list of {_plural(elem, r)}"
        if r.split:
            text += " (or one comma-separated string)"
    elif r.choices is not None:
        text = "one of " + ", ".join(str(c) for c in r.choices)
    elif tp is bool:
        text = "true or false"
    elif tp is int:
        text = "a whole number" + _range_text(r)
    elif tp is float:
        text = "a finite number" + _range_text(r)
    elif tp is str:
        text = "a non-empty text value" if r.nonempty else "a text value"
    elif tp is dict or origin is dict:
        text = "a mapping of key: value"
    elif dataclasses.is_dataclass(tp):
        keys = ", ".join(f.name for f in dataclasses.fields(tp)[:3])
        text = f"a mapping of {tp.__name__} keys ({keys}, ...)"
    else:
        text = f"a {getattr(tp, '__name__', tp)}"
    if r.example:
        text += f", {r.example}"
    if optional and tp is not str:
        text += " (or null to leave it unset)"
    return text


def _plural(elem, r: Rule) -> str:
    if r.choices is not None:
        return "names from " + ", ".join(map(str, r.choices))
    if elem is int:
        return "whole numbers" + _range_text(r)
    if elem is float:
        return "numbers" + _range_text(r)
    return "non-empty names"


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


class _Bad(Exception):
    """Internal: the value does not fit the type."""


def _as_int(v) -> int:
    if isinstance(v, bool):
        raise _Bad
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real) and math.isfinite(float(v)) and float(v).is_integer():
        return int(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            return int(s)
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            raise _Bad from None
        if math.isfinite(f) and f.is_integer():
            return int(f)
    raise _Bad


def _as_float(v) -> float:
    if isinstance(v, bool):
        raise _Bad
    if isinstance(v, numbers.Real):
        f = float(v)
    elif isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            f = float(v.strip())
        except ValueError:
            raise _Bad from None
    else:
        raise _Bad
    if not math.isfinite(f):
        raise _Bad
    return f


def _as_str(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return str(v)  # `name: 2024` in YAML
    raise _Bad


def _in_range(v, r: Rule) -> bool:
    return not ((r.ge is not None and v < r.ge) or (r.le is not None and v > r.le)
                or (r.gt is not None and v <= r.gt) or (r.lt is not None and v >= r.lt))


def _scalar(v, tp, r: Rule):
    """Convert one value to `tp` and apply the rule's range/choices; _Bad when it does not fit."""
    if tp is bool:
        if not isinstance(v, bool):
            raise _Bad
        return v
    if tp is int:
        v = _as_int(v)
    elif tp is float:
        v = _as_float(v)
    elif tp is str:
        v = _as_str(v)
        if r.nonempty and not v.strip():
            raise _Bad
    else:
        raise TypeError(f"config fields of type {tp!r} are not supported")  # a bug in a config class
    if tp in (int, float) and not _in_range(v, r):
        raise _Bad
    if r.choices is not None:
        low = v.lower() if isinstance(v, str) else v
        if low not in r.choices:
            raise _Bad
        v = low
    return v


def coerce(key: str, value, tp, r: Rule = Rule()):
    """`value` converted to type `tp` under rule `r`; ConfigValueError naming `key` when it cannot be."""
    original = value
    if value is not None and r.convert is not None:
        value = r.convert(value)
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigValueError(key, "must be " + _expect(tp, r), original)
    try:
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                validate(value, prefix=f"{key}.")
                return value
            if isinstance(value, Mapping):
                return from_dict(tp, value, _prefix=f"{key}.")
            raise _Bad
        if origin is list:
            (elem,) = typing.get_args(tp) or (str,)
            if isinstance(value, str):
                value = [s.strip() for s in value.split(",") if s.strip()] if r.split else [value]
            elif isinstance(value, (tuple, list)):
                value = list(value)
            else:
                raise _Bad
            value = [_scalar(v, elem, dataclasses.replace(r, nonempty=True)) for v in value]
            if r.nonempty and not value:
                raise _Bad
        elif tp is dict or origin is dict:
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise _Bad
            value = dict(value)
        else:
            value = _scalar(value, tp, r)
    except _Bad:
        raise ConfigValueError(key, "must be " + _expect(tp, r), original) from None
    if r.check is not None:
        problem = r.check(value)
        if problem:
            raise ConfigValueError(key, problem, original)
    return value


@functools.lru_cache(maxsize=None)
def _fields(cls) -> tuple:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], f.metadata.get("rule", Rule())) for f in dataclasses.fields(cls))


def validate(cfg, *, prefix: str = "") -> None:
    """Check (and normalise in place) every field of config `cfg`; ConfigValueError on the first bad one.
    Runs on construction; call it again after changing fields by hand."""
    for name, tp, rule in _fields(type(cfg)):
        object.__setattr__(cfg, name, coerce(f"{prefix}{name}", getattr(cfg, name), tp, rule))
    extra = getattr(cfg, "_check", None)
    if extra is not None:
        try:
            extra()
        except ConfigValueError as e:
            raise e.under(prefix) from None


class Validated:
    """Mixin: a config dataclass that validates itself when built."""

    def __post_init__(self):
        validate(self)


# ---------------------------------------------------------------- dicts and YAML

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _label(key: str, where: str | None, flags: Mapping | None) -> str:
    if flags and key in flags:
        return flags[key]
    return f"{key} in {where}" if where else key


def from_dict(cls, d, *, where: str | None = None, flags: Mapping | None = None, _prefix: str = ""):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys and bad
    values are UserErrors. `where` (a file, or a phrase like "options for mlp") and `flags`
    (dotted key -> the CLI flag it came from, e.g. {"batch_size": "--batch-size"}) name a bad value
    as the user wrote it."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        name = _prefix.rstrip(".") or cls.__name__
        raise ConfigValueError(name, "must be " + _expect(cls, Rule()), d, _label(name, where, flags))
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((k for k in d if k not in names), key=str)
    if unknown:
        raise unknown_key_error(f"{_prefix}{unknown[0]}", names, where)
    try:
        return cls(**d)
    except ConfigValueError as e:
        e = e.under(_prefix)
        if where or flags:
            e = e.relabel(_label(e.key, where, flags))
        raise e from None
    except UnknownKeyError as e:  # in a nested section
        if where and not e.where:
            raise UnknownKeyError(e.key, e.known, where) from None
        raise


class UnknownKeyError(UserError):
    """A config key that no field has; the message offers the closest names."""

    def __init__(self, key, known, where: str | None = None):
        self.key, self.known, self.where = key, tuple(known), where
        short = str(key).rpartition(".")[2]
        hint = closest_matches(short, list(known)) if isinstance(key, str) else []
        super().__init__(f"unknown key {key!r}" + (f" in {where}" if where else "")
                         + (f" (did you mean {', '.join(hint)}?)" if hint else f"; known keys: {', '.join(sorted(known))}"))


def unknown_key_error(key, known, where: str | None = None) -> UserError:
    return UnknownKeyError(key, known, where)


def mapping_of(value, key: str, where: str | None = None) -> dict:
    """A YAML section that must be a mapping (e.g. `data:`), as a dict; None -> {}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigValueError(key, "must be a mapping of key: value (indented lines under it)", value,
                               _label(key, where, None))
    return dict(value)


def save_yaml(obj, path) -> None:
    import yaml

    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def load_yaml(path, cls=None) -> dict:
    """The mapping in YAML file `path`. Sections that every config types as a mapping (data, train,
    per_model, model_kwargs) must be mappings; with `cls`, unknown keys are errors too."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {p} is a folder: pass a YAML file to --config")
    if os.path.exists(p) and not p.is_file():  # a FIFO or device: reading could block forever
        raise UserError(f"config file {p} is not a regular file: pass a YAML file to --config")
    if not p.is_file():
        raise UserError(f"config file {p} not found: pass an existing YAML file to --config")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read config file {p} ({e.strerror}): pass a readable YAML file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {p} is not a UTF-8 text file (binary?): pass a YAML file of option: value lines") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"config file {p} is not valid YAML ({first}): fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of option: value, not a {type(data).__name__}")
    bad = next((k for k in data if not isinstance(k, str)), None)
    if bad is not None:
        raise UserError(f"config file {p}: key {bad!r} is not an option name: keys are words such as lr or batch_size")
    for key in _MAPPING_KEYS:
        if key in data and data[key] is not None:
            mapping_of(data[key], key, str(p))
    if isinstance(data.get("per_model"), Mapping):
        for m, v in data["per_model"].items():
            if v is not None:
                mapping_of(v, f"per_model.{m}", str(p))
    if cls is not None:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise unknown_key_error(unknown[0], names, str(p))
    return data


# ---------------------------------------------------------------- the configs

@dataclass
class DataConfig(Validated):
    source: str = opt("sample", nonempty=True)  # folder, CSV file, or built-in name: sample | fashion-mnist | cifar10
    img_size: int | None = opt(None, ge=8, le=4096)  # None: the images' own size when they all share one, else 224
    resize: str = opt("squash", choices=RESIZE_MODES)  # squash (resize to a square, as the seeds do) | crop (shorter side + centre crop) | pad (letterbox)
    # The preprocessing pretrained weights bring (their pretrained_cfg) fills the next four when unset.
    crop_pct: float | None = opt(None, gt=0, le=1)  # centre-crop fraction: images are stored at img_size / crop_pct (None: the weights', else 1; 0.875 with --augment photo)
    interpolation: str | None = opt(None, choices=INTERPOLATIONS)  # resampling filter (None: the weights', else bilinear)
    mean: list[float] | None = opt(None, split=True, example="e.g. 0.485,0.456,0.406")  # per-channel normalisation (None: the weights', else the training images' own)
    std: list[float] | None = opt(None, gt=0, split=True, example="e.g. 0.229,0.224,0.225")
    channels: int | None = opt(None, choices=(1, 3))  # None: 1 when every image is grayscale, else 3
    val_fraction: float = opt(0.1, gt=0, lt=1)  # used only when the source has no val split
    split_seed: int = opt(0, ge=0)
    subset: int | None = opt(None, ge=2)  # keep at most this many training images (stratified), e.g. 5000
    cache_dir: str = opt(factory=default_cache_dir, nonempty=True)
    workers: int = opt(0, ge=0)  # cache-building processes; 0 = all cores
    folds: int = opt(1, ge=1, le=100)  # K-fold cross-validation (stratified, grouped); 1 = one train/val split
    fold: int = opt(0, ge=0)  # with folds > 1: the fold that is val (0 .. folds-1)
    repeat: int = opt(0, ge=0)  # with folds > 1: which reshuffle of the folds (seeded by split_seed and repeat)
    group_by: str | None = opt(None, nonempty=True, check=_group_regex)  # regex on the path under the root; its first group (or the match) names a group kept on one side
    dedup: bool = True  # group near-duplicate images so they never land on both sides of a split

    def _check(self) -> None:
        if self.fold >= self.folds:
            raise ConfigValueError("fold", f"must be below folds ({self.folds})", self.fold)
        if self.repeat and self.folds == 1:
            raise ConfigValueError("repeat", "reshuffles cross-validation folds: set folds >= 2 with it", self.repeat)
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and len(v) not in (1, 3):
                raise ConfigValueError(key, "needs 1 value (gray) or 3 (RGB), one per channel", v)
        if (self.mean is None) != (self.std is None):
            given = "mean" if self.mean is not None else "std"
            raise ConfigValueError(given, "needs its partner: set both mean and std (or neither)", getattr(self, given))
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ConfigValueError("std", f"needs as many values as mean ({len(self.mean)})", self.std)


@dataclass
class TrainConfig(Validated):
    """Everything `imgarena train` needs; saved as the run's `config.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: str = opt("mixer_t4", nonempty=True)
    model_kwargs: dict = opt(factory=dict, expect="a mapping of architecture options, e.g. {depth: 3}")  # architecture overrides
    pretrained: str | None = opt(None, nonempty=True)  # timm (timm's hub weights) | a weights file (timm's or our format) | an imgarena run folder or checkpoint
    finetune: str | None = opt(None, choices=FINETUNE_MODES)  # full | linear (frozen backbone, head only) | two-stage (head for freeze_epochs, then all); None: two-stage with pretrained, else full
    freeze_epochs: int = opt(1, ge=0)  # two-stage: epochs that train the head only
    lr_backbone: float | None = opt(None, gt=0)  # backbone lr = lr * this (None: 1 for full, 0.1 for two-stage)
    layer_decay: float | None = opt(None, gt=0, le=1)  # layer-wise lr decay from the head down through the blocks, e.g. 0.75
    feature_views: int = opt(1, ge=1)  # linear: stored feature views per training image (1: the centre crop; N > 1: N views augmented with --augment)
    distill_from: str | None = opt(None, nonempty=True)  # a run folder or checkpoint whose predictions the model learns from
    distill: str = opt("soft", choices=DISTILL_MODES)  # soft (KL to the teacher's tempered softmax) | hard (the teacher's argmax as a label)
    distill_temperature: float = opt(3.0, gt=0)  # soft distillation temperature
    distill_weight: float = opt(0.5, ge=0, le=1)  # share of the loss from the teacher (the rest from the labels)
    distill_token: bool | None = None  # DeiT's distillation token (ViT family); None: on for models that have one
    epochs: int = opt(10, ge=1)
    time_budget: float | None = opt(None, gt=0, convert=_duration, expect=DURATION)  # seconds of training; stops mid-epoch when spent, then evaluates
    batch_size: int = opt(128, ge=1)
    lr: float | None = opt(None, gt=0)  # None: the optimizer's default scaled by batch_size * accum_steps / 256 (linear / two-stage: 1e-2 adam(w), 0.1 sgd)
    optimizer: str = opt("adamw", choices=OPTIMIZERS)
    weight_decay: float | None = opt(None, ge=0)  # None: 0.05 for adamw, 0 for adam, 5e-4 for sgd
    momentum: float = opt(0.9, ge=0, lt=1)
    schedule: str = opt("cosine", choices=SCHEDULES)
    warmup_epochs: float = opt(0.0, ge=0)
    step_size: int = opt(7, ge=1)  # step schedule: decay every step_size epochs (seed 000: StepLR(7, 0.1))
    gamma: float = opt(0.1, gt=0)
    label_smoothing: float = opt(0.0, ge=0, lt=1)
    mixup: float = opt(0.0, ge=0)  # Beta(alpha, alpha); 0 disables
    cutmix: float = opt(0.0, ge=0)
    augment: str = opt("light", choices=AUGMENT_PRESETS)
    drop_path: float = opt(0.0, ge=0, lt=1)
    ema: bool = False
    ema_decay: float = opt(0.999, gt=0, lt=1)
    clip_grad: float | None = opt(None, gt=0)
    accum_steps: int = opt(1, ge=1)
    img_size: int | None = opt(None, ge=8, le=4096)  # shortcut for data.img_size
    seed: int = opt(0, ge=0)
    device: str = opt("auto", **DEVICE_RULE)  # auto | cpu | cuda | cuda:N
    amp: str = opt("auto", choices=AMP_MODES)  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False
    patience: int | None = opt(None, ge=1)  # early stopping on val accuracy
    class_weights: str | None = opt(None, choices=CLASS_WEIGHTS, convert=_class_weights, expect="auto or none")  # None | auto
    out_dir: str = opt("runs", nonempty=True)
    name: str | None = opt(None, nonempty=True, check=_plain_name)  # run folder name; default <model>-<timestamp>
    eval_batch_size: int = opt(256, ge=1)
    deterministic: bool = False
    state_every: int = opt(200, ge=0)  # also save resumable state.pt every N optimizer steps (0: epoch ends only)
    resume: bool = False  # continue out_dir/name from its state.pt (`imgarena train --resume runs/NAME`)

    def _check(self) -> None:
        if self.finetune in ("linear", "two-stage") and not self.pretrained:
            raise ConfigValueError("finetune", f"is {self.finetune}, which trains a pretrained backbone: set pretrained "
                                   "too (--pretrained timm, a weights file or an earlier run folder)", self.finetune,
                                   show_value=False)
        if self.distill_from and self.finetune == "linear":
            raise ConfigValueError("distill_from", "trains the whole student: use finetune full or two-stage with it",
                                   self.distill_from, show_value=False)

    @property
    def finetune_mode(self) -> str:
        """The fine-tune mode in effect: finetune, or its default (two-stage with pretrained weights, else full)."""
        return self.finetune or ("two-stage" if self.pretrained else "full")


@dataclass
class BenchConfig(Validated):
    """What `imgarena bench` measures: speed on random inputs, no data involved."""

    models: list[str] = opt(factory=lambda: ["mixer_t4", "vit_t4"], nonempty=True, split=True)
    img_size: int = opt(32, ge=1)
    in_chans: int = opt(3, ge=1)
    num_classes: int = opt(10, ge=1)
    batch_sizes: list[int] = opt(factory=lambda: [1, 64], ge=1, nonempty=True, split=True, example="e.g. 1,64")
    modes: list[str] = opt(factory=lambda: ["train", "infer"], choices=BENCH_MODES, nonempty=True, split=True)
    device: str = opt("auto", **DEVICE_RULE)
    amp: str = opt("auto", choices=AMP_MODES)  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off
    channels_last: bool = False
    warmup: int = opt(3, ge=0)  # untimed calls before timing
    repeats: int = opt(10, ge=1)  # timed calls; median, min and p95 are reported


def _train_options(options: dict, key: str) -> dict:
    """`train:` / `per_model.M:` options of a compare: TrainConfig keys, each value checked like
    TrainConfig checks it (nested sections such as data are left to the TrainConfig build)."""
    fields = {name: (tp, rule) for name, tp, rule in _fields(TrainConfig)}
    out = {}
    for k, v in options.items():
        if k not in fields:
            raise unknown_key_error(f"{key}.{k}", fields)
        tp, rule = fields[k]
        out[k] = v if dataclasses.is_dataclass(tp) else coerce(f"{key}.{k}", v, tp, rule)
    return out


@dataclass
class CompareConfig(Validated):
    """Everything `imgarena compare` needs; saved as the compare folder's `compare.yaml`.

    Every model gets the same data, split, seed, augmentation and budget; `imgarena.compare`
    builds each model's TrainConfig from this one config.
    """

    data: DataConfig = field(default_factory=DataConfig)
    models: list[str] = opt(factory=lambda: ["mixer_t4", "vit_t4"], nonempty=True, split=True)
    recipe: str = opt("same", choices=COMPARE_RECIPES)  # same (one recipe for all) | recommended (each family's optimisation settings)
    epochs: int | None = opt(None, ge=1)  # None: 10, or as many as fit when time_budget is set
    time_budget: float | None = opt(None, gt=0, convert=_duration, expect=DURATION)  # seconds of training per model
    batch_size: int = opt(128, ge=1)
    baseline: str | None = opt(None, nonempty=True)  # speeds are also reported relative to this model
    out: str | None = opt(None, nonempty=True)  # the compare folder; None: runs/compare-<data source name>
    seed: int = opt(0, ge=0)
    seeds: int = opt(1, ge=1)  # runs per model on the same split, seeds seed .. seed + seeds - 1
    folds: int = opt(1, ge=1)  # 1: the data's own split; K: stratified K-fold cross-validation
    repeats: int = opt(1, ge=1)  # repetitions of the K folds, each with reshuffled folds
    device: str = opt("auto", **DEVICE_RULE)
    train: dict = opt(factory=dict, expect="a mapping of train options, e.g. {lr: 0.001}")  # TrainConfig options for every model
    per_model: dict = opt(factory=dict, check=_mapping_of_mappings)  # {model: {TrainConfig options}} for one model only

    def _check(self) -> None:
        self.train = _train_options(self.train, "train")
        self.per_model = {str(m): _train_options(dict(v), f"per_model.{m}") for m, v in self.per_model.items()}


@dataclass
class PredictConfig(Validated):
    """What `imgarena predict` / `imgarena.load(...).predict` need."""

    checkpoint: str = ""  # run folder, .safetensors checkpoint, or an exported .onnx
    inputs: list[str] = field(default_factory=list)  # files, folders (recursive) and globs
    topk: int = opt(3, ge=1)
    tta: str = opt("none", choices=TTA_MODES)  # none | flip | crop | flip-crop (imgarena.evaluation.tta)
    batch_size: int = opt(64, ge=1)
    device: str = opt("auto", **DEVICE_RULE)  # auto | cpu | cuda | cuda:N
    amp: str = opt("auto", choices=AMP_MODES)  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off
    workers: int = opt(0, ge=0)  # decoding threads; 0 = min(8, cores)
    which: str = opt("best", choices=CHECKPOINTS)  # best | last checkpoint of a run folder
    min_prob: float | None = opt(None, ge=0, le=1)  # top probability below this -> label "unknown"
    calibrated: bool = True  # apply the temperature fitted at the end of training (False: raw softmax)


@dataclass
class ExportConfig(Validated):
    """What `imgarena export` needs."""

    checkpoint: str = ""  # run folder or .safetensors checkpoint
    format: str = opt("onnx", choices=EXPORT_FORMATS)  # onnx | torchscript
    out: str | None = opt(None, nonempty=True)  # None: <run>/export/<model>.onnx (or .pt)
    dynamic_batch: bool = False
    opset: int = opt(17, ge=OPSET_RANGE[0], le=OPSET_RANGE[1])
    check_images: list[str] = field(default_factory=list)  # parity images; default: the run's own
    which: str = opt("best", choices=CHECKPOINTS)
    quantize: str | None = opt(None, choices=QUANTIZE_MODES)  # int8: also write <name>-int8.onnx (onnxruntime)
    max_acc_drop: float = opt(1.0, ge=0, le=100)  # int8: val accuracy may drop this many points at most
    force: bool = False  # int8: exit 0 even when the accuracy drop is over max_acc_drop


@dataclass
class EvalConfig(Validated):
    """What `imgarena eval` needs. Image size, channels, resize, mean and std come from the checkpoint."""

    checkpoint: str = ""  # run folder or .safetensors checkpoint
    data: DataConfig = field(default_factory=DataConfig)  # source (+ cache_dir, workers) of the images to score
    which: str = opt("best", choices=CHECKPOINTS)  # best | last checkpoint of a run folder
    split: str = opt("auto", choices=EVAL_SPLITS)  # auto (test when the data has one, else every image) | test | val | train | all
    batch_size: int = opt(256, ge=1)
    device: str = opt("auto", **DEVICE_RULE)
    amp: str = opt("auto", choices=AMP_MODES)  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off
    tta: str = opt("none", choices=TTA_MODES)  # none | flip | crop | flip-crop (imgarena.evaluation.tta)
    out: str | None = opt(None, nonempty=True)  # also write eval.json, per_class.csv, confusion_matrix.png, errors.png here


# Keys that every config holding them types as a mapping: load_yaml checks them before any merge.
_MAPPING_KEYS = ("data", "model_kwargs", "train", "per_model")
