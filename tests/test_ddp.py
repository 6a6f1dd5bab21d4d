"""DistributedDataParallel on CPU: `torchrun --nproc_per_node=2 -m imgarena train` over gloo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from imgarena.checkpoint import load_model
from imgarena.config import DataConfig, TrainConfig
from imgarena.engine.train import run_training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run(tmp_path):
    args = ["sample", "--model", "mlp", "--epochs", "3", "--batch-size", "64", "--optimizer", "adam",
            "--augment", "none", "--out-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", IMGARENA_PROGRESS="0")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "imgarena", "train"]
    proc = subprocess.run(torchrun + args + ["--name", "ddp"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    # only rank 0 wrote: one row per epoch, one summary line printed
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert proc.stdout.count("best val acc") == 2  # engine line + CLI line, both from rank 0 only

    # the checkpoint loads in a single process and scores what the run reported
    model, meta = load_model(run)
    assert meta["num_classes"] == 10 and sum(p.numel() for p in model.parameters()) == summary["params"]

    single = run_training(TrainConfig(data=DataConfig(source="sample"), model="mlp", epochs=3, batch_size=64,
                                      optimizer="adam", augment="none", out_dir=str(tmp_path), name="single"),
                          progress=False)
    # Same global batch and lr; different per-rank dropout streams, so close but not identical.
    assert abs(summary["best_val_acc"] - single["best_val_acc"]) < 0.08
    assert abs(summary["test_acc"] - single["test_acc"]) < 0.08
    assert Path(run / "best.safetensors").is_file() and not list(run.glob("*.tmp"))
