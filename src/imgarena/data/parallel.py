"""Process-parallel map over chunks with a tqdm progress bar (silenced by IMGARENA_PROGRESS=0)."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor


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
        with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
            futures = [pool.submit(fn, s, items[s : s + step]) for s in starts]
            for s, fut in zip(starts, futures):
                yield fut.result()
                bar.update(min(step, n - s))
    finally:
        bar.close()
