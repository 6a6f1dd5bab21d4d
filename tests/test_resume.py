"""Exact resume: a training process SIGKILLed mid-epoch and resumed with `--resume` ends with
bitwise the same weights, optimizer state and metrics as an uninterrupted run."""

import json
import os
import subprocess
import sys

import torch
from _data_files import write_noisy_rgb_folder as write_class_folder
from safetensors.torch import load_file

from imgarena.checkpoint import read_metadata


def _start(args, env_extra=None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", IMGARENA_PROGRESS="0", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "imgarena", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _train(args, env_extra=None) -> subprocess.CompletedProcess:
    return _finish(_start(args, env_extra))


def test_kill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=20, size=12)
    # Every source of randomness on: dropout (mlp), augmentation, mixup, EMA, accumulation.
    common = [str(data), "--model", "mlp", "--epochs", "3", "--batch-size", "4", "--accum-steps", "2",
              "--augment", "standard", "--mixup", "0.4", "--ema", "--ema-decay", "0.9", "--label-smoothing", "0.1",
              "--state-every", "2", "--deterministic", "--out-dir", str(tmp_path / "runs"), "--workers", "1"]
    # The uninterrupted run and the one to be killed are independent processes (one thread each): at once.
    # 54 training images / 4 = 13 batches = 7 optimizer steps per epoch. Step 11 is inside epoch 2,
    # one step after the state saved at step 10: the resumed run redoes step 11 and goes on.
    procs = _start(common + ["--name", "full"]), _start(common + ["--name", "cut"], {"IMGARENA_TEST_KILL_AT_STEP": "11"})
    full, killed = (_finish(p) for p in procs)
    assert full.returncode == 0, full.stderr
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no cleanup ran
    cut = tmp_path / "runs" / "cut"
    assert not (cut / "summary.json").exists()
    state = torch.load(cut / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["meter"]["batches"] > 0  # saved mid-epoch 2
    assert read_metadata(cut / "last.safetensors")["epoch"] == 1  # last checkpoint intact

    resumed = _train(["--resume", str(cut)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    a_dir, b_dir = tmp_path / "runs" / "full", cut
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sa, sb = (torch.load(d / "state.pt", weights_only=True) for d in (a_dir, b_dir))
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    exp_avg = lambda s: [v["exp_avg"] for v in s["optimizer"]["state"].values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(exp_avg(sa), exp_avg(sb)))
    rows = [[json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)]
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    assert json.loads((b_dir / "summary.json").read_text())["best_val_acc"] == \
        json.loads((a_dir / "summary.json").read_text())["best_val_acc"]
