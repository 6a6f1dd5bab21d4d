"""Pretrained weights: where they come from, the preprocessing they bring, and fitting them to a model.

A spec (`--pretrained SPEC`) is one of
  - "timm": timm's hub weights of the variant's timm counterpart (`_timm` in its VARIANTS entry, or
    the name of a `timm/<name>` model) with timm's default tag; "timm:<arch.tag>" names one tagged
    set, e.g. timm:mixer_b16_224.miil_in21k (the arch must be the model's own);
  - a weights file (.safetensors, .pth/.pt/.bin) in timm's key layout or ours (told apart by which one
    fits the model's keys), or a folder in timm's hub layout holding one (model.safetensors);
    its preprocessing is read from a sidecar `<file>.json` or a `config.json` beside it;
  - an imgarena run folder or one of its checkpoints: its backbone with a fresh head, its
    architecture options and its preprocessing.
`load_pretrained(model, spec)` loads the weights; `pretrained_preprocessing`, `source_model_kwargs`
and `pretrained_record` describe them for the training run. Loaded weights are adapted to the model:
  - the classifier is kept fresh when the class count differs (always, for a run's weights);
  - the first convolution (patch embedding / stem) is adapted to another channel count by summing
    (1 channel) or repeating (more channels) the RGB kernel, like timm's `adapt_input_conv`;
  - ViT's learned position embedding is resized bicubically to another (square) patch grid.
Anything else that does not fit (e.g. Mixer token-mixing weights at another image size) is a
UserError naming the tensor and both shapes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgarena.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a timm / Hugging Face hub snapshot folder
# timm's eval transform is resize (keeping the aspect) + centre crop; crop_mode names the variants
CROP_MODE_RESIZE = {"center": "crop", "squash": "squash", "border": "pad"}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # what the image pipeline implements
# options of a run's model that belong to the run, not to its architecture
_NOT_ARCHITECTURE = ("img_size", "drop_path_rate")


@dataclass(frozen=True)
class Source:
    """A resolved spec: kind "timm" (timm_name: arch or arch.tag), "file" or "run" (path: the file)."""

    spec: str
    kind: str
    path: Path | None = None
    timm_name: str | None = None


def resolve_source(spec, model_name: str) -> Source:
    """What `spec` names, checked against the model it is for (UserError, one line, when it cannot be)."""
    spec = str(spec)
    if spec == "timm" or spec.startswith("timm:"):
        return Source(spec, "timm", timm_name=_timm_weights_name(spec, model_name))
    p = Path(spec)
    if p.is_dir():
        from imgarena.checkpoint import CHECKPOINT_NAMES

        hub = [p / n for n in HUB_WEIGHT_FILES if (p / n).is_file()]
        if hub and not any((p / f"{n}.safetensors").is_file() or (p / "checkpoints" / f"{n}.safetensors").is_file()
                           for n in CHECKPOINT_NAMES):
            return Source(spec, "file", path=hub[0])
        from imgarena.checkpoint import resolve_checkpoint

        try:
            ckpt = resolve_checkpoint(p, "auto")
        except UserError:
            raise UserError(f"--pretrained {spec}: the folder holds no imgarena checkpoint (best/last.safetensors) "
                            f"and no timm weights ({' or '.join(HUB_WEIGHT_FILES)}); pass a run folder or a "
                            f"weights file") from None
        return _run_source(spec, ckpt, model_name)
    if not p.is_file():
        raise UserError(f"pretrained weights {spec!r} not found: pass timm, timm:<name.tag>, a weights file "
                        f"({'/'.join(WEIGHT_SUFFIXES)}) or an imgarena run folder")
    if p.suffix == ".safetensors" and _imgarena_meta(p) is not None:
        return _run_source(spec, p, model_name)
    return Source(spec, "file", path=p)


def _imgarena_meta(path: Path) -> dict | None:
    """The imgarena metadata of a .safetensors file, None for any other (e.g. timm's) file."""
    from safetensors import safe_open

    from imgarena.checkpoint import META_KEY

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception:  # not readable as safetensors: read_state_dict reports it
        return None
    return meta if META_KEY in meta else None


def _run_source(spec: str, ckpt: Path, model_name: str) -> Source:
    from imgarena.checkpoint import read_metadata

    meta = read_metadata(ckpt)
    held = (meta.get("model") or {}).get("name")
    if held != model_name:
        raise UserError(f"{spec} holds {held} weights but --model is {model_name}: pass --model {held} "
                        f"(a run's weights fit only its own architecture)")
    return Source(spec, "run", path=ckpt)


def _timm_arch_of(model_name: str) -> str | None:
    if model_name.startswith("timm/"):
        return model_name[len("timm/"):]
    from imgarena.models._registry import get_entry

    return get_entry(model_name).timm_name


def _timm_weights_name(spec: str, model_name: str) -> str:
    """timm's name (arch or arch.tag) of the weights `spec` asks for, checked against the model."""
    from timm.models import get_pretrained_cfg, is_model_pretrained, split_model_name_tag

    arch = _timm_arch_of(model_name)
    if spec == "timm":
        if not arch:
            raise UserError(f"model {model_name!r} has no timm counterpart with published weights; pass "
                            f"pretrained=PATH to a local state dict instead (or timm/<name> as --model)")
        name = arch
    else:
        name = spec[len("timm:"):].strip()
        if not name:
            raise UserError(f"--pretrained {spec!r}: name timm's weights, e.g. timm:resnet50.a1_in1k")
        from timm.models import _registry as timm_registry

        name = getattr(timm_registry, "_deprecated_models", {}).get(name, name)  # e.g. mixer_b16_224_miil_in21k
        got = split_model_name_tag(name)[0]
        want = split_model_name_tag(arch)[0] if arch else None
        if got != want:
            ours = _variant_for_timm_arch(got)
            mine = f"timm's {want}" if want else "no timm architecture"
            raise UserError(f"--pretrained {spec}: timm's {got} weights do not fit --model {model_name} ({mine}): "
                            f"pass --model {ours or 'timm/' + got}")
        try:
            get_pretrained_cfg(name)
        except RuntimeError:  # timm: "Invalid pretrained tag (x) for arch"
            import timm

            tags = timm.list_pretrained(f"{got}.*")
            raise UserError(f"--pretrained {spec}: timm has no weights tagged {name!r}; its tags for {got}: "
                            f"{', '.join(tags[:8]) or 'none'}") from None
    if not is_model_pretrained(name):
        raise UserError(f"timm publishes no pretrained weights for {name!r}; pass pretrained=PATH to a local "
                        f"state dict (.safetensors or .pth in timm's format) or train from scratch")
    return name


def _variant_for_timm_arch(arch: str) -> str | None:
    from imgarena.models._registry import get_entry, list_models

    return next((n for n in list_models() if get_entry(n).timm_name == arch), None)


# --- what the weights bring -----------------------------------------------------------------------

def pretrained_preprocessing(spec, model_name: str) -> dict:
    """The preprocessing the weights `spec` were trained with: a subset of img_size, channels,
    crop_pct, interpolation, mean, std and resize; {} when they come without one (then a warning)."""
    src = resolve_source(spec, model_name)
    if src.kind == "timm":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(src.timm_name)
        return preprocessing_from_config(cfg.to_dict(), f"timm's pretrained config of {src.timm_name}") if cfg else {}
    if src.kind == "run":
        from imgarena.checkpoint import read_metadata

        pre = read_metadata(src.path).get("preprocessing") or {}
        return preprocessing_from_config(pre, f"{src.path}'s preprocessing")
    found = find_config_file(src.path)
    if found is None:
        log.warning("%s comes without its preprocessing (no %s or config.json beside it): the training images' own "
                    "mean/std are used; pass --mean/--std (and --crop-pct, --interpolation) with the values the "
                    "weights were trained with", src.path, _sidecars(src.path)[0].name)
        return {}
    try:
        doc = json.loads(found.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{found}: cannot read the weights' preprocessing ({type(e).__name__}: {e}); fix or remove "
                        f"the file") from None
    if not isinstance(doc, dict):
        raise UserError(f"{found}: expected a JSON object with the weights' preprocessing (timm's pretrained_cfg)")
    for key in ("pretrained_cfg", "preprocessing"):  # timm's hub config.json; an imgarena export sidecar
        if isinstance(doc.get(key), dict):
            doc = doc[key]
            break
    out = preprocessing_from_config(doc, str(found))
    if not out:
        log.warning("%s holds no preprocessing keys (input_size, mean, std, crop_pct, interpolation): the training "
                    "images' own mean/std are used; pass --mean/--std to set them", found)
    return out


def _sidecars(path: Path) -> list[Path]:
    return [Path(str(path) + ".json"), path.with_suffix(".json"), path.parent / "config.json"]


def find_config_file(path: Path) -> Path | None:
    """The weights' config: `<file>.json` (e.g. w.safetensors.json or w.json), else config.json beside it."""
    return next((p for p in _sidecars(Path(path)) if p != Path(path) and p.is_file()), None)


def preprocessing_from_config(d: dict, where: str) -> dict:
    """Our preprocessing keys from timm's pretrained_cfg (input_size, crop_mode ...) or our own
    (img_size, channels ...), each value checked (UserError naming `where`)."""
    def bad(key, value, need):
        return UserError(f"{where}: {key} {value!r} {need}; fix the file (or remove it and set the option by hand)")

    def number(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    out: dict = {}
    size = d.get("input_size")
    if size is not None:
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) for v in size)):
            raise bad("input_size", size, "must be [channels, height, width]")
        out["channels"], out["img_size"] = int(size[0]), int(size[-1])
    for key in ("img_size", "channels"):
        if d.get(key) is not None:
            out[key] = d[key]
    if "img_size" in out and (not isinstance(out["img_size"], int) or not 8 <= out["img_size"] <= 4096):
        raise bad("img_size", out["img_size"], "must be a whole number of pixels in 8..4096")
    if "channels" in out and out["channels"] not in (1, 3):
        raise bad("channels", out["channels"], "must be 1 (gray) or 3 (RGB)")
    crop = d.get("crop_pct")
    if crop is not None:
        if not number(crop) or not 0 < crop <= 1:
            raise bad("crop_pct", crop, "must be a fraction in (0, 1]")
        out["crop_pct"] = float(crop)
    interp = d.get("interpolation")
    if interp is not None:
        if interp in INTERPOLATIONS:
            out["interpolation"] = interp
        else:  # e.g. lanczos: the nearest we have is bicubic, but a silent substitute would be a lie
            log.warning("%s: interpolation %r is not supported (%s); the run's own setting is used",
                        where, interp, ", ".join(INTERPOLATIONS))
    mean, std = d.get("mean"), d.get("std")
    if mean is not None and std is not None:
        for key, v in (("mean", mean), ("std", std)):
            if not isinstance(v, (list, tuple)) or len(v) not in (1, 3) or not all(number(x) for x in v):
                raise bad(key, v, "must be a list of 1 or 3 numbers")
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise bad("std", std, f"must be as many positive numbers as mean ({len(mean)})")
        out["mean"], out["std"] = [float(x) for x in mean], [float(x) for x in std]
    resize = d.get("resize")
    if resize is None and d.get("crop_mode") is not None:
        resize = CROP_MODE_RESIZE.get(d["crop_mode"])
    elif resize is None and "input_size" in d:
        resize = "crop"  # timm's default eval transform: shorter-side resize + centre crop
    if resize is not None:
        out["resize"] = resize
    return out


