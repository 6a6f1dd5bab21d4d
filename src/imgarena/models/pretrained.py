"""Pretrained weights: timm's (through its hub) or a local state dict in timm's key format.

`load_pretrained(model, spec)` with spec "timm" downloads the weights of the variant's timm
counterpart (`_timm` in its VARIANTS entry); any other spec is a path to a .safetensors/.pth file.
Keys are converted with `models/convert.py`, then adapted to the model that was asked for:
  - the classifier is kept fresh when the class count differs (fine-tuning on your classes);
  - the first convolution (patch embedding / stem) is adapted to another channel count by summing
    (1 channel) or repeating (more channels) the RGB kernel, like timm's `adapt_input_conv`;
  - ViT's learned position embedding is resized bicubically to another patch grid.
Anything else that does not fit (e.g. Mixer token-mixing weights at another image size) is a
UserError naming the parameter.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from imgarena.errors import UserError


def load_pretrained(model: nn.Module, spec: str) -> nn.Module:
    """Load `spec` ("timm" or a file path) into `model` in place; returns the model."""
    name = getattr(model, "model_name", "") or ""
    if name.startswith("timm/"):
        family, timm_name = "timm", name[len("timm/"):]
    else:
        from imgarena.models._registry import get_entry

        entry = get_entry(name)
        family, timm_name = entry.family, entry.timm_name
    if str(spec) == "timm":
        if not timm_name:
            raise UserError(f"model {name!r} has no timm counterpart with published weights; "
                            f"pass pretrained=PATH to a local state dict instead")
        sd = fetch_timm_state_dict(timm_name)
    else:
        sd = read_state_dict(spec)
    sd = _to_ours(family, sd)
    model.load_state_dict(adapt_state_dict(sd, model, source=str(spec)), strict=True)
    return model


def _to_ours(family: str, sd: dict) -> dict:
    if family == "timm":  # the wrapper holds timm's module as `.model`
        return {k if k.startswith("model.") else f"model.{k}": v for k, v in sd.items()}
    from imgarena.models.convert import timm_to_ours

    return timm_to_ours(family, sd)


# --- sources ------------------------------------------------------------------------------------

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
        raise UserError(f"cannot read pretrained weights {str(p)!r} ({type(e).__name__}: {str(e)[:200]}); it must "
                        f"be a .safetensors file or a .pth state dict loadable with weights_only=True") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
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
    """timm's pretrained weights for `timm_name` via its hub (or the local hub cache).

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


# --- adaptation ---------------------------------------------------------------------------------

def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """An RGB kernel (O, 3, kh, kw) for `in_chans` inputs: summed for 1 channel, else repeated and rescaled."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / weight.shape[1])
    w = weight.repeat(1, reps, 1, 1)[:, :in_chans]
    return w * (weight.shape[1] / in_chans)  # keep the response to a constant image unchanged


def _classifier_prefix(model: nn.Module) -> str:
    """Module path of the classifier ("head", or "model.fc" in a wrapped timm ResNet), with a trailing dot."""
    head = model.get_classifier()
    for name, m in model.named_modules():
        if m is head:
            return name + "."
    return "head."


def adapt_state_dict(sd: dict, model: nn.Module, source: str = "weights") -> dict:
    """`sd` (already in our key layout) made to fit `model`: fresh head, adapted stem and position embedding."""
    own = model.state_dict()
    head = _classifier_prefix(model)
    # The source's classifier may be missing (saved without one) or extra (our num_classes=0): both fine.
    missing = sorted(k for k in set(own) - set(sd) if not k.startswith(head))
    unexpected = sorted(k for k in set(sd) - set(own) if not k.startswith(head))
    if missing or unexpected:
        raise UserError(f"{source} does not match {getattr(model, 'model_name', '') or type(model).__name__}: "
                        f"missing {missing[:4]}, unexpected {unexpected[:4]}; is it the same architecture, "
                        f"in timm's key format?")
    out = {}
    for k, target in own.items():
        v = sd.get(k)
        if v is None or k.startswith(head) and v.shape != target.shape:
            out[k] = target  # fresh classifier for another class count
        elif v.shape == target.shape:
            out[k] = v
        elif v.ndim == 4 and v.shape[0] == target.shape[0] and v.shape[2:] == target.shape[2:]:
            out[k] = adapt_input_conv(target.shape[1], v.float()).to(target.dtype)  # other channel count
        elif k.endswith("pos_embed") and v.ndim == 3 and v.shape[-1] == target.shape[-1]:
            out[k] = _resize_pos_embed(v, target, model)
        else:
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)} but the model needs {tuple(target.shape)}; "
                            f"build the model at the size the weights were trained for (e.g. img_size=224) "
                            f"or train from scratch")
    return out


def _resize_pos_embed(v: torch.Tensor, target: torch.Tensor, model: nn.Module) -> torch.Tensor:
    from imgarena.models.vit import resample_pos_embed

    inner = getattr(model, "model", model)  # the timm wrapper keeps its ViT as .model
    prefix = int(getattr(inner, "num_prefix_tokens", 1))
    if getattr(inner, "no_embed_class", False):
        prefix = 0
    new = target.shape[1] - prefix
    side = math.isqrt(new)
    if side * side != new:
        raise UserError(f"cannot resize the position embedding to {new} patches (not a square grid)")
    return resample_pos_embed(v, (side, side), None, prefix).to(target.dtype)
