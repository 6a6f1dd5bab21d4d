"""`imgarena compare` end to end: real PNG folder, real training engine, real report files.

One compare of four entries runs once for the module: mixer_s4 with a bad architecture option
(fails, and comes first so we see the others go on), then three tiny models that train.
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from _data_files import write_class_folder

from imgarena.checkpoint import load_model
from imgarena.cli import main
from imgarena.models.flops import count_params

MODELS = ["mixer_s4", "mlp", "mixer_t4", "mlp_deep"]
OK = ["mlp", "mixer_t4", "mlp_deep"]


def compare_args(folder, out, *extra):
    return ["compare", str(folder), "--models", ",".join(MODELS), "--epochs", "2", "--batch-size", "8",
            "--val-fraction", "0.25", "--baseline", "mlp", "--device", "cpu", "--out", str(out), "--quiet",
            "--set", "mixer_s4:model_kwargs={bogus_option: 1}", *extra]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    folder = write_class_folder(root / "imgs", per_class=12, size=16, mode="RGB")
    out = root / "cmp"
    rc = main(compare_args(folder, out))
    results = json.loads((out / "results.json").read_text())
    return folder, out, rc, results


def _rec(results, model):
    return next(r for r in results["models"] if r["model"] == model)


def _run(results, model, seed=0):
    return next(r for r in results["runs"] if r["model"] == model and r["seed"] == seed)


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_writes_every_file_with_one_row_per_model(compared):
    _, out, rc, results = compared
    assert rc == 1  # one model failed; the command still finished
    for name in ("report.html", "report.md", "results.csv", "results.json", "compare.yaml",
                 "figures/curves.png", "figures/acc_vs_time.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert [r["model"] for r in results["models"]] == MODELS
    assert results["state"] == "complete with failures"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == MODELS
    assert [r["status"] for r in rows] == ["failed", "ok", "ok", "ok"]
    for name in ("models.csv", "pairwise.csv", "figures/runs.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    for m in MODELS:
        assert f"| {m} |" in md
    html = (out / "report.html").read_text()
    assert html.count('data-model="') == len(MODELS)  # one row per model in the results table
    assert html.count('data-run="') == len(MODELS)  # and one per run in the runs table (one seed)
    # 3 compare figures (+ the disagreement images when the top two disagree anywhere) + the
    # side-by-side explanation maps + one confusion matrix per trained model, all inline
    dis = results["disagreements"]
    shown = 1 if dis and (dis["only_a"] or dis["only_b"]) else 0
    assert html.count('src="data:image/png;base64,') == 3 + shown + 1 + len(OK)
    assert "<h2>Where each model looks</h2>" in html and "figures/explain.png" in md
    assert (out / "figures" / "explain.png").is_file()
    # a pairwise matrix of every pair, and no test split here, so final-epoch val acc ranks
    assert len(results["pairwise"]) == 6 and "final epoch's val accuracy" in results["rule"]
    for m in OK:
        run = out / _rec(results, m)["run_dir"]
        for name in ("summary.json", "metrics.jsonl", "best.safetensors", "confusion_matrix.png", "config.yaml"):
            assert (run / name).is_file(), (m, name)


def test_failing_model_is_recorded_and_the_others_go_on(compared):
    _, out, _, results = compared
    bad = _rec(results, "mixer_s4")
    assert bad["status"] == "failed" and "bogus_option" in bad["reason"]
    assert bad["best_val_acc"] is None and bad["run_dir"] is None and bad["runs"] == 0
    assert all(_rec(results, m)["status"] == "ok" for m in OK)
    assert "failed: mixer_s4" in results["headline"]


def test_records_match_the_runs_and_are_measured(compared):
    _, out, _, results = compared
    for m in OK:
        r = _run(results, m)
        run = out / r["run_dir"]
        hist = _history(run)
        accs = [h["val_acc"] for h in hist]
        assert r["epochs"] == len(hist) == 2 and r["epochs_trained"] == 2.0
        assert r["best_val_acc"] == max(accs) and r["final_val_acc"] == accs[-1]
        # no test split: the ranked number is the final epoch's val accuracy (last.safetensors re-scored)
        assert r["rank_split"] == "val" and r["rank_acc"] == pytest.approx(accs[-1])
        row = _rec(results, m)
        assert row["acc_mean"] == r["rank_acc"] and row["best_val_acc"] == r["best_val_acc"]
        assert row["acc_ci"].startswith("Wilson") and row["acc_lo"] <= row["acc_mean"] <= row["acc_hi"]
        assert accs[r["best_epoch"] - 1] == r["best_val_acc"]
        assert r["best_val_top5"] is None  # 3 classes: top-5 does not apply
        assert r["train_time_s"] == pytest.approx(hist[-1]["train_time"]) and hist[-1]["train_time"] <= hist[-1]["wall_time"]
        assert r["train_img_s"] > 0 and r["time_per_epoch_s"] > 0 and r["infer_img_s"] > 0
        assert 0 < r["latency_p50_ms"] <= r["latency_p95_ms"]
        model, meta = load_model(run)
        assert r["params"] == count_params(model) and r["flops"] > 0
        assert r["peak_mem_mb"] * 2**20 >= r["params"] * 4
    speeds = {m: _rec(results, m)["speed_vs_fastest"] for m in OK}
    assert max(speeds.values()) == pytest.approx(1.0)
    assert _rec(results, "mlp")["speed_vs_baseline"] == pytest.approx(1.0)
    mixer = _rec(results, "mixer_t4")
    assert mixer["speed_vs_baseline"] == pytest.approx(mixer["train_img_s"] / _rec(results, "mlp")["train_img_s"])
    # the fastest other model against the baseline, judged by the spread of its epochs' throughputs
    assert re.search(r"mlp_deep (trains [\d.]+x (faster|slower) than mlp|and mlp train at the same speed)", results["headline"])
    assert "one measurement each" not in results["headline"]  # a single run's epochs give the speed spread


def test_every_model_saw_the_same_split_and_conditions(compared):
    import yaml

    _, out, _, results = compared
    runs = [out / _rec(results, m)["run_dir"] for m in OK]
    splits = [(r / "split.json").read_text() for r in runs]
    assert splits[0] == splits[1] == splits[2]
    cfgs = [yaml.safe_load((r / "config.yaml").read_text()) for r in runs]
    for key in ("data", "seed", "batch_size", "epochs", "augment", "optimizer", "lr", "schedule"):
        assert cfgs[0][key] == cfgs[1][key] == cfgs[2][key], key
    assert [c["model"] for c in cfgs] == OK


def test_rerun_skips_finished_models_and_retrains_a_changed_one(compared, tmp_path, capsys):
    folder, out, _, _ = compared
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)  # records hold relative run folders, so a copied compare folder resumes
    before = {p: p.stat().st_mtime_ns for p in copy.glob("*/summary.json")}
    assert len(before) == len(OK)
    old_mlp_run = _rec(json.loads((copy / "results.json").read_text()), "mlp")["run_dir"]
    capsys.readouterr()
    assert main(compare_args(folder, copy)) == 1
    text = capsys.readouterr().out
    for m in OK:
        assert f"{m}: already finished" in text
    assert "mixer_s4: training" in text  # failures are retried
    assert {p: p.stat().st_mtime_ns for p in copy.glob("*/summary.json")} == before
    # a changed option for one model retrains only that model
    assert main(compare_args(folder, copy, "--set", "mlp:lr=0.01")) == 1
    text = capsys.readouterr().out
    assert "mlp: training" in text and "mixer_t4: already finished" in text and "mlp_deep: already finished" in text
    results = json.loads((copy / "results.json").read_text())
    assert _rec(results, "mlp")["status"] == "ok"
    assert _rec(results, "mlp")["run_dir"] != old_mlp_run  # keyed on the resolved config


def test_more_seeds_train_only_the_new_runs(compared, tmp_path, capsys):
    folder, out, _, _ = compared
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    capsys.readouterr()
    args = [a for a in compare_args(folder, copy) if a != "mixer_s4:model_kwargs={bogus_option: 1}"]
    args[args.index("--set")] = "--seeds"
    args.insert(args.index("--seeds") + 1, "2")
    args[args.index("--models") + 1] = "mlp,mixer_t4"
    assert main(args) == 0
    text = capsys.readouterr().out
    # seed 0 of each model is the run the first compare made; only seed 1 trains
    assert "mlp seed 0: already finished" in text and "mixer_t4 seed 0: already finished" in text
    assert "mlp seed 1: training" in text and "mixer_t4 seed 1: training" in text
    results = json.loads((copy / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in results["runs"]] == [("mlp", 0), ("mixer_t4", 0), ("mlp", 1), ("mixer_t4", 1)]
    assert all(m["runs"] == 2 for m in results["models"])
    (pair,) = results["pairwise"]
    assert pair["n_runs"] == 2 and "paired t over runs" in pair["method"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("already finished") == 4


def _plain_weights_file(ckpt, folder, mean, std):
    """The tensors of an imgarena checkpoint as a bare weights file (no imgarena metadata) with a
    timm-style config.json beside it that says which normalisation the weights were trained with."""
    from safetensors.numpy import load_file, save_file

    folder.mkdir()
    save_file(load_file(str(ckpt)), str(folder / "weights.safetensors"))
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": mean, "std": std}}))
    return folder / "weights.safetensors"


def test_pretrained_models_train_new_runs_and_the_report_says_what_each_started_from(compared, tmp_path, capsys):
    """mixer_t4 from an earlier run folder (two-stage by default), mlp as a linear probe on a bare
    weights file with its own mean/std, mlp_deep from scratch: only the two changed models retrain,
    each on the preprocessing its weights bring, all on the same split."""
    import hashlib

    import yaml

    folder, out, _, results = compared
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    run = out / _rec(results, "mixer_t4")["run_dir"]
    weights = _plain_weights_file(out / _rec(results, "mlp")["run_dir"] / "best.safetensors", tmp_path / "w",
                                  mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    capsys.readouterr()
    assert main(compare_args(folder, copy, "--set", f"mixer_t4:pretrained={run}", "--set", f"mlp:pretrained={weights}",
                             "--set", "mlp:finetune=linear")) == 1
    text = capsys.readouterr().out
    assert "mixer_t4: training" in text and "mlp: training" in text and "mlp_deep: already finished" in text
    got = json.loads((copy / "results.json").read_text())
    mixer, mlp, deep = (_rec(got, m) for m in ("mixer_t4", "mlp", "mlp_deep"))
    assert [r["status"] for r in (mixer, mlp, deep)] == ["ok", "ok", "ok"]
    assert mixer["run_dir"] != _rec(results, "mixer_t4")["run_dir"]  # the weights are part of the run's key
    assert (mixer["finetune"], mixer["pretrained"]) == ("two-stage", str(run))
    assert (mlp["finetune"], mlp["pretrained"]) == ("linear", str(weights))
    assert (deep["finetune"], deep["pretrained"]) == ("full", None)
    summary = json.loads((copy / mixer["run_dir"] / "summary.json").read_text())
    if summary.get("pretrained") is not None:  # the engine records the weights' kind and hash
        assert mixer["pretrained_kind"] == "run" and mlp["pretrained_kind"] == "file"
        assert mlp["pretrained_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # each model's inputs are normalised the way its weights were trained; the split is the same
    cfgs = {m: yaml.safe_load((copy / _rec(got, m)["run_dir"] / "config.yaml").read_text()) for m in OK}
    assert cfgs["mlp"]["data"]["mean"] == [0.5, 0.5, 0.5] and cfgs["mlp"]["data"]["std"] == [0.25, 0.25, 0.25]
    assert cfgs["mixer_t4"]["data"]["mean"] != [0.5, 0.5, 0.5]
    assert cfgs["mixer_t4"]["pretrained"] == str(run) and cfgs["mlp"]["finetune"] == "linear"
    splits = [json.loads((copy / _rec(got, m)["run_dir"] / "split.json").read_text())["splits"] for m in OK]
    assert splits[0] == splits[1] == splits[2]
    assert "mlp: linear from " in got["conditions"] and "mean/std 0.5,0.5,0.5/0.25,0.25,0.25" in got["conditions"]
    # the console ranking and both report tables name each row's mode and weights
    md = (copy / "report.md").read_text()
    assert "| fine-tune | weights |" in md
    assert re.search(rf"\| mixer_t4 \| ok \| 1 \| two-stage \| {re.escape(str(run))}", md)
    assert re.search(rf"\| mlp \| ok \| 1 \| linear \| {re.escape(str(weights))}", md)
    assert "| mlp_deep | ok | 1 | full | random init |" in md
    html = (copy / "report.html").read_text()
    assert "<th>fine-tune</th><th>weights</th>" in html and f"<td>{str(run)}" in html
    table = text[text.index("fine-tune"):]
    assert re.search(r"mixer_t4 +ok +1 +two-stage +" + re.escape(str(run)), table)
    assert re.search(r"mlp_deep +ok +1 +full +random init", table)


def test_models_with_other_preprocessing_get_the_first_models_split(compared):
    """Near-duplicate groups come from the decoded pixels, so another size or crop may group (and
    split) differently: compare re-splits such data with the first model's groups."""
    from imgarena.comparison import same_split_as
    from imgarena.config import DataConfig
    from imgarena.data import load_data
    from imgarena.data.prepare import resplit

    folder = compared[0]
    ref = load_data(DataConfig(source=str(folder), val_fraction=0.25, img_size=8), progress=False)
    other = resplit(load_data(DataConfig(source=str(folder), val_fraction=0.25, img_size=12), progress=False),
                    group_by=r"^(\w+/\w+_00)")  # other groups: images 000-009 of a class together
    names = lambda d: [sorted(map(str, part.paths)) for part in (d.train, d.val)]  # noqa: E731
    assert names(other) != names(ref)
    got = same_split_as(other, ref)
    assert names(got) == names(ref) and got.img_size == 12 and got.train.images.shape[-1] == 12


