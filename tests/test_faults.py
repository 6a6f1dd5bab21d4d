"""Fault corpus: every command on a table of bad inputs. Each case must end in ONE line naming the
file or option, exit code 2 and no traceback.

A core of cases runs `imgarena` as a real subprocess (all of them at once, since each start pays
for the torch import); the rest go through `imgarena.cli.main` in this process, where a subprocess
would add nothing. Fixtures are built once per module: a tiny image folder, a run trained with mlp
on the built-in sample (16 px, 200 images, 1 epoch), its ONNX export, and damaged copies of those.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _data_files import write_noisy_rgb_folder

from imgarena.cli import main

IMGARENA = [sys.executable, "-m", "imgarena"]
SUBPROCESS_TIMEOUT = 60  # a hang (e.g. opening a FIFO) fails the case instead of stalling the suite


def _yaml(path: Path, text) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Placeholder -> path, for the case tables below."""
    t = tmp_path_factory.mktemp("faults")
    cache = t / "cache"
    e = {"tmp": str(t), "cache": str(cache)}

    # a trained run, its ONNX export, and images to predict on
    runs = t / "runs"
    base = ["--cache-dir", str(cache), "--workers", "1"]
    assert main(["train", "sample", "--model", "mlp", "--img-size", "16", "--subset", "200", "--epochs", "1",
                 "--out-dir", str(runs), "--name", "r", "--device", "cpu", *base]) == 0
    run = runs / "r"
    assert main(["export", str(run), "--out", str(t / "onnx" / "mlp.onnx")]) == 0
    imgs = write_noisy_rgb_folder(t / "imgs", classes=("cat", "dog"), per_class=3, size=16)
    e.update(run=str(run), imgs=str(imgs), img=str(imgs / "cat" / "000.png"))

    # damaged copies
    bad_json = runs / "badjson"  # metadata inside best.safetensors describes another model than its weights
    shutil.copytree(run, bad_json)
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = bad_json / "best.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    doc = json.loads(meta["imgarena"])
    doc["model"]["kwargs"]["hidden"] = [64]
    save_file(tensors, str(path), metadata={**meta, "imgarena": json.dumps(doc)})
    e["run_badjson"] = str(bad_json)

    bad_state = runs / "badstate"  # state.pt cut short, as by a full disk
    shutil.copytree(run, bad_state)
    data = (bad_state / "state.pt").read_bytes()
    (bad_state / "state.pt").write_bytes(data[: len(data) // 2])
    e["run_badstate"] = str(bad_state)

    onnx_bad = t / "onnx_bad"  # a sidecar listing 3 classes beside a 10-class model
    onnx_bad.mkdir()
    shutil.copy(t / "onnx" / "mlp.onnx", onnx_bad / "mlp.onnx")
    side = json.loads((t / "onnx" / "mlp.onnx.json").read_text())
    side["class_names"] = side["class_names"][:3]
    side["num_classes"] = 3
    (onnx_bad / "mlp.onnx.json").write_text(json.dumps(side))
    e["onnx_bad"] = str(onnx_bad / "mlp.onnx")

    # bad inputs
    (t / "afile").write_text("a file where a folder belongs\n")
    e["afile"] = str(t / "afile")
    e["yaml_bs"] = _yaml(t / "bs.yaml", 'batch_size: "6x4"\n')
    e["yaml_lr"] = _yaml(t / "lr.yaml", "lr: fast\n")
    e["yaml_budget"] = _yaml(t / "budget.yaml", "time_budget: soon\n")
    e["yaml_data"] = _yaml(t / "data.yaml", "data: foo\n")
    e["yaml_kwargs"] = _yaml(t / "kwargs.yaml", "model_kwargs: 3\n")
    e["yaml_list"] = _yaml(t / "list.yaml", "batch_size: [64, 128]\n")
    e["yaml_bool"] = _yaml(t / "bool.yaml", 'ema: "yes"\n')
    e["yaml_unknown"] = _yaml(t / "unknown.yaml", "learning_rate: 0.1\n")
    e["yaml_seq"] = _yaml(t / "seq.yaml", "- lr\n- 0.1\n")
    e["yaml_syntax"] = _yaml(t / "syntax.yaml", "lr: [0.1, 0.2\n")
    e["binary"] = _yaml(t / "config.bin", bytes(range(256)) * 4)
    e["cmp_train"] = _yaml(t / "cmp_train.yaml", "models: [mlp]\ntrain: x\n")
    e["cmp_per_model"] = _yaml(t / "cmp_per.yaml", "models: [mlp]\nper_model:\n  mlp: 3\n")
    e["cmp_models"] = _yaml(t / "cmp_models.yaml", "models: ['']\n")

    fifo = t / "fifo_data"  # class dog's only "image" is a named pipe: opening it would block forever
    write_noisy_rgb_folder(fifo, classes=("cat",), per_class=4, size=16)
    (fifo / "dog").mkdir()
    os.mkfifo(fifo / "dog" / "only.png")
    e["fifo_data"] = str(fifo)
    os.mkfifo(t / "fifo.yaml")  # reading it would wait for a writer forever
    e["fifo_cfg"] = str(t / "fifo.yaml")
    (t / "header.csv").write_text("path,label\n")  # a header and no rows
    e["header_csv"] = str(t / "header.csv")
    onecls = t / "onecls"  # one class, and not one the model knows
    write_noisy_rgb_folder(onecls, classes=("zebra",), per_class=3, size=16)
    e["onecls"] = str(onecls)

    ro = t / "ro"  # a read-only file system (root ignores permission bits, not a read-only mount)
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True, text=True)
    e["ro"] = str(ro) if r.returncode == 0 else None
    yield e
    if e["ro"]:
        subprocess.run(["umount", str(ro)], check=False)


def _fill(argv, env) -> list[str]:
    assert not any("{ro}" in a for a in argv) or env["ro"] is not None, \
        "cannot mount a read-only tmpfs: run the tests as root (CI and `make test` do)"
    return [a.format(**env) for a in argv]


def _check(case_id, rc, out, err, words, env):
    text = out + err
    assert "Traceback" not in text, f"{case_id}: traceback\n{text[-3000:]}"
    assert rc == 2, f"{case_id}: exit {rc}\n{text[-3000:]}"
    lines = [ln for ln in err.splitlines() if ln.startswith("imgarena") and "error" in ln]
    assert len(lines) == 1, f"{case_id}: expected one error line\n{err}"
    for w in words:
        assert w.format(**{k: v for k, v in env.items() if v is not None}) in lines[0], \
            f"{case_id}: {w!r} not in {lines[0]!r}"


# ---------------------------------------------------------------- real subprocesses

TRAIN = ["--model", "mlp", "--epochs", "1", "--img-size", "16", "--subset", "50", "--out-dir", "{tmp}/runs_x",
         "--cache-dir", "{cache}", "--workers", "1"]

SUBPROCESS_CASES = {
    "yaml_string_for_int": (["train", "sample", "--config", "{yaml_bs}", *TRAIN], ["batch_size in", "bs.yaml", "6x4"]),
    "yaml_scalar_for_data": (["train", "sample", "--config", "{yaml_data}", *TRAIN], ["data in", "data.yaml"]),
    "binary_config": (["train", "--config", "{binary}"], ["config.bin", "UTF-8"]),
    "compare_train_scalar": (["compare", "sample", "--config", "{cmp_train}"], ["train in", "cmp_train.yaml"]),
    "lr_inf": (["train", "sample", "--lr", "inf", *TRAIN], ["--lr", "inf"]),
    "device_mps": (["train", "sample", "--device", "mps", *TRAIN], ["--device", "mps"]),
    "unknown_option": (["train", "sample", "--learning-rate", "0.1"], ["--learning-rate"]),
    "out_dir_is_file": (["train", "sample", *TRAIN, "--out-dir", "{afile}"], ["--out-dir", "{afile}"]),
    "data_get_read_only": (["data", "get", "sample", "--out", "{ro}/sample"], ["--out", "{ro}/sample", "read-only"]),
    "export_out_is_folder": (["export", "{run}", "--out", "{tmp}"], ["--out", "{tmp}", "folder"]),
    "predict_pattern_matches_nothing": (["predict", "{run}", "{tmp}/nomatch/*.png"], ["{tmp}/nomatch/*.png"]),
    "bench_json_is_folder": (["bench", "--models", "mlp", "--quick", "--json", "{tmp}"], ["--json", "{tmp}"]),
    "fifo_as_config": (["train", "sample", "--config", "{fifo_cfg}", *TRAIN], ["fifo.yaml", "not a regular file"]),
    "eval_one_unknown_class": (["eval", "{run}", "{onecls}", "--cache-dir", "{cache}"], ["{onecls}"]),
    "checkpoint_meta_vs_weights": (["predict", "{run_badjson}", "{img}"], ["best.safetensors"]),
    "onnx_sidecar_disagrees": (["predict", "{onnx_bad}", "{img}"], ["mlp.onnx"]),
    "corrupt_state_pt": (["train", "--resume", "{run_badstate}", "--epochs", "2"], ["state.pt"]),
    "csv_header_only": (["train", "{header_csv}", *TRAIN], ["header.csv"]),
}


# Faults that are not errors: the command succeeds (exit 0), says what it skipped, and does not hang.
TOLERATED_CASES = {
    "fifo_in_inspected_folder": (["data", "inspect", "{fifo_data}", "--workers", "1"], ["only.png"]),
}


@pytest.fixture(scope="module")
def subprocess_results(env):
    """case id -> (returncode, stdout, stderr), every case started at once."""
    child_env = {**os.environ, "IMGARENA_CACHE": env["cache"], "IMGARENA_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def run(item):
        case_id, (argv, _) = item
        if any("{ro}" in a for a in argv) and env["ro"] is None:
            return case_id, None
        argv = [a.format(**env) for a in argv]
        try:
            r = subprocess.run(IMGARENA + argv, capture_output=True, text=True, cwd=env["tmp"], env=child_env,
                               timeout=SUBPROCESS_TIMEOUT)
            return case_id, (r.returncode, r.stdout, r.stderr)
        except subprocess.TimeoutExpired:
            return case_id, (-1, "", f"imgarena error: TIMEOUT after {SUBPROCESS_TIMEOUT}s (hang)")

    with ThreadPoolExecutor(max_workers=max(2, min(6, os.cpu_count() or 2))) as pool:
        return dict(pool.map(run, [*SUBPROCESS_CASES.items(), *TOLERATED_CASES.items()]))


@pytest.mark.parametrize("case_id", list(SUBPROCESS_CASES))
def test_subprocess_fault(case_id, subprocess_results, env):
    result = subprocess_results[case_id]
    assert result is not None, "cannot mount a read-only tmpfs: run the tests as root (CI and `make test` do)"
    _check(case_id, *result, SUBPROCESS_CASES[case_id][1], env)


# ---------------------------------------------------------------- in-process

INPROCESS_CASES = {
    # YAML values of the wrong type or shape
    "yaml_bad_float": (["train", "sample", "--config", "{yaml_lr}", *TRAIN], ["lr in", "lr.yaml", "'fast'"]),
    "yaml_bad_duration": (["train", "sample", "--config", "{yaml_budget}", *TRAIN], ["time_budget in", "duration"]),
    "yaml_scalar_for_kwargs": (["train", "sample", "--config", "{yaml_kwargs}", *TRAIN], ["model_kwargs in", "kwargs.yaml"]),
    "yaml_list_for_int": (["train", "sample", "--config", "{yaml_list}", *TRAIN], ["batch_size in", "list.yaml"]),
    "yaml_string_for_bool": (["train", "sample", "--config", "{yaml_bool}", *TRAIN], ["ema in", "true or false"]),
    "yaml_unknown_key": (["train", "sample", "--config", "{yaml_unknown}", *TRAIN], ["learning_rate", "unknown.yaml"]),
    "yaml_not_a_mapping": (["train", "sample", "--config", "{yaml_seq}", *TRAIN], ["seq.yaml", "mapping"]),
    "yaml_syntax": (["train", "sample", "--config", "{yaml_syntax}", *TRAIN], ["syntax.yaml", "YAML"]),
    "config_is_folder": (["train", "sample", "--config", "{tmp}", *TRAIN], ["{tmp}", "folder"]),
    "config_missing": (["train", "sample", "--config", "{tmp}/nope.yaml", *TRAIN], ["nope.yaml", "not found"]),
    "compare_per_model_scalar": (["compare", "sample", "--config", "{cmp_per_model}"], ["per_model.mlp in", "cmp_per.yaml"]),
    "compare_empty_model_name": (["compare", "sample", "--config", "{cmp_models}"], ["models in", "cmp_models.yaml"]),
    "compare_bad_duration": (["compare", "sample", "--models", "mlp", "--time-budget", "soon"], ["soon"]),
    # option values
    "device_unknown": (["train", "sample", "--device", "gpu", *TRAIN], ["--device", "'gpu'"]),
    "batch_size_zero": (["train", "sample", *TRAIN, "--batch-size", "0"], ["--batch-size", ">= 1"]),
    "img_size_tiny": (["train", "sample", *TRAIN, "--img-size", "4"], ["--img-size", "4"]),
    "model_kwargs_list": (["train", "sample", *TRAIN, "--model-kwargs", "[1, 2]"], ["--model-kwargs"]),
    "name_is_a_path": (["train", "sample", *TRAIN, "--name", "a/b"], ["--name", "a/b"]),
    "val_fraction_too_big": (["train", "sample", *TRAIN, "--val-fraction", "1.5"], ["--val-fraction", "1.5"]),
    "epochs_zero": (["train", "sample", *TRAIN, "--epochs", "0"], ["--epochs"]),
    "bench_bad_batch_sizes": (["bench", "--models", "mlp", "--batch-sizes", "1,x"], ["--batch-sizes", "1,x"]),
    "eval_bad_tta": (["eval", "{run}", "{imgs}", "--tta", "mirror", "--cache-dir", "{cache}"], ["--tta", "mirror"]),
    "export_bad_opset": (["export", "{run}", "--opset", "5"], ["--opset", "5"]),
    "predict_topk_zero": (["predict", "{run}", "{img}", "--topk", "0"], ["--topk"]),
    "data_inspect_bad_workers": (["data", "inspect", "{imgs}", "--workers", "-1"], ["--workers"]),
    # output paths
    "out_dir_under_a_file": (["train", "sample", *TRAIN, "--out-dir", "{afile}/runs"], ["--out-dir", "{afile}"]),
    "out_dir_read_only": (["train", "sample", *TRAIN, "--out-dir", "{ro}/runs"], ["--out-dir", "read-only"]),
    "cache_dir_is_file": (["train", "sample", *TRAIN, "--cache-dir", "{afile}"], ["--cache-dir", "{afile}"]),
    "data_get_out_is_file": (["data", "get", "sample", "--out", "{afile}"], ["--out", "{afile}"]),
    "eval_out_is_file": (["eval", "{run}", "{imgs}", "--out", "{afile}", "--cache-dir", "{cache}"], ["--out", "{afile}"]),
    "eval_cache_read_only": (["eval", "{run}", "{imgs}", "--cache-dir", "{ro}/cache"], ["--cache-dir", "read-only"]),
    "predict_out_is_folder": (["predict", "{run}", "{img}", "--out", "{tmp}"], ["--out", "{tmp}"]),
    "export_out_under_a_file": (["export", "{run}", "--out", "{afile}/m.onnx"], ["--out", "{afile}"]),
    "compare_out_is_file": (["compare", "sample", "--models", "mlp", "--epochs", "1", "--out", "{afile}"],
                            ["--out", "{afile}"]),
    # missing things
    "train_data_missing": (["train", "{tmp}/nowhere", *TRAIN], ["nowhere"]),
    "eval_data_missing": (["eval", "{run}", "{tmp}/nowhere", "--cache-dir", "{cache}"], ["nowhere"]),
    "eval_run_missing": (["eval", "{tmp}/norun", "{imgs}", "--cache-dir", "{cache}"], ["norun"]),
    "predict_run_missing": (["predict", "{tmp}/norun", "{img}"], ["norun"]),
    "predict_no_inputs": (["predict", "{run}"], ["no images given"]),
    "export_run_missing": (["export", "{tmp}/norun"], ["norun"]),
    "data_inspect_missing": (["data", "inspect", "{tmp}/nowhere"], ["nowhere"]),
    "models_unknown": (["models", "summary", "no_such_model"], ["no_such_model"]),
}


@pytest.mark.parametrize("case_id", list(INPROCESS_CASES))
def test_inprocess_fault(case_id, env, capsys, monkeypatch):
    argv, words = INPROCESS_CASES[case_id]
    argv = _fill(argv, env)
    monkeypatch.chdir(env["tmp"])  # nothing lands in the repository if a case ever gets as far as writing
    monkeypatch.setenv("IMGARENA_CACHE", env["cache"])
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    _check(case_id, rc, out, err, words, env)


# ---------------------------------------------------------------- tolerated faults

@pytest.mark.parametrize("case_id", list(TOLERATED_CASES))
def test_tolerated_fault(case_id, subprocess_results):
    rc, out, err = subprocess_results[case_id]
    assert "Traceback" not in out + err and rc == 0, f"{case_id}: exit {rc}\n{(out + err)[-3000:]}"
    for w in TOLERATED_CASES[case_id][1]:
        assert w in out + err, f"{case_id}: {w!r} not reported"


def test_empty_inputs_give_empty_results(env):
    """An empty batch is a batch of nothing: [] from the Python API, whatever the array's shape."""
    import numpy as np
    import torch

    import imgarena

    clf = imgarena.load(env["run"], device="cpu")
    assert clf.predict(np.empty((0, 28, 28))) == []
    assert clf.predict(np.empty((0, 16, 16, 1), np.uint8)) == []
    assert clf.predict(torch.empty(0, 1, 16, 16)) == []
    assert clf.predict([]) == []
    one = clf.predict(np.zeros((16, 16), np.uint8))  # a single image still gives a single Prediction
    assert one.label in clf.class_names
