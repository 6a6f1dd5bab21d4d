"""Self-describing checkpoints: one safetensors file holding the unwrapped weights and, in its
header metadata, a JSON document (model name + kwargs, class names, preprocessing, metrics, split).

One file means one atomic rename: a crash at any moment leaves either the old or the new
checkpoint, never a torn pair. A readable copy of the metadata is written beside it as `.json`.
Loading never unpickles: safetensors for weights, `torch.load(weights_only=True)` for training state.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from pathlib import Path

from imgarena.errors import UserError

FORMAT_VERSION = 1
META_KEY = "imgarena"
CHECKPOINT_NAMES = ("best", "last")

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask without changing it: /proc/self/status on Linux (os.umask(0)-then-restore
    would briefly give other threads' new files mode 0666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS, old kernels): the racy way is the only way
    os.umask(mask)
    return mask


def _disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (torch.save wraps it in a RuntimeError, safetensors
    in a SafetensorError whose text carries 'os error 28')."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(s in text for s in ("No space left on device", "Disk quota exceeded",
                                   f"os error {errno.ENOSPC}", f"os error {errno.EDQUOT}")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 100e6 else f"{n / 1e6:.0f} MB"


def atomic_write(path, write_fn, *, size_hint: int | None = None) -> None:
    """Call write_fn(tmp_path), fsync, then rename over `path` (same directory, so rename is atomic).

    The result gets the permissions a plain open() would (0666 & ~umask), not mkstemp's 0600, so a
    run folder shared with a group stays usable. A full disk (or quota) removes the temp file, leaves
    the previous `path` untouched and raises one UserError with the sizes; `size_hint` is the bytes
    the file will take, when the caller knows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    written = 0
    try:
        write_fn(tmp)
        # After write_fn: some writers (safetensors) replace the file and bring mkstemp's 0600 back.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            written = os.path.getsize(tmp)
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, Exception) and _disk_full(e):
            raise disk_full_error(path, size_hint or written, exact=bool(size_hint)) from None
        raise


def disk_full_error(path: Path, needed: int, *, exact: bool = True) -> UserError:
    try:
        st = os.statvfs(path.parent)
        free = _mb(st.f_bavail * st.f_frsize)
    except OSError:
        free = "unknown"
    need = f"~{_mb(needed)}" if exact else f"more than {_mb(needed)}"
    return UserError(f"disk full at {path}: {need} needed (free: {free}); the previous file is unchanged. "
                     f"Free space or point --out-dir elsewhere")


def atomic_write_text(path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size_hint=len(data))


def atomic_torch_save(obj, path) -> None:
    import torch

    def write(tmp):
        # A file object (not a path): on a full disk torch's own writer reports only
        # "unexpected pos", but the OSError from f.write stays in the chain for _disk_full.
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write, size_hint=_tensor_bytes(obj) or None)


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested state (a lower bound of the file size)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


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
    size = sum(v.numel() * v.element_size() for v in sd.values()) + len(text) + 1024
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={META_KEY: text}), size_hint=size)
    side = Path(path).with_suffix(".json")
    try:
        atomic_write_text(side, text + "\n")
    except BaseException:
        # The weights were replaced: a copy describing the previous ones would be silently wrong.
        side.unlink(missing_ok=True)
        raise


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


def read_metadata(path, which: str | None = "auto") -> dict:
    """Metadata of a checkpoint without loading its weights (no torch needed)."""
    from safetensors import safe_open

    path = resolve_checkpoint(path, which)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path} is not a readable imgarena checkpoint ({e}): pass a run folder or a .safetensors file") from None
    if META_KEY not in meta:
        raise UserError(f"{path} has no imgarena metadata: pass a checkpoint written by `imgarena train`")
    try:
        out = json.loads(meta[META_KEY])
    except ValueError as e:
        raise UserError(f"{path}: its imgarena metadata is not valid JSON ({e}); the file was edited or damaged") from None
    if not isinstance(out, dict):
        raise UserError(f"{path}: its imgarena metadata is not a JSON object; the file was edited or damaged")
    _warn_if_sidecar_differs(path, out)
    return out


def _warn_if_sidecar_differs(path: Path, meta: dict) -> None:
    """The .json beside a checkpoint is a readable copy; the metadata inside the file is what counts."""
    side = path.with_suffix(".json")
    try:
        copy = json.loads(side.read_text())
    except (OSError, ValueError):
        return
    if copy != meta:
        keys = sorted(k for k in set(copy) | set(meta) if copy.get(k) != meta.get(k))
        log.warning("%s differs from the metadata stored inside %s (%s); using the file's own metadata, "
                    "editing the .json changes nothing", side, path.name, ", ".join(keys[:5]))


