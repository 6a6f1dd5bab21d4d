"""Training-engine reliability: every val image scored once under torchrun, one clock for all ranks,
exact gradient accumulation, schedule resume, divergence stops, one owner per run folder, device
checks, and a time budget that counts training steps only."""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _data_files import write_noisy_rgb_folder
from torch import nn

from imgarena.checkpoint import load_model
from imgarena.config import DataConfig, TrainConfig
from imgarena.data.loader import BatchLoader
from imgarena.data.prepare import Split
from imgarena.engine.distributed import resolve_device
from imgarena.engine.evaluate import evaluate, metrics_from_sums
from imgarena.engine.loop import EpochMeter, StepSettings, TrainingDiverged, train_one_epoch
from imgarena.engine.optim import Schedule
from imgarena.engine.train import run_training
from imgarena.errors import UserError

def _env():  # at call time: conftest points IMGARENA_CACHE at the session's cache
    return dict(os.environ, OMP_NUM_THREADS="1", IMGARENA_PROGRESS="0")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_noisy_rgb_folder(tmp_path_factory.mktemp("imgs") / "data", per_class=14, size=12)


def _cfg(folder, out, **kw):
    base = dict(data=DataConfig(source=str(folder), workers=1), model="mlp", epochs=1, batch_size=8,
                optimizer="sgd", lr=0.05, augment="none", out_dir=str(out), name="run", eval_batch_size=64)
    base.update(kw)
    return TrainConfig(**base)


def _cli(*args, background: bool = False):
    cmd = [sys.executable, "-m", "imgarena", *args]
    if background:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


