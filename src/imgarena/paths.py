"""Output locations checked before any work: a folder that can be created and written, a file
path that is not a folder. Each failure is one UserError naming the option, the path and what to do.

The check is real (create the folder, write and delete a probe file), not a permission-bit guess:
that is the only test that also holds for root, read-only mounts, full disks and vanished drives.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from imgarena.errors import UserError

_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "the folder vanished or its drive is missing",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ENODEV: "no such device",
    errno.EIO: "input/output error on the device",
}


def _reason(e: OSError) -> str:
    return _REASONS.get(e.errno, e.strerror or type(e).__name__)


def _file_in_the_way(p: Path) -> Path | None:
    """The existing non-folder that `p` or one of its parents is, if any."""
    for q in (p, *p.parents):
        if os.path.lexists(q):
            return None if q.is_dir() else q
    return None


def ensure_writable_dir(path, option: str) -> Path:
    """Create folder `path` (with its parents) if needed and prove it is writable; UserError naming
    `option` (e.g. "--out-dir") otherwise. Returns the path."""
    p = Path(os.path.expanduser(str(path)))
    blocker = _file_in_the_way(p)
    if blocker == p:
        what = "a broken link" if p.is_symlink() and not p.exists() else "a file"
        raise UserError(f"{option} {path} is {what}, not a folder: pass a folder path (new or existing)")
    if blocker is not None:
        raise UserError(f"{option} {path}: {blocker} is a file, not a folder: pass a path whose parents are folders")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".imgarena-write-test-", dir=p)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write there ({_reason(e)}): pass a folder you can write to") from None
    return p


def check_output_file(path, option: str) -> Path:
    """`path` is about to be written as a file: it must not be a folder, and its folder must be
    writable (created if missing). UserError naming `option` otherwise. Returns the path."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        raise UserError(f"{option} {path} is a folder: pass a file path, e.g. {os.path.join(str(path), 'out')}{p.suffix}")
    if str(path).endswith(("/", os.sep)):
        raise UserError(f"{option} {path} ends with a slash: pass a file path, not a folder")
    if os.path.lexists(p) and not p.is_file():
        raise UserError(f"{option} {path} exists and is not a regular file: pass another file path")
    ensure_writable_dir(p.parent if str(p.parent) else Path("."), f"{option} {path}: its folder")
    return p
