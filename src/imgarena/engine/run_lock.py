"""One owner per run folder: `run_dir/.lock`, held with fcntl.flock for the whole run.

flock belongs to the open file, so the kernel releases it when the owner exits in any way, kill -9
included: a lock file left behind by a dead run is not a lock, and the folder can be resumed at
once. The file holds "pid host" for the message a second process gets.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from imgarena.errors import UserError

LOCK_FILE = ".lock"


class RunFolderBusy(UserError):
    """Another live process is training in this run folder."""


class RunLock:
    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, action: str = "train in", advice: str = "wait for it to finish, or pick another --name"):
        """Take the lock (returns self) or raise RunFolderBusy naming the owner; `action` and
        `advice` word the message."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise RunFolderBusy(f"cannot {action} {self.path.parent}: another imgarena process ({owner}) is "
                                    f"training there; {advice}") from None
            # The previous owner unlinks the file on release: if it did between our open and our
            # flock, we hold a lock on a deleted file, so start over on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: nobody can lock this inode after
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if len(text) >= 2:
        return f"pid {text[0]} on {text[1]}"
    return f"pid {text[0]}" if text else "pid unknown"