def read_checkpoint(path, which: str | None = "auto"):
    """(state_dict, meta) from a checkpoint file or run folder."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path, which)
    meta = read_metadata(path)
    try:
        return load_file(str(path)), meta
    except Exception as e:  # a header that reads but tensor data that doesn't (truncated copy)
        raise UserError(f"{path}: cannot read its weights ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "the file is damaged: copy it again or use the run's other checkpoint") from None


def resolve_checkpoint(path_or_run, which: str | None = "auto") -> Path:
    """A run folder resolves to its checkpoint `which` ("best" or "last"); a file is returned as is.

    "auto" (or None) means best, falling back to last with a logged warning when there is no best
    (e.g. a run stopped before its first evaluation); an explicit "best" or "last" that is missing
    is an error naming the file.
    """
    which = "auto" if which is None else str(which)
    if which not in ("auto", *CHECKPOINT_NAMES):
        raise UserError(f"which={which!r}: use best or last")
    p = Path(path_or_run)
    if p.is_dir():
        def find(name: str) -> Path | None:
            for cand in (p / f"{name}.safetensors", p / "checkpoints" / f"{name}.safetensors"):
                if cand.is_file():
                    return cand
            return None

        found = find("best" if which == "auto" else which)
        if found:
            return found
        if which == "auto":
            last = find("last")
            if last:
                log.warning("%s has no best.safetensors; using %s (the latest epoch, not the best one)", p, last)
                return last
            raise UserError(f"{p} holds no checkpoint (best.safetensors or last.safetensors): "
                            "pass a run folder written by `imgarena train`")
        other = "last" if which == "best" else "best"
        hint = f"; it has {other}.safetensors: pass --which {other}" if find(other) else ""
        raise UserError(f"{p / (which + '.safetensors')} not found{hint or ': pass a run folder written by `imgarena train`'}")
    if not p.is_file():
        raise UserError(f"checkpoint {p} not found: pass a run folder or a .safetensors file")
    if p.suffix != ".safetensors":
        raise UserError(f"{p} is not a .safetensors checkpoint: pass a run folder or the .safetensors file inside it")
    return p


def _build_from_meta(path: Path, meta: dict):
    from imgarena.models import create_model

    try:
        m = meta["model"]
        name, kwargs = m["name"], dict(m.get("kwargs") or {})
        num_classes = int(meta["num_classes"])
        chans = int(meta["preprocessing"]["channels"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: its metadata lacks or garbles {e} (model name/kwargs, num_classes, "
                        "preprocessing.channels); the file was edited or not written by `imgarena train`") from None
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != num_classes):
        n = len(names) if isinstance(names, list) else type(names).__name__
        raise UserError(f"{path}: its metadata lists {n} class names but num_classes is {num_classes}; "
                        "the metadata was edited: restore the checkpoint from the run folder")
    try:
        return create_model(name, num_classes=num_classes, in_chans=chans, **kwargs)
    except UserError as e:
        raise UserError(f"{path}: the model its metadata describes cannot be built ({e})") from None


def check_weights_match(path: Path, model, sd: dict, meta: dict) -> None:
    """UserError, one line naming the file, when the weights are not those of the model the metadata describes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return
    desc = f"{meta['model']['name']} with {meta['num_classes']} classes, {meta['preprocessing']['channels']} channels"
    parts = [f"{k} is {a} in the file but {b} for that model" for k, a, b in shapes[:3]]
    if missing:
        parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
    raise UserError(f"{path}: its metadata ({desc}) does not match its weights: {'; '.join(parts)}. "
                    "The metadata was edited or belongs to another file: use the checkpoint as `imgarena train` wrote it")


def load_model(path_or_run, *, which: str | None = "auto", device="cpu", num_classes: int | None = None):
    """Rebuild the model a checkpoint describes and load its weights. Returns (model.eval(), meta).

    `num_classes` different from the checkpoint's replaces the head (fine-tune on another class count).
    """
    path = resolve_checkpoint(path_or_run, which)
    sd, meta = read_checkpoint(path)
    model = _build_from_meta(path, meta)
    check_weights_match(path, model, sd, meta)
    model.load_state_dict(sd, strict=True)
    if num_classes is not None and num_classes != meta["num_classes"]:
        model.reset_classifier(num_classes)
    return model.to(device).eval(), meta
