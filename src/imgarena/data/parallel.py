"""Process-parallel map over chunks with a tqdm progress bar (silenced by IMGARENA_PROGRESS=0).

Workers die with the process that started them, even when it is killed with SIGKILL: otherwise
they would live on, blocked on a pipe nobody writes to any more.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL = 0.5  # seconds between parent checks where prctl is not available


def _set_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent dies. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, interval: float = WATCH_INTERVAL) -> None:
    while os.getppid() == parent_pid:  # an orphan is re-parented to init (or a subreaper)
        time.sleep(interval)
    os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this process when `parent_pid` dies (prctl on Linux, else a watchdog
    thread polling os.getppid())."""
    # The kernel signal follows the *thread* that forked the worker: map_chunks' calling thread,
    # which outlives the pool (it is shut down inside the call).
    if _set_parent_death_signal():
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="imgarena-parent-watch").start()


def progress_enabled(progress: bool = True) -> bool:
    return bool(progress) and os.environ.get("IMGARENA_PROGRESS", "1") not in ("0", "false", "no", "")


def default_workers(workers: int | None = 0) -> int:
    if workers and workers > 0:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def _context():
    # fork starts workers in milliseconds and needs no `if __name__ == "__main__"` guard in user
    # scripts; the workers only run Pillow/numpy code, never torch.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def map_chunks(fn, items: list, *, workers: int = 0, progress: bool = True, desc: str = "", min_parallel: int = 256):
    """Yield fn(start, chunk) for consecutive chunks of `items`, in order; the progress bar counts items.

    Small jobs (< min_parallel items) or workers == 1 run in this process.
    """
    from tqdm import tqdm

    n = len(items)
    workers = default_workers(workers)
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress_enabled(progress) or n == 0, leave=False,
               dynamic_ncols=True)
    try:
        if workers == 1 or n < min_parallel:
            step = max(1, min(256, n))
            for s in range(0, n, step):
                yield fn(s, items[s : s + step])
                bar.update(min(step, n - s))
            return
        step = max(16, min(512, n // (workers * 8) or 16))
        starts = list(range(0, n, step))
        with ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(fn, s, items[s : s + step]) for s in starts]
            for s, fut in zip(starts, futures):
                yield fut.result()
                bar.update(min(step, n - s))
    finally:
        bar.close()
