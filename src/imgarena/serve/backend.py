"""The model behind `imgarena serve`: an exported .onnx (onnxruntime + numpy + Pillow, no torch) or a
run folder / checkpoint (PyTorch), and a micro-batcher that runs concurrent requests' images as one
batch. Logits -> probabilities -> rows reuse `imgarena.predict`, so a served image gets the same row
as `imgarena predict --format json` gives the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from imgarena.calibration import temperature_of
from imgarena.data.images import decode_settings
from imgarena.errors import UserError
from imgarena.predict import PredictionRow, class_names_of, is_onnx, softmax, topk_pairs

log = logging.getLogger(__name__)


@dataclass
class Backend:
    """What the server needs from a model: its logits function and how to describe it."""

    kind: str  # "onnx" | "torch"
    source: str  # the file or run folder it was loaded from
    meta: dict  # checkpoint meta or ONNX sidecar
    logits_fn: Callable[[np.ndarray], np.ndarray]  # uint8 (N, C, H, W) -> logits (N, K)
    class_names: list[str] = field(default_factory=list)
    temperature: float | None = None  # calibration: probabilities are softmax(logits / temperature)

    @property
    def preprocessing(self) -> dict:
        return self.meta["preprocessing"]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        return softmax(z / self.temperature if self.temperature else z)

    def rows(self, names: list[str], probs: np.ndarray, topk: int, min_prob: float | None = None) -> list[PredictionRow]:
        """The rows `predict --format json` writes (path = the uploaded file's name); label
        "unknown" when the top probability is below `min_prob`."""
        return [PredictionRow(n, topk_pairs(p, self.class_names, topk), min_prob=min_prob) for n, p in zip(names, probs)]

    def info(self) -> dict:
        pre = self.preprocessing
        model = self.meta.get("model") or {}
        return {
            "backend": self.kind,
            "file": os.path.basename(os.path.normpath(self.source)),
            "model": {"name": model.get("name"), "kwargs": model.get("kwargs", {})},
            "num_classes": len(self.class_names),
            "class_names": list(self.class_names),
            "preprocessing": {**decode_settings(pre), "mean": list(pre["mean"]), "std": list(pre["std"])},
            "calibration": ({"method": "temperature", "temperature": self.temperature} if self.temperature
                            else {"method": "none", "temperature": None}),
        }


def load_backend(source, *, device: str = "auto", which: str = "best", tta: str = "none", amp: str = "auto") -> Backend:
    """An .onnx export (its sidecar beside it) through onnxruntime, anything else through PyTorch."""
    source = str(source)
    if is_onnx(source):
        from imgarena.evaluation.tta import parse_tta
        from imgarena.onnx_predict import onnx_logits_fn, ort_session, read_sidecar, sidecar_path

        if parse_tta(tta) != "none":
            raise UserError("--tta needs the PyTorch checkpoint: pass the run folder instead of the .onnx file")
        meta = read_sidecar(source)
        session = ort_session(source, device)
        batch = session.get_inputs()[0].shape[0]
        if isinstance(batch, int) and batch != 1:
            raise UserError(f"{source} takes batches of exactly {batch}: re-export with --dynamic-batch")
        return Backend("onnx", source, meta, onnx_logits_fn(session, meta["preprocessing"]), class_names_of(meta),
                       temperature_of(meta, sidecar_path(source)))
    from imgarena.predict import load_torch_predictor

    _, meta, fn = load_torch_predictor(source, device=device, amp=amp, tta=tta, which=which)
    return Backend("torch", source, meta, fn, class_names_of(meta), temperature_of(meta, source))


class MicroBatcher:
    """Gathers images from concurrent requests into one model call.

    The first waiting image opens a batch; images queued while the model was busy join it, and so
    do those of requests already announced (`coming()`: reading or decoding) that arrive within
    `max_wait` seconds, up to `max_batch`. With nothing announced there is nobody to wait for, so
    a lone client pays no wait. The model runs on one thread of its own, so the event loop keeps
    accepting and decoding while it computes.
    """

    def __init__(self, logits_fn, *, max_batch: int, max_wait: float):
        self.logits_fn, self.max_batch, self.max_wait = logits_fn, max_batch, max_wait
        self.batches = self.images = 0
        self._incoming = 0  # announced requests whose images are not queued yet
        self._pending: deque = deque()  # (image, future) in arrival order
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgarena-model")

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="imgarena-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    @contextlib.contextmanager
    def coming(self):
        """Announce a request whose images will follow; yields its `Ticket`."""
        ticket = Ticket(self)
        self._incoming += 1
        try:
            yield ticket
        finally:
            ticket.close()

    async def logits(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Logits (len(arrays), K) for uint8 (C, H, W) images, computed in whatever batches form."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in arrays]
        self._pending.extend(zip(arrays, futures))  # one request's images stay together
        self._arrived.set()
        return np.stack(await asyncio.gather(*futures))

    async def _next_batch(self) -> list:
        """Wait for the first image, then up to max_wait for announced requests to fill the batch."""
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.max_wait
        while len(self._pending) < self.max_batch and self._incoming > 0 and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
        n = min(self.max_batch, len(self._pending))
        batch = [self._pending.popleft() for _ in range(n)]
        return [(a, f) for a, f in batch if not f.done()]  # drop images of clients that went away

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                out = await loop.run_in_executor(self._pool, self.logits_fn, np.stack([a for a, _ in batch]))
            except Exception as e:  # the model failed: every waiting request gets the error, the loop goes on
                log.exception("model call failed on a batch of %d", len(batch))
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.images += len(batch)
            for (_, f), row in zip(batch, out):
                if not f.done():
                    f.set_result(row)


class Ticket:
    """One announced request: its images go to the batcher through `logits`, or it withdraws."""

    def __init__(self, batcher: MicroBatcher):
        self.batcher, self.open = batcher, True

    def close(self) -> None:
        if self.open:
            self.open = False
            self.batcher._incoming -= 1
            if self.batcher._arrived is not None:
                self.batcher._arrived.set()  # the batcher re-checks whether anyone is still coming

    async def logits(self, arrays: list[np.ndarray]) -> np.ndarray:
        self.close()
        return await self.batcher.logits(arrays)
