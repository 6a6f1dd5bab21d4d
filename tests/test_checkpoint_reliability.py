"""Checkpoints and model building under stress: metadata that disagrees with its weights, an ONNX
sidecar that disagrees with its model, a missing best checkpoint, umask-respecting permissions, a
full disk, a model too big for the machine, and user errors told apart from real bugs."""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import resource
import shutil
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgarena
from imgarena.checkpoint import (atomic_torch_save, atomic_write_text, current_umask, load_model,
                                 resolve_checkpoint, save_checkpoint)
from imgarena.errors import UserError
from imgarena.models import _registry, create_model, get_entry, list_models
from imgarena.models.flops import count_params
from imgarena.models.memory import count_params_on_meta

SRC = Path(imgarena.__file__).parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 1-epoch run: mlp on the embedded sample, 16 px, 200 images."""
    root = tmp_path_factory.mktemp("run")
    summary = imgarena.train("sample", "mlp", progress=False, epochs=1, img_size=16, subset=200,
                             out_dir=str(root), name="r", cache_dir=str(root / "cache"))
    return Path(summary["run_dir"])


def _copy_run(run, dst) -> Path:
    dst = Path(dst)
    dst.mkdir(parents=True)
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json"):
        shutil.copy2(run / name, dst / name)
    return dst


def _edit_header_meta(path: Path, edit) -> None:
    """Rewrite the imgarena metadata inside a safetensors header (8-byte length, JSON header, data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["imgarena"])
    edit(meta)
    header["__metadata__"]["imgarena"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


# ---------------------------------------------------------------- 1. model_kwargs per instance

def test_model_kwargs_are_per_instance():
    a = create_model("mlp", num_classes=3, in_chans=1, img_size=8)
    b = create_model("mlp", num_classes=3, in_chans=1, img_size=12, hidden=(5,))
    assert a.model_kwargs == {"hidden": (200,), "img_size": 8} and b.model_kwargs["hidden"] == (5,)
    a.model_kwargs["depth"] = 7
    assert "depth" not in b.model_kwargs
    # Built without create_model: each still gets its own (empty) dict, not one shared class attribute.
    cls = type(a)
    c, d = cls(num_classes=2), cls(num_classes=2)
    c.model_kwargs["x"] = 1
    assert d.model_kwargs == {} and c.model_kwargs is not d.model_kwargs


# ---------------------------------------------------------------- 2. user errors vs bugs

def test_unknown_option_is_named_with_the_valid_ones():
    with pytest.raises(UserError) as e:
        create_model("mlp", num_classes=3, hiden=(3,))
    msg = str(e.value)
    assert "unknown option hiden" in msg and "did you mean hidden" in msg and "drop_rate, hidden, img_size" in msg
    with pytest.raises(UserError, match=r"model 'timm/resnet18': unknown option bogus"):
        create_model("timm/resnet18", num_classes=3, bogus=1)


def test_architecture_checks_are_user_errors_naming_the_model():
    with pytest.raises(UserError, match=r"model 'vit_t4': image size \(30, 30\) is not divisible by patch size.*"
                                        r"multiple of 4"):
        create_model("vit_t4", num_classes=3, img_size=30)
    with pytest.raises(UserError, match=r"model 'vit_t4': embed_dim 100 must be divisible by num_heads 3"):
        create_model("vit_t4", num_classes=3, embed_dim=100, num_heads=3)
    with pytest.raises(UserError, match="in_chans must be a whole number"):
        create_model("mlp", in_chans=0)
    # A value of the wrong type from the user: a UserError that keeps the real error as its cause.
    with pytest.raises(UserError, match=r"rejected the options hidden='wide'") as e:
        create_model("mlp", num_classes=3, hidden="wide")
    assert isinstance(e.value.__cause__, TypeError)


def test_a_bug_in_a_builder_propagates_untouched(monkeypatch):
    def buggy_builder(num_classes=1000, in_chans=3, img_size=8):
        return {}["no such key"] if img_size == 9 else int("not a number")

    monkeypatch.setitem(_registry._REGISTRY, "buggy", _registry.ModelEntry("buggy", "test", buggy_builder, {}))
    with pytest.raises(ValueError) as e:
        create_model("buggy")
    assert type(e.value) is ValueError and "invalid literal" in str(e.value)  # not dressed up as a UserError
    assert any(f.name == "buggy_builder" for f in traceback.extract_tb(e.value.__traceback__))
    with pytest.raises(KeyError):
        create_model("buggy", img_size=9)


# ---------------------------------------------------------------- 3. too big for the machine

def _limited(cmd, gib=4, timeout=120):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC.parent))
    return subprocess.run([sys.executable, *cmd], preexec_fn=limit, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_a_model_too_big_is_refused_before_allocating():
    # 1 x 4096 x 4096 inputs x 200 hidden units: 3.4B parameters, 13 GB of weights, under a 4 GB address space.
    r = _limited(["-m", "imgarena", "models", "summary", "mlp", "--img-size", "4096", "--in-chans", "1"])
    assert r.returncode == 2, r.stderr
    assert "imgarena: error: mlp at 4096 px needs 3.4B parameters (13 GB of weights, ~54 GB to train" in r.stderr
    assert "available: use a smaller --img-size" in r.stderr
    assert "MemoryError" not in r.stderr and "Traceback" not in r.stderr


def test_training_footprint_checked_on_the_training_device_without_dynamo():
    script = r"""
import sys
from imgarena.errors import UserError
from imgarena.models import create_model
from imgarena.models._registry import check_model_fits
for call in (lambda: create_model("mlp", num_classes=10, in_chans=1, img_size=1024, train_device="cpu"),
             lambda: check_model_fits("mlp", img_size=1024, train_device="cpu")):
    try:
        call(); print("BUILT")
    except UserError as e:
        print("REFUSED", e)
m = create_model("mlp", num_classes=10, in_chans=1, img_size=1024)  # 0.8 GB of weights: fits for inference
print("INFER-OK", sum(p.numel() for p in m.parameters()))
create_model("resnet18_cifar", num_classes=10)  # normal_/trunc_normal_ init, skipped on meta
print("DYNAMO", "torch._dynamo" in sys.modules)
"""
    r = _limited(["-c", script])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    refused = [ln for ln in lines if ln.startswith("REFUSED")]
    assert len(refused) == 2, r.stdout
    assert all("mlp at 1024 px needs 209.7M parameters (~3.4 GB to train with AdamW" in ln for ln in refused)
    assert all("ulimit -v" in ln for ln in refused)
    assert "INFER-OK 209717410" in lines
    assert "DYNAMO False" in lines  # the meta count must not pull torch._dynamo in (seconds of start-up)


@pytest.mark.parametrize("family", sorted({get_entry(n).family for n in list_models()}))
def test_meta_count_matches_the_real_model(family):
    name = min(list_models(family=family), key=lambda n: count_params_on_meta(
        lambda: get_entry(n).builder(**{**get_entry(n).kwargs, "num_classes": 10})))
    entry = get_entry(name)
    kw = {**entry.kwargs, "num_classes": 10}
    assert count_params_on_meta(lambda: entry.builder(**kw)) == count_params(create_model(name, num_classes=10))


# ---------------------------------------------------------------- 4. metadata vs weights

@pytest.mark.parametrize("edit, expect", [
    (lambda m: m.update(num_classes=7, class_names=m["class_names"][:7]),
     r"head\.weight is \(10, 200\) in the file but \(7, 200\) for that model"),
    (lambda m: m["class_names"].append("extra"), r"lists 11 class names but num_classes is 10"),
    (lambda m: m["model"]["kwargs"].update(hidden=[100]), r"body\.1\.weight is \(200, 256\) in the file but \(100, 256\)"),
    (lambda m: m["preprocessing"].update(channels=3), r"body\.1\.weight is \(200, 256\) in the file but \(200, 768\)"),
    (lambda m: m["model"].update(name="mlp_deep", kwargs={"img_size": 16}), r"missing body\.4\.bias, body\.4\.weight"),
    (lambda m: m["model"]["kwargs"].update(depth=2), r"cannot be built .*unknown option depth"),
    (lambda m: m.pop("model"), r"its metadata lacks or garbles 'model'"),
])
def test_metadata_that_disagrees_with_the_weights_is_named(run, tmp_path, edit, expect):
    bad = _copy_run(run, tmp_path / "r")
    _edit_header_meta(bad / "best.safetensors", edit)
    with pytest.raises(UserError, match=expect) as e:
        load_model(bad)
    assert str(bad / "best.safetensors") in str(e.value) and "\n" not in str(e.value)
    model, meta = load_model(run)  # the original still loads
    assert meta["num_classes"] == 10 and model(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


def test_edited_json_copy_is_reported_not_used(run, tmp_path, caplog):
    r = _copy_run(run, tmp_path / "r")
    side = json.loads((r / "best.json").read_text())
    side["num_classes"] = 3
    (r / "best.json").write_text(json.dumps(side))
    with caplog.at_level(logging.WARNING, logger="imgarena.checkpoint"):
        _, meta = load_model(r)
    assert meta["num_classes"] == 10
    assert "best.json differs from the metadata stored inside best.safetensors (num_classes)" in caplog.text


# ---------------------------------------------------------------- 5. ONNX sidecar vs model

@pytest.fixture(scope="module")
def onnx_export(run, tmp_path_factory):
    from imgarena.config import ExportConfig
    from imgarena.export import run_export

    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    res = run_export(ExportConfig(checkpoint=str(run), format="onnx", out=str(out), dynamic_batch=True))
    assert res.parity.ok
    img = out.parent / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8), "L").save(img)
    return out, img


