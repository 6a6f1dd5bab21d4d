"""The statistics of `imgarena compare` on real runs: the built-in sample (real Fashion-MNIST
images with a held-out test split), tiny sizes, the real training engine.

One compare of mlp and cnn_s with four seeds each runs once for the module; cnn_s beats mlp by
~20 points there (a known large gap), and mlp's four seeds give two "copies" of one architecture.
"""

import json

import numpy as np
import pytest

from imgarena import stats
from imgarena.comparison import aggregate_model, pairwise, run_compare
from imgarena.config import CompareConfig, DataConfig
from imgarena.report import accuracy_sentence, headline

SEEDS = 4


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "cmp"
    cfg = CompareConfig(data=DataConfig(source="sample", img_size=16, subset=480), models=["mlp", "cnn_s"],
                        epochs=3, batch_size=32, seeds=SEEDS, device="cpu", out=str(out))
    results = run_compare(cfg, progress=False, log=_quiet)
    return out, results


def _runs(results, model):
    return sorted((r for r in results["runs"] if r["model"] == model), key=lambda r: r["seed"])


def _predictions(out, run):
    with np.load(out / "predictions" / f"{run['run_dir']}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in ("ids", "targets", "preds")} | {"split": str(z["split"])}


def test_every_run_is_recorded_and_matched_by_seed(compared):
    out, results = compared
    assert results["state"] == "complete"
    for m in ("mlp", "cnn_s"):
        runs = _runs(results, m)
        assert [r["seed"] for r in runs] == list(range(SEEDS)) and all(r["status"] == "ok" for r in runs)
        assert len({r["run_dir"] for r in runs}) == SEEDS  # one run folder per seed
        accs = [r["rank_acc"] for r in runs]
        assert len(set(accs)) > 1  # different seeds really trained differently
    csv_rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 2 * SEEDS  # every individual run stays in results.csv
    row = next(m for m in results["models"] if m["model"] == "mlp")
    accs = [r["rank_acc"] for r in _runs(results, "mlp")]
    assert row["acc_mean"] == pytest.approx(np.mean(accs)) and row["acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert row["acc_lo"] < row["acc_mean"] < row["acc_hi"] and row["acc_ci"] == f"t-interval over {SEEDS} runs"


def test_ranking_uses_test_accuracy_of_the_selected_checkpoint_not_the_best_epoch(compared):
    out, results = compared
    assert "held-out test accuracy" in results["rule"]
    for r in results["runs"]:
        summary = json.loads((out / r["run_dir"] / "summary.json").read_text())
        pred = _predictions(out, r)
        assert pred["split"] == "test" and len(pred["targets"]) == summary["test_images"] == r["n_eval"]
        # scored here from per-image predictions, equal to the engine's own test score of best.safetensors
        assert r["rank_acc"] == pytest.approx(summary["test_acc"]) == pytest.approx((pred["targets"] == pred["preds"]).mean())
        assert r["best_val_acc"] == max(h["val_acc"] for h in map(json.loads, (out / r["run_dir"] / "metrics.jsonl").read_text().splitlines()))
    for m in results["models"]:
        assert m["acc_mean"] == pytest.approx(np.mean([r["test_acc"] for r in _runs(results, m["model"])]))
        assert m["acc_mean"] != pytest.approx(m["best_val_acc"])  # not the optimistic number
    html = (out / "report.html").read_text()
    assert "best val acc (optimistic)" in html and "ranked acc" in html


def test_large_gap_is_significant_in_the_right_direction(compared):
    _, results = compared
    (pair,) = results["pairwise"]
    assert (pair["a"], pair["b"]) == ("mlp", "cnn_s")
    assert pair["significant"] and pair["better"] == "b" and pair["diff"] < -0.05 and pair["p"] < 0.05
    assert pair["lo"] < pair["diff"] < pair["hi"] < 0
    assert [t["test"] for t in pair["tests"]] == ["paired t over images (correctness averaged over runs)",
                                                  "paired t over runs"]
    assert results["headline"].startswith("cnn_s is more accurate than mlp: +")
    assert "points [+" in results["headline"] and "p " in results["headline"]
    names = [m["model"] for m in results["models"]]
    f1 = {m["model"]: m["class_f1"] for m in results["models"]}
    assert set(names) == {"mlp", "cnn_s"} and all(len(v) == len(results["classes"]) == 10 for v in f1.values())
    dis = results["disagreements"]
    assert {dis["a"], dis["b"]} == {"mlp", "cnn_s"} and dis["n_images"] == 1000
    assert len(dis["only_a" if dis["a"] == "cnn_s" else "only_b"]) > len(dis["only_b" if dis["a"] == "cnn_s" else "only_a"])


def test_same_model_over_two_seeds_each_cannot_be_told_apart(compared):
    """mlp seeds {0, 1} against mlp seeds {2, 3}, through the same functions the compare uses."""
    out, results = compared
    runs = _runs(results, "mlp")
    preds = {r["run_dir"]: _predictions(out, r) for r in runs}
    # two 'models' that are one architecture: copy B's runs are seeds 2 and 3, matched to A's 0 and 1
    a = [dict(r, model="mlp_a") for r in runs[:2]]
    b = [dict(r, model="mlp_b", seed=r["seed"] - 2) for r in runs[2:]]
    pairs = pairwise(["mlp_a", "mlp_b"], a + b, preds)
    (pair,) = pairs
    assert pair["n_runs"] == 2 and pair["n_images"] == 1000
    assert not pair["significant"] and pair["p"] >= 0.05
    assert "cannot be told apart" in accuracy_sentence(pair)
    models = [aggregate_model("mlp_a", a), aggregate_model("mlp_b", b)]
    assert "cannot be told apart on this data" in headline(models, pairs)


def test_less_than_one_epoch_is_flagged_undertrained(tmp_path):
    # the module's data (same cache); 90 steps an epoch, and a budget a few of them use up
    cfg = CompareConfig(data=DataConfig(source="sample", img_size=16, subset=800), models=["cnn_s"], epochs=5,
                        time_budget=0.05, batch_size=8, device="cpu", out=str(tmp_path / "cmp"))
    results = run_compare(cfg, progress=False, log=_quiet)
    (run,) = results["runs"]
    assert run["epochs_trained"] < 1
    assert run["undertrained"] and "of an epoch" in run["undertrained_reason"]
    assert run["needed_s"] > 0.05  # at least the time one full epoch takes
    row = next(m for m in results["models"] if m["model"] == "cnn_s")
    assert row["undertrained"]
    assert "undertrained" in results["headline"] and "cnn_s (" in results["headline"]
    assert "UNDERTRAINED" in (tmp_path / "cmp" / "report.md").read_text()


def test_still_rising_curve_is_flagged_with_an_extrapolated_budget():
    rising = [{"epoch": e, "val_acc": 0.9 - 0.5 * np.exp(-e / 4)} for e in range(1, 7)]
    flat = [{"epoch": e, "val_acc": 0.80 + 0.002 * (e % 2)} for e in range(1, 7)]
    r = stats.undertrained(rising, 400, train_time_s=60.0)
    assert r["undertrained"] and "still rising" in r["reason"]
    assert r["needed_epochs"] > 6 and r["needed_s"] == pytest.approx(r["needed_epochs"] * 10.0)
    assert not stats.undertrained(flat, 400, train_time_s=60.0)["undertrained"]
    # the same rise on 30 images is within the noise
    assert not stats.undertrained(rising, 30, train_time_s=60.0)["undertrained"]
    # one full epoch and a bit, its last part annealed flat by the time budget: too few points to judge
    short = [{"epoch": 1, "val_acc": 0.3075}, {"epoch": 2, "val_acc": 0.31, "partial": 0.07}]
    r = stats.undertrained(short, 400, train_time_s=45.0)
    assert r["undertrained"] and "too few" in r["reason"] and r["needed_epochs"] == stats.MIN_EPOCHS_TO_JUDGE


def test_mcnemar_exact_and_intervals_known_values():
    a = np.array([True] * 10 + [False] * 0 + [True] * 50)
    b = np.array([False] * 10 + [True] * 50)
    res = stats.mcnemar_exact(a, b)
    assert (res["only_a"], res["only_b"]) == (10, 0)
    assert res["p"] == pytest.approx(2 * 0.5 ** 10)  # exact two-sided binomial on 10 vs 0 discordant
    assert res["diff"] == pytest.approx(10 / 60) and res["lo"] > 0
    one = stats.mean_interval([0.8], n_eval=100)
    assert one["method"].startswith("Wilson") and one["lo"] < 0.8 < one["hi"]
    assert one["lo"] == pytest.approx(0.7112, abs=1e-3)  # Wilson 95% for 80/100


def test_fold_runs_validate_every_image_once_and_a_half_done_run_skips_finished_folds(tmp_path):
    """--folds 3: the three runs' val sets partition the pool; a re-run after losing the last fold
    (as after a crash) skips the two finished folds and trains only the missing one."""
    import shutil

    from _data_files import write_class_folder

    folder = write_class_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=6, size=8)
    out = tmp_path / "cmp"
    cfg = CompareConfig(data=DataConfig(source=str(folder)), models=["mlp"], epochs=1, batch_size=8, folds=3,
                        device="cpu", out=str(out))
    lines: list[str] = []
    results = run_compare(cfg, progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    runs = sorted(results["runs"], key=lambda r: r["fold"])
    assert [r["fold"] for r in runs] == [0, 1, 2] and all(r["status"] == "ok" for r in runs)
    vals = [json.loads((out / r["run_dir"] / "split.json").read_text())["splits"]["val"] for r in runs]
    flat = [p for v in vals for p in v]
    assert len(flat) == len(set(flat)) == 18  # every image validated exactly once
    assert all(sorted(p.split("/")[0] for p in v) == ["a", "a", "b", "b", "c", "c"] for v in vals)  # stratified
    # lose the last fold, as if the compare had been killed during it
    last = runs[-1]["run_dir"]
    shutil.rmtree(out / last)
    (out / "records" / f"{last}.json").unlink()
    lines.clear()
    run_compare(cfg, progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    text = "\n".join(lines)
    assert "mlp fold 1/3: already finished" in text and "mlp fold 2/3: already finished" in text
    assert "mlp fold 3/3: training" in text