def _finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # warnings about the data (e.g. the sample's near-duplicates across train and test) may come first
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("imgarena: warning:")]
    assert len(lines) == 1 and lines[0].startswith("imgarena: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _wait_for(pred, what, timeout=120.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


# ---------------------------------------------------------------------- 1. val sharding

def _index_split(n):
    # Image i has every pixel = i, so a batch tells which samples it holds.
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(2, 2).repeat(2, 3)
    return Split(images, np.arange(n, dtype=np.int64) % 3, [f"x/{i}" for i in range(n)])


@pytest.mark.parametrize("shuffle", [False, True])
def test_unpadded_shards_cover_every_image_exactly_once(shuffle):
    for n in range(0, 24):
        split = _index_split(n)
        for world in range(1, 6):
            for batch in (1, 3, 8):
                seen = []
                for rank in range(world):
                    loader = BatchLoader(split, batch, shuffle=shuffle, seed=3, mean=(0.0,), std=(1 / 255,),
                                         rank=rank, world_size=world, pad=False, prefetch=1)
                    loader.set_epoch(2)
                    batches = [x[:, 0, 0, 0].round().long().tolist() for x, _ in loader]
                    assert len(batches) == len(loader)
                    assert sum(map(len, batches)) == loader.samples_per_rank
                    seen += [i for b in batches for i in b]
                assert sorted(seen) == list(range(n)), (n, world, batch)


def test_two_rank_run_scores_each_val_image_once_on_one_clock(tmp_path):
    """A real 2-process gloo run with 9 val images (not a multiple of 2) and a time budget.

    (1) Its all-reduced val metrics equal a single process scoring the whole val split with the saved
    weights: every image counted once (padding used to score image 0 twice and drop image 7).
    (2) Each rank scored its shard with its own replica; re-scoring those shards with rank 0's saved
    weights gives bitwise the same sums. With only --time-budget the lr anneals by time, so that
    holds only when both ranks set the same lr at every step -- from rank 0's clock. (Each rank's own
    clock ran ahead on rank 1, which waits for rank 0's start-up writes inside its first step.)
    """
    data_dir = write_noisy_rgb_folder(tmp_path / "data", per_class=60, size=8)
    args = [str(data_dir), "--model", "mlp", "--val-fraction", "0.05", "--batch-size", "8", "--optimizer", "adam",
            "--lr", "3e-3", "--augment", "none", "--time-budget", "2s", "--eval-batch-size", "64",
            "--state-every", "0", "--workers", "1", "--out-dir", str(tmp_path / "runs"), "--name", "ddp"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={port}", "-m", "imgarena", "train"]
    proc = subprocess.run(torchrun + args, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["stop_reason"] == "time_budget"
    last = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()][-1]

    from imgarena.data import load_data

    model, meta = load_model(run, which="last")
    pre = meta["preprocessing"]
    data = load_data(DataConfig(source=str(data_dir), val_fraction=0.05, workers=1, img_size=pre["img_size"],
                                channels=pre["channels"]), progress=False)
    assert len(data.val) == summary["val_images"] == 9

    def score(**shard):
        loader = BatchLoader(data.val, 64, shuffle=False, mean=pre["mean"], std=pre["std"], pad=False, **shard)
        return evaluate(model, loader, num_classes=3, device="cpu")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: same kernels, same bits
    try:
        whole = score()
        shards = [score(rank=r, world_size=2)["sums"] for r in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert whole["count"] == 9
    assert last["val_acc"] == whole["acc"] and last["val_loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert [s["count"] for s in shards] == [5.0, 4.0]
    merged = metrics_from_sums({k: shards[0][k] + shards[1][k] for k in shards[0]}, 3)
    assert last["val_loss"] == merged["loss"] and last["val_acc"] == merged["acc"]


# ---------------------------------------------------------------------- 3. accumulation

def test_last_short_accumulation_group_is_the_mean_over_its_own_micro_batches():
    torch.manual_seed(0)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(4)]
    model = nn.Linear(4, 3)
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # w_new = w - grad: the step shows the gradient
    schedule = Schedule(opt, "constant", steps_per_epoch=2, epochs=1)
    after = []

    def on_step(step, meter):
        after.append(copy.deepcopy(model))
        return False

    out = train_one_epoch(model, batches, opt, schedule, StepSettings(device=torch.device("cpu"), num_classes=3,
                                                                      accum_steps=3),
                          epoch=0, meter=EpochMeter(), global_step=0, on_step=on_step)
    assert out["global_step"] == 2 and len(after) == 2  # groups of 3 and 1 micro-batches

    def sgd_step(m, group):
        m = copy.deepcopy(m)
        loss = sum(F.cross_entropy(m(x), y) for x, y in group) / len(group)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        with torch.no_grad():
            for p, g in zip(m.parameters(), grads):
                p -= g
        return m

    for got, want in ((after[0], sgd_step(start, batches[:3])), (after[1], sgd_step(after[0], batches[3:]))):
        for p, q in zip(got.parameters(), want.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- 4. schedule resume

def _lrs(s, steps):
    return [s.apply(i) for i in range(steps)]


def test_schedule_resume_restores_the_saved_plan():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    a = Schedule(opt, "cosine", steps_per_epoch=10, epochs=5, warmup_epochs=1)
    want = _lrs(a, 50)
    # The loader came out one batch shorter this time (e.g. another number of ranks): the run's own
    # plan still holds, so the lr curve is the same step for step.
    b = Schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), "cosine", steps_per_epoch=9, epochs=5,
                 warmup_epochs=1)
    assert b.load_state_dict(a.state_dict()) == []
    assert (b.total, b.warmup, b.steps_per_epoch) == (50, 10, 10)
    assert _lrs(b, 50) == want


def test_schedule_resume_with_more_epochs_stretches_the_anneal():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    a = Schedule(opt, "onecycle", steps_per_epoch=10, epochs=5)  # warmup: 30% of 50 steps
    assert a.apply(50) == 0  # the finished run's lr
    b = Schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), "onecycle", steps_per_epoch=10,
                 epochs=10)
    changes = b.load_state_dict(a.state_dict())
    assert any("5 to 10 epochs" in c for c in changes)
    assert (b.total, b.warmup) == (100, 15)  # warmup as run, not moved to 30% of the new length
    assert b.apply(50) > 0.5 and b.apply(99) < 1e-3  # the extra epochs train, annealing to the new end
    # an explicit --lr with --resume is used (and reported), not silently replaced by the saved one
    c = Schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5), "onecycle", steps_per_epoch=10, epochs=5)
    assert any("peak lr" in x for x in c.load_state_dict(a.state_dict()))
    assert c.apply(20) == pytest.approx(0.5 * a.apply(20))


def test_resume_with_larger_epochs_trains_on(folder, tmp_path):
    first = run_training(_cfg(folder, tmp_path, epochs=2, optimizer="adam", lr=3e-3), progress=False)
    with pytest.raises(UserError, match="already finished"):
        run_training(_cfg(folder, tmp_path, epochs=2, optimizer="adam", lr=3e-3, resume=True), progress=False)
    more = run_training(_cfg(folder, tmp_path, epochs=4, optimizer="adam", lr=3e-3, resume=True), progress=False)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and more["epochs_completed"] == 4
    # the first run annealed to 0; the resumed one re-planned over 4 epochs and anneals to the new end
    assert rows[1]["lr"] == 0 and rows[2]["lr"] > 0 and rows[3]["lr"] == pytest.approx(0, abs=1e-12)
    assert more["train_time_s"] > first["train_time_s"]


# ---------------------------------------------------------------------- 5. divergence

def test_divergence_is_a_one_line_error_and_saves_nothing(tmp_path):
    # ~12 steps of plain SGD at lr 1e9: the weights are NaN long before the epoch ends
    proc = _cli("train", "sample", "--model", "mlp", "--subset", "200", "--img-size", "16", "--epochs", "1",
                "--batch-size", "16", "--optimizer", "sgd", "--lr", "1e9", "--out-dir", str(tmp_path), "--name", "nan")
    _one_error_line(proc, "diverged", "--lr", "--clip-grad", "--amp", str(tmp_path / "nan"))
    run = tmp_path / "nan"
    assert not (run / "summary.json").exists() and not (run / ".lock").exists()
    assert not (run / "best.safetensors").exists() and not (run / "state.pt").exists()