@pytest.mark.parametrize("edit, expect", [
    (lambda m: m["class_names"].append("extra"), r"class names: 11, but the model outputs 10 logits"),
    (lambda m: m.update(num_classes=9, class_names=m["class_names"][:9]), r"num_classes: 9, but the model outputs 10"),
    (lambda m: m["preprocessing"].update(img_size=32), r"img_size 32 but the model's input is 16x16"),
    (lambda m: m["preprocessing"].update(channels=3, mean=[0.5] * 3, std=[0.5] * 3), r"channels 3 but the model's input has 1"),
    (lambda m: m["preprocessing"].update(mean=[0.5, 0.5]), r"mean has 2 values for 1 channels"),
])
def test_onnx_sidecar_that_disagrees_with_its_model_is_named(onnx_export, tmp_path, edit, expect):
    from imgarena.config import PredictConfig
    from imgarena.predict import run_predict

    onnx, img = onnx_export
    dst = tmp_path / "m.onnx"
    shutil.copy(onnx, dst)
    meta = json.loads(Path(str(onnx) + ".json").read_text())
    rows = run_predict(PredictConfig(checkpoint=str(onnx), inputs=[str(img)]))
    assert rows[0].error is None and len(rows[0].topk) == 3  # the untouched pair works
    edit(meta)
    Path(str(dst) + ".json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=expect) as e:
        run_predict(PredictConfig(checkpoint=str(dst), inputs=[str(img)]))
    assert str(e.value).startswith(f"{dst}.json does not match m.onnx: ")


# ---------------------------------------------------------------- 6. best vs last

def test_missing_best_falls_back_with_a_warning_unless_asked_for(run, tmp_path, caplog):
    r = _copy_run(run, tmp_path / "r")
    (r / "best.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="imgarena.checkpoint"):
        assert resolve_checkpoint(r) == r / "last.safetensors"
        _, meta = load_model(r)
    assert f"{r} has no best.safetensors; using {r / 'last.safetensors'}" in caplog.text
    with pytest.raises(UserError, match=rf"{r / 'best.safetensors'} not found; it has last.safetensors: "
                                        r"pass --which last"):
        load_model(r, which="best")
    assert load_model(r, which="last")[1]["epoch"] == meta["epoch"]
    (r / "last.safetensors").unlink()
    with pytest.raises(UserError, match=r"holds no checkpoint"):
        resolve_checkpoint(r)


def test_missing_best_warning_is_visible_without_logging_setup(run, tmp_path):
    """Nothing configures logging in a plain process: Python's last-resort handler still prints
    warnings to stderr, so the fallback is never silent."""
    r = _copy_run(run, tmp_path / "r")
    (r / "best.safetensors").unlink()
    code = f"from imgarena.checkpoint import load_model; load_model({str(r)!r}); print('loaded')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(SRC.parent)), timeout=120)
    assert p.returncode == 0 and "loaded" in p.stdout, p.stderr
    assert f"{r} has no best.safetensors; using {r / 'last.safetensors'}" in p.stderr


# ---------------------------------------------------------------- 7. permissions

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    m = create_model("mlp", num_classes=2, in_chans=1, img_size=4)
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        save_checkpoint(tmp_path / "best.safetensors", m, {"model": {"name": "mlp", "kwargs": m.model_kwargs},
                                                          "num_classes": 2, "preprocessing": {"channels": 1}})
        atomic_torch_save({"x": torch.zeros(3)}, tmp_path / "state.pt")
        atomic_write_text(tmp_path / "summary.json", "{}\n")
    finally:
        os.umask(old)
    for name in ("best.safetensors", "best.json", "state.pt", "summary.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# ---------------------------------------------------------------- 8. disk full

@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KiB filesystem (tmpfs, needs root); else a folder where writes past 256 KiB fail with ENOSPC."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                              capture_output=True).returncode == 0
    # imgarena's tests run as root (CI and `make test` install Debian packages): a mount that fails is
    # a broken environment, not a reason to skip the real-filesystem check
    assert ok, "cannot mount a size-limited tmpfs: run the tests as root"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _writers(m_small, m_big):
    meta = {"model": {"name": "mlp", "kwargs": {}}, "num_classes": 2, "preprocessing": {"channels": 1}}
    return {
        "checkpoint": ("best.safetensors", lambda p, big: save_checkpoint(p, m_big if big else m_small, meta)),
        "state": ("state.pt", lambda p, big: atomic_torch_save({"w": torch.ones(100_000 if big else 10)}, p)),
        "json": ("summary.json", lambda p, big: atomic_write_text(p, "x" * (400_000 if big else 10))),
    }


@pytest.mark.parametrize("kind", ["checkpoint", "state", "json"])
def test_disk_full_keeps_the_previous_file(small_fs, kind):
    small = create_model("mlp", num_classes=2, in_chans=1, img_size=2)
    big = create_model("mlp", num_classes=2, in_chans=1, img_size=32)  # 820 KB of weights
    name, write = _writers(small, big)[kind]
    path = small_fs / name
    write(path, False)
    before = {p.name: p.read_bytes() for p in small_fs.iterdir()}
    with pytest.raises(UserError) as e:
        write(path, True)
    msg = str(e.value)
    assert msg.startswith(f"disk full at {path}: ") and "MB needed (free: " in msg and "--out-dir" in msg
    assert {p.name: p.read_bytes() for p in small_fs.iterdir()} == before  # bitwise intact, no temp files left


def test_disk_full_inside_a_writer_that_hides_errno(tmp_path, monkeypatch):
    """torch.save to a path reports only 'unexpected pos'; a custom writer may too: the chain still tells."""
    from imgarena.checkpoint import atomic_write

    (tmp_path / "f").write_text("old")

    def write(tmp):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(UserError, match="disk full at"):
        atomic_write(tmp_path / "f", write)
    assert (tmp_path / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# ---------------------------------------------------------------- 10. nothing is unpickled

def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((path.relative_to(SRC).as_posix(), node.lineno, safe))
    assert calls and all(safe for *_, safe in calls), calls