def source_model_kwargs(spec, model_name: str) -> dict:
    """The architecture options the weights need: a run's model_kwargs (without img_size and
    drop_path_rate, which belong to the new run); {} for timm's weights and files."""
    if not spec:
        return {}
    src = resolve_source(spec, model_name)
    if src.kind != "run":
        return {}
    from imgarena.checkpoint import read_metadata

    kwargs = dict((read_metadata(src.path).get("model") or {}).get("kwargs") or {})
    return {k: v for k, v in kwargs.items() if k not in _NOT_ARCHITECTURE}


def source_img_size(spec, model_name: str) -> int | None:
    """The image size a run's weights were trained at (None for other sources): the size a model
    built from them takes when no other is asked for."""
    if not spec:
        return None
    src = resolve_source(spec, model_name)
    if src.kind != "run":
        return None
    from imgarena.checkpoint import read_metadata

    size = (read_metadata(src.path).get("preprocessing") or {}).get("img_size")
    return int(size) if isinstance(size, int) else None


def pretrained_record(spec, model_name: str) -> dict | None:
    """What the run started from, for its checkpoints and summary.json: source (as given), kind,
    name (timm's arch.tag, or the file read) and the sha256 of the weights file (None for timm's hub)."""
    if not spec:
        return None
    src = resolve_source(spec, model_name)
    if src.kind == "timm":
        return {"source": str(spec), "kind": "timm", "name": src.timm_name, "sha256": None}
    return {"source": str(spec), "kind": src.kind, "name": str(src.path), "sha256": file_sha256(src.path)}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- loading --------------------------------------------------------------------------------------