def test_divergence_after_a_good_epoch_keeps_its_files_bitwise(folder, tmp_path):
    run_training(_cfg(folder, tmp_path, epochs=1, state_every=1), progress=False)
    run = tmp_path / "run"
    kept = {f: (run / f).read_bytes() for f in ("best.safetensors", "last.safetensors", "metrics.jsonl")}
    # Train on with an lr ~1e10 times too high: the weights go NaN within the epoch, and state_every=1
    # saves state.pt after every step of it.
    with pytest.raises(TrainingDiverged, match="diverged.*--lr.*epoch 1") as err:
        run_training(_cfg(folder, tmp_path, epochs=2, lr=1e9, state_every=1, resume=True), progress=False)
    assert isinstance(err.value, UserError)
    assert {f: (run / f).read_bytes() for f in kept} == kept
    state = torch.load(run / "state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())  # no NaN weights saved
    assert not (run / ".lock").exists()  # released on the error path too


# ---------------------------------------------------------------------- 6. one owner per run folder

def test_a_run_folder_has_one_owner(folder, tmp_path):
    epochs = 3
    common = ["train", str(folder), "--model", "mlp", "--epochs", str(epochs), "--batch-size", "8", "--augment",
              "none", "--workers", "1", "--out-dir", str(tmp_path), "--name", "same"]
    run = tmp_path / "same"
    a = _cli(*common, background=True)
    try:
        # config.yaml is written after the lock is taken: A owns the folder from here on. Freeze it
        # there (a real signal) so the overlap does not depend on timing.
        _wait_for(lambda: (run / "config.yaml").exists() or a.poll() is not None, "the first run to start")
        os.kill(a.pid, signal.SIGSTOP)
        assert a.poll() is None, a.communicate()[1]
        # a second train and a resume of the same folder, both while A holds it (at once: A is frozen)
        b, c = _cli(*common, background=True), _cli("train", "--resume", str(run), background=True)
        b, c = (_finished(p) for p in (b, c))
        _one_error_line(b, str(run), f"pid {a.pid}", "another imgarena process")
        _one_error_line(c, "cannot resume", f"pid {a.pid}")
        os.kill(a.pid, signal.SIGCONT)
        out, err = a.communicate(timeout=240)
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGKILL)
            a.wait()
    assert a.returncode == 0, err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == epochs  # A's run alone, complete
    assert not (run / ".lock").exists()


def test_a_run_killed_with_sigkill_can_be_resumed(folder, tmp_path):
    run = tmp_path / "k"
    a = _cli("train", str(folder), "--model", "mlp", "--epochs", "1000", "--batch-size", "8", "--augment", "none",
             "--state-every", "1", "--workers", "1", "--out-dir", str(tmp_path), "--name", "k", background=True)
    try:
        _wait_for(lambda: (run / "state.pt").exists() or a.poll() is not None, "the first state save")
    finally:
        os.kill(a.pid, signal.SIGKILL)  # kill -9: no cleanup runs, the lock file stays behind
        a.communicate()
    assert a.returncode == -9 and (run / ".lock").exists()
    resumed = _cli("train", "--resume", str(run), "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "summary.json").exists() and not (run / ".lock").exists()


# ---------------------------------------------------------------------- 7. devices

@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="has a cuda:3")
def test_missing_devices_are_one_clear_line(folder, tmp_path):
    for name in ("cuda:3", "mps", "tpu", "cuda:x"):
        if name == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(UserError, match=r"--device .*available here: cpu"):
            resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    proc = _cli("train", str(folder), "--model", "mlp", "--device", "cuda:3", "--out-dir", str(tmp_path))
    _one_error_line(proc, "--device cuda:3", "available here: cpu")


# ---------------------------------------------------------------------- 8. time budget

def test_time_budget_counts_training_steps_only(tmp_path):
    # 30 training images and 90 val images scored one by one: most wall time goes to evaluation.
    data = write_noisy_rgb_folder(tmp_path / "data", per_class=40, size=8)
    budget = 0.3
    s = run_training(TrainConfig(data=DataConfig(source=str(data), val_fraction=0.75, workers=1), model="mlp",
                                 epochs=100_000, batch_size=8, optimizer="adam", augment="none", eval_batch_size=1,
                                 time_budget=budget, state_every=0, out_dir=str(tmp_path), name="b"),
                     progress=False)
    assert s["stop_reason"] == "time_budget"
    # It stopped because the training seconds reached the budget (evaluation and checkpoint writes
    # in between did not use it up), and the wall time, which includes them, is larger.
    assert s["train_time_s"] >= budget
    assert s["wall_time_s"] > s["train_time_s"]
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_time"] == s["train_time_s"]
    assert all(r["wall_time"] > r["train_time"] for r in rows)