def test_run_key_holds_the_weights_and_the_fine_tune_mode(compared, tmp_path):
    from imgarena.comparison import config_key, model_train_config
    from imgarena.config import CompareConfig, DataConfig

    folder, out, _, results = compared
    source = tmp_path / "source"
    shutil.copytree(out / _rec(results, "mixer_t4")["run_dir"], source)

    def key(**options):
        cfg = CompareConfig(data=DataConfig(source=str(folder), val_fraction=0.25), models=["mixer_t4"], epochs=2,
                            per_model={"mixer_t4": options})
        return config_key(model_train_config(cfg, "mixer_t4", {}))

    scratch, two_stage, linear = key(), key(pretrained=str(source)), key(pretrained=str(source), finetune="linear")
    assert len({scratch, two_stage, linear}) == 3
    assert key(finetune="full") == scratch  # the defaults, spelled out, are the same run
    assert key(pretrained=str(source), finetune="two-stage") == two_stage
    os.utime(source / "best.safetensors", ns=(1, 1))  # the run folder's weights replaced
    assert key(pretrained=str(source)) != two_stage


def test_shared_pretrained_and_finetune_flags_reach_every_model_and_set_overrides_one(tmp_path, capsys):
    from imgarena.cli import build_parser
    from imgarena.cli.compare import build_config
    from imgarena.comparison import model_train_config

    args = build_parser().parse_args(["compare", "sample", "--models", "mlp,resnet18", "--pretrained", "timm",
                                      "--finetune", "linear", "--set", "mlp:pretrained=null",
                                      "--set", "mlp:finetune=full"])
    cfg = build_config(args)
    assert (cfg.train["pretrained"], cfg.train["finetune"]) == ("timm", "linear")
    resnet, mlp = (model_train_config(cfg, m, {}) for m in ("resnet18", "mlp"))
    # timm's pretrained config (no download): ImageNet statistics, 3 channels, its crop fraction
    assert (resnet.pretrained, resnet.finetune_mode) == ("timm", "linear")
    assert resnet.data.mean == pytest.approx([0.485, 0.456, 0.406]) and resnet.data.channels == 3
    assert (mlp.pretrained, mlp.finetune_mode, mlp.data.mean) == (None, "full", None)
    # a mode that needs weights, for a model without any: one line before anything trains
    out = tmp_path / "cmp"
    assert main(["compare", "sample", "--models", "mlp,cnn_s", "--finetune", "linear", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "finetune" in err and "mlp" in err and "pretrained" in err and len(err.strip().splitlines()) == 1
    assert main(["compare", "sample", "--models", "mlp,cnn_s", "--set", "cnn_s:pretrained=no/such/run",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cnn_s" in err and "no/such/run" in err and len(err.strip().splitlines()) == 1
    assert not (out / "records").exists()


def test_user_mistakes_stop_before_training(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    out = tmp_path / "cmp"
    assert main(["compare", str(folder), "--models", "mlp,mixer_t4", "--set", "bogus_key=1", "--out", str(out)]) == 2
    assert "bogus_key" in capsys.readouterr().err
    assert main(["compare", str(folder), "--models", "mlp,mixer_t4", "--baseline", "vit_t4", "--out", str(out)]) == 2
    assert "--baseline" in capsys.readouterr().err
    assert main(["compare", str(folder), "--models", "mlp,mlpp", "--out", str(out)]) == 2
    assert "mlpp" in capsys.readouterr().err
    assert main(["compare", str(folder), "--models", "mlp,mixer_t4", "--seeds", "0", "--out", str(out)]) == 2
    assert "seeds" in capsys.readouterr().err
    assert not (out / "records").exists()


def test_ctrl_c_leaves_a_valid_partial_report_and_a_rerun_resumes(tmp_path, capsys):
    folder = write_class_folder(tmp_path / "imgs", classes=("a", "b"), per_class=10, size=8)
    out = tmp_path / "cmp"
    args = ["compare", str(folder), "--models", "mlp,mixer_t4", "--epochs", "1", "--batch-size", "4",
            "--val-fraction", "0.3", "--device", "cpu", "--out", str(out), "--quiet", "--set", "mixer_t4:epochs=10"]
    proc = subprocess.Popen([sys.executable, "-m", "imgarena", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    started = False
    while time.time() < deadline and proc.poll() is None:
        try:
            done = _rec(json.loads((out / "results.json").read_text()), "mlp")["status"] == "ok"
        except (OSError, ValueError, StopIteration):
            done = False
        # Ctrl-C once mlp is reported and mixer_t4 has saved its resumable state after an epoch
        if done and any(out.glob("mixer_t4-*/state.pt")):
            started = True
            break
        time.sleep(0.05)
    assert started, proc.communicate(timeout=30)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    results = json.loads((out / "results.json").read_text())
    assert results["state"] == "interrupted"
    assert [r["status"] for r in results["models"]] == ["ok", "interrupted"]
    html = (out / "report.html").read_text()
    assert "Partial report" in html and html.count('data-model="') == 2
    run = next(out.glob("mixer_t4-*"))
    first_rows = _history(run)
    assert 0 < len(first_rows) < 10

    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "mlp: already finished" in text and "mixer_t4: resuming" in text
    rows = _history(run)
    # continued, not restarted: epoch 1 (in the saved state) is kept as it was
    assert len(rows) == 10 and rows[0] == first_rows[0] and [r["epoch"] for r in rows] == list(range(1, 11))
    results = json.loads((out / "results.json").read_text())
    assert results["state"] == "complete" and _run(results, "mixer_t4")["epochs"] == 10


def test_recommended_recipe_changes_optimisation_but_not_the_conditions():
    from imgarena.comparison import model_train_config, recipe_overrides
    from imgarena.config import CompareConfig

    cfg = CompareConfig(models=["mlp", "mixer_t4"], recipe="recommended", epochs=3, batch_size=32,
                        train={"augment": "standard", "weight_decay": 0.01})
    tcs = {m: model_train_config(cfg, m, recipe_overrides(cfg, m)) for m in cfg.models}
    assert (tcs["mlp"].optimizer, tcs["mixer_t4"].optimizer) == ("adam", "adamw")  # the families' recipes differ
    for tc in tcs.values():
        # held equal whatever the recipe says; the user's shared options win over the recipe
        assert (tc.epochs, tc.batch_size, tc.augment, tc.seed, tc.weight_decay) == (3, 32, "standard", 0, 0.01)
    same = CompareConfig(models=["mlp", "mixer_t4"], recipe="same")
    assert {model_train_config(same, m, recipe_overrides(same, m)).optimizer for m in same.models} == {"adamw"}


def test_the_recommended_recipe_with_pretrained_weights_takes_the_photo_preset():
    from imgarena.comparison import recipe_overrides
    from imgarena.config import CompareConfig
    from imgarena.recipes import recommended_recipe

    scratch = recommended_recipe("resnet50")
    assert recommended_recipe("resnet50", pretrained="timm") == {**scratch, "augment": "photo"}
    assert "augment" not in scratch and recommended_recipe("resnet50", pretrained=None) == scratch
    # compare holds augmentation equal: the recipe's preset is not applied to one model behind the others' backs
    cfg = CompareConfig(models=["mlp", "resnet50"], recipe="recommended",
                        per_model={"resnet50": {"pretrained": "timm"}})
    got = recipe_overrides(cfg, "resnet50")
    assert "augment" not in got and got["optimizer"] == "sgd"


def test_report_module_needs_neither_torch_nor_the_engine():
    code = ("import sys, imgarena.report; bad = [m for m in sys.modules if m == 'torch' or m.startswith('imgarena.engine')];"
            " assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