def load_pretrained(model: nn.Module, spec: str) -> nn.Module:
    """Load the weights `spec` names into `model` in place; returns the model."""
    name = getattr(model, "model_name", "") or ""
    src = resolve_source(spec, name)
    if name.startswith("timm/"):
        family = "timm"
    else:
        from imgarena.models._registry import get_entry

        family = get_entry(name).family
    keep_head = True
    if src.kind == "timm":
        sd = _to_ours(family, fetch_timm_state_dict(src.timm_name))
    elif src.kind == "file":
        sd = _pick_layout(read_state_dict(src.path), model, family)
    else:
        from imgarena.checkpoint import read_checkpoint

        sd, _ = read_checkpoint(src.path)  # our own layout
        keep_head = False  # a run's head knows its own classes, not the new ones
    model.load_state_dict(adapt_state_dict(sd, model, source=str(spec), keep_head=keep_head), strict=True)
    return model


def _to_ours(family: str, sd: dict) -> dict:
    if family == "timm":  # the wrapper holds timm's module as `.model`
        return {k if k.startswith("model.") else f"model.{k}": v for k, v in sd.items()}
    from imgarena.models.convert import timm_to_ours

    return timm_to_ours(family, sd)


def _pick_layout(sd: dict, model: nn.Module, family: str) -> dict:
    """`sd` in our key layout: as it is, or converted from timm's, whichever shares more keys with the
    model (the head included: timm's head.fc.* and our head.* are both head-like)."""
    from imgarena.models.convert import CONVERTERS

    if family != "timm" and family not in CONVERTERS:  # no timm counterpart (cnn, mlp): only our layout exists
        return sd
    own = set(model.state_dict())
    converted = _to_ours(family, sd)
    return sd if len(own & set(sd)) >= len(own & set(converted)) else converted


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module paths (with a trailing dot) of the model's classifier, `get_classifier()`, found by
    identity: a head nested in a wrapper ("model.fc."), made of several modules (DeiT's "head." and
    "head_dist.") or an Identity (num_classes=0) is found too."""
    mods = {id(m) for m in model.get_classifier().modules()}
    return tuple(f"{n}." for n, m in model.named_modules(remove_duplicate=False) if n and id(m) in mods) or ("head.",)


def read_state_dict(path) -> dict:
    """Tensors from a .safetensors file, or a .pth/.pt/.bin file read with torch.load(weights_only=True).

    A training checkpoint that nests the weights under "state_dict", "model" or "state_dict_ema" works too.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"pretrained weights {str(p)!r} not found: pass pretrained='timm' or a path to a "
                        f".safetensors/.pth state dict in timm's format")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickled code, wrong format
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot read pretrained weights {str(p)!r} ({type(e).__name__}: {first}); it must "
                        f"be a .safetensors file or a .pth state dict loadable with weights_only=True") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{str(p)!r} is not a state dict (name -> tensor); save one with "
                        f"safetensors.torch.save_file(model.state_dict(), path)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _fetch_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises: huggingface_hub's errors (LocalEntryNotFoundError, raised when
    HF_HUB_OFFLINE=1 or the hub is unreachable and the file is not cached, is an OSError), urllib's
    URLError (timm's URL fallback; an OSError too) and the HTTP client's connection errors."""
    types: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        types += [HfHubHTTPError, OfflineModeIsEnabled]
    except ImportError:
        pass
    for mod, name in (("requests.exceptions", "RequestException"), ("httpx", "HTTPError"), ("httpx", "TransportError")):
        try:
            types.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def fetch_timm_state_dict(timm_name: str) -> dict:
    """timm's pretrained weights for `timm_name` (arch or arch.tag) via its hub (or the local hub cache).

    The hub client's own settings apply: HF_HUB_OFFLINE=1 (cache only, no waiting on the network),
    HF_ENDPOINT, HF_HOME and proxies. Download failures become one UserError; anything else is a bug
    and propagates.
    """
    import timm

    try:
        return timm.create_model(timm_name, pretrained=True).state_dict()
    except RuntimeError as e:
        if "No pretrained weights exist" not in str(e):  # timm's words for a config without weights
            raise
        raise UserError(f"timm publishes no pretrained weights for {timm_name!r}; pass pretrained=PATH to a local "
                        f"state dict (.safetensors or .pth in timm's format) or train from scratch") from None
    except _fetch_errors() as e:
        from huggingface_hub.constants import HF_HUB_OFFLINE

        first = (str(e).strip().splitlines() or [""])[0][:160]
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
        mode = ("HF_HUB_OFFLINE=1 is set, so only the local cache was searched" if HF_HUB_OFFLINE else
                "set HF_HUB_OFFLINE=1 to use only the local cache without waiting on the network")
        raise UserError(f"could not fetch timm weights for {timm_name!r} ({why}); {mode}. Download them where "
                        f"the hub is reachable and pass the local file: pretrained=PATH "
                        f"(.safetensors or .pth in timm's format)") from None


# --- adaptation -----------------------------------------------------------------------------------

def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """An RGB kernel (O, 3, kh, kw) for `in_chans` inputs: summed for 1 channel, else repeated and rescaled."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / weight.shape[1])
    w = weight.repeat(1, reps, 1, 1)[:, :in_chans]
    return w * (weight.shape[1] / in_chans)  # keep the response to a constant image unchanged


def _shape(t) -> tuple:
    return tuple(t.shape)


def adapt_state_dict(sd: dict, model: nn.Module, source: str = "weights", keep_head: bool = True) -> dict:
    """`sd` (already in our key layout) made to fit `model`: fresh head (when the class count differs,
    or always without keep_head), adapted stem and position embedding."""
    own = model.state_dict()
    name = getattr(model, "model_name", "") or type(model).__name__
    head = classifier_prefixes(model)
    # The source's classifier may be missing (saved without one) or extra (our num_classes=0): both fine.
    missing = sorted(k for k in set(own) - set(sd) if not k.startswith(head))
    unexpected = sorted(k for k in set(sd) - set(own) if not k.startswith(head))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the model's {missing[0]} {_shape(own[missing[0]])} is missing"
                         + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"the weights' {unexpected[0]} {_shape(sd[unexpected[0]])} is unexpected"
                         + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise UserError(f"{source} does not match {name}: {'; '.join(parts)}; the weights belong to another "
                        f"architecture: pass the --model (and --model-kwargs) they were trained as")
    out = {}
    for k, target in own.items():
        v = sd.get(k)
        if v is None or k.startswith(head) and (not keep_head or v.shape != target.shape):
            out[k] = target  # fresh classifier for the new classes
        elif v.shape == target.shape:
            out[k] = v
        elif v.ndim == 4 and v.shape[0] == target.shape[0] and v.shape[2:] == target.shape[2:]:
            out[k] = adapt_input_conv(target.shape[1], v.float()).to(target.dtype)  # other channel count
        elif k.endswith("pos_embed") and v.ndim == 3 and v.shape[-1] == target.shape[-1]:
            out[k] = _resize_pos_embed(k, v, target, model, source)
        else:
            raise UserError(f"{source}: {k} has shape {_shape(v)} but {name} needs {_shape(target)}; the weights were "
                            f"made for another image size or architecture: build the model at the img_size they "
                            f"were trained for (--img-size) with their --model-kwargs, or train from scratch")
    return out


def _resize_pos_embed(key: str, v: torch.Tensor, target: torch.Tensor, model: nn.Module, source: str) -> torch.Tensor:
    from imgarena.models.vit import resample_pos_embed

    inner = getattr(model, "model", model)  # the timm wrapper keeps its ViT as .model
    prefix = int(getattr(inner, "num_prefix_tokens", 1))
    if getattr(inner, "no_embed_class", False):
        prefix = 0
    old, new = v.shape[1] - prefix, target.shape[1] - prefix
    old_side, new_side = math.isqrt(max(old, 0)), math.isqrt(max(new, 0))
    if old_side * old_side != old or new_side * new_side != new or not old:
        raise UserError(f"{source}: {key} has shape {_shape(v)} but the model needs {_shape(target)}; with "
                        f"{prefix} prefix token(s) that is {old} -> {new} patch positions, not two square grids, so "
                        f"it cannot be resized: build the model at the img_size the weights were trained for")
    return resample_pos_embed(v, (new_side, new_side), (old_side, old_side), prefix).to(target.dtype)
