"""Self-describing checkpoints: one safetensors file holding the unwrapped weights and, in its
header metadata, a JSON document (model name + kwargs, class names, preprocessing, metrics, split).

One file means one atomic rename: a crash at any moment leaves either the old or the new
checkpoint, never a torn pair. A readable copy of the metadata is written beside it as `.json`.
Loading never unpickles: safetensors for weights, `torch.load(weights_only=True)` for training state.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from imgarena.errors import UserError

FORMAT_VERSION = 1
META_KEY = "imgarena"


def atomic_write(path, write_fn) -> None:
    """Call write_fn(tmp_path), fsync, then rename over `path` (same directory, so rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file owner-only; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_torch_save(obj, path) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def unwrap_model(model):
    """The plain module under DDP / torch.compile / EMA wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "forward_features"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path, model_or_state_dict, meta: dict) -> None:
    """Atomically write weights + metadata to `path` (.safetensors) and a `.json` copy of the metadata."""
    from safetensors.torch import save_file

    if hasattr(model_or_state_dict, "state_dict"):
        sd = unwrap_model(model_or_state_dict).state_dict()
    else:
        sd = model_or_state_dict
    # safetensors refuses shared/non-contiguous storage; clone to plain contiguous CPU tensors.
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    meta = {"format_version": FORMAT_VERSION, **meta}
    text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default)
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={META_KEY: text}))
    atomic_write_text(Path(path).with_suffix(".json"), text + "\n")


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_metadata(path) -> dict:
    """Metadata of a checkpoint without loading its weights (no torch needed)."""
    from safetensors import safe_open

    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path} is not a readable imgarena checkpoint ({e}): pass a run folder or a .safetensors file") from None
    if META_KEY not in meta:
        raise UserError(f"{path} has no imgarena metadata: pass a checkpoint written by `imgarena train`")
    return json.loads(meta[META_KEY])


def read_checkpoint(path):
    """(state_dict, meta) from a checkpoint file or run folder."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    return load_file(str(path)), meta


def resolve_checkpoint(path_or_run, which: str = "best") -> Path:
    """A run folder resolves to its `best.safetensors` (or `which`); a file is returned as is."""
    p = Path(path_or_run)
    if p.is_dir():
        for cand in (p / f"{which}.safetensors", p / "checkpoints" / f"{which}.safetensors", p / "last.safetensors"):
            if cand.is_file():
                return cand
        raise UserError(f"{p} holds no checkpoint ({which}.safetensors): pass a run folder written by `imgarena train`")
    if not p.is_file():
        raise UserError(f"checkpoint {p} not found: pass a run folder or a .safetensors file")
    if p.suffix != ".safetensors":
        raise UserError(f"{p} is not a .safetensors checkpoint: pass a run folder or the .safetensors file inside it")
    return p


def load_model(path_or_run, *, which: str = "best", device="cpu", num_classes: int | None = None):
    """Rebuild the model a checkpoint describes and load its weights. Returns (model.eval(), meta).

    `num_classes` different from the checkpoint's replaces the head (fine-tune on another class count).
    """
    from imgarena.models import create_model

    sd, meta = read_checkpoint(resolve_checkpoint(path_or_run, which))
    m = meta["model"]
    model = create_model(m["name"], num_classes=meta["num_classes"], in_chans=meta["preprocessing"]["channels"],
                         **m.get("kwargs", {}))
    model.load_state_dict(sd, strict=True)
    if num_classes is not None and num_classes != meta["num_classes"]:
        model.reset_classifier(num_classes)
    return model.to(device).eval(), meta
