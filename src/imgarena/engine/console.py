"""What training prints: a tqdm bar per epoch on a terminal (loss, acc, img/s, ETA), one plain line
per epoch otherwise (logs, CI, pipes). `IMGARENA_PROGRESS=0` turns bars off; `progress=False`
(library use, non-zero ranks) prints nothing."""

from __future__ import annotations

import os
import sys


def bars_wanted(progress: bool) -> bool:
    return progress and os.environ.get("IMGARENA_PROGRESS", "1") != "0" and sys.stderr.isatty()


class Console:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars = bars_wanted(enabled)
        self._bar = None

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def start_epoch(self, epoch: int, epochs: int | None, total: int, done: int = 0) -> None:
        if not self.bars:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, desc=_epoch_label(epoch, epochs), unit="batch",
                         leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, steps: int, loss: float, acc: float, img_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f} acc {acc:.2%} {img_s:,.0f} img/s", refresh=False)
            self._bar.update(steps)

    def end_epoch(self, row: dict) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.info(epoch_line(row))


def epoch_line(row: dict) -> str:
    """'epoch 3/10  train loss 0.41 acc 85.2%  val loss 0.38 acc 86.9% top5 99.1%  lr 9.1e-04  1,234 img/s  12.3s'"""
    parts = [_epoch_label(row["epoch"], row.get("epochs")),
             f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}",
             f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}"
             + (f" top5 {row['val_top5']:.2%}" if row.get("val_top5") is not None else ""),
             f"lr {row['lr']:.2e}", f"{row['train_img_s']:,.0f} img/s", f"{row['epoch_time']:.1f}s"]
    if row.get("best"):
        parts.append("*best")
    return "  ".join(parts)


def _epoch_label(epoch: int, epochs: int | None) -> str:
    return f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}"
