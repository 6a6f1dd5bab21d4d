"""`imgarena bench`: real models, real timing, real memory counters (tiny sizes so it stays fast)."""

import json

import pytest
import torch

from imgarena.bench import PeakMemory, measure_inference, run_bench
from imgarena.cli import main
from imgarena.config import BenchConfig
from imgarena.models import create_model
from imgarena.models.flops import count_params


def test_rows_per_model_batch_and_mode_with_consistent_numbers():
    cfg = BenchConfig(models=["mlp", "mlp_deep"], img_size=8, in_chans=1, num_classes=3, batch_sizes=[1, 4],
                      device="cpu", warmup=1, repeats=3)
    rows = run_bench(cfg)
    assert [(r["model"], r["batch_size"], r["mode"]) for r in rows] == [
        (m, b, mode) for m in ("mlp", "mlp_deep") for b in (1, 4) for mode in ("train", "infer")]
    for r in rows:
        assert "error" not in r
        assert r["min_ms"] <= r["median_ms"] <= r["p95_ms"]
        assert r["img_s"] == pytest.approx(r["batch_size"] / (r["median_ms"] / 1e3))
        assert r["repeats"] == 3
        ref = create_model(r["model"], num_classes=3, in_chans=1, img_size=8)
        assert r["params"] == count_params(ref)
        assert r["peak_mem_mb"] * 2**20 >= r["params"] * 4  # at least the fp32 weights
    # the MLP's FLOPs are its two matmuls: 2 * (64*200 + 200*3) per image
    assert rows[0]["flops"] == 2 * (64 * 200 + 200 * 3)


def test_a_model_that_cannot_be_built_is_reported_and_others_go_on():
    # mixer_t4 has patch 4: a 6x6 image cannot be cut into patches
    cfg = BenchConfig(models=["mixer_t4", "mlp"], img_size=6, in_chans=1, batch_sizes=[2], modes=["infer"],
                      device="cpu", warmup=0, repeats=1)
    rows = run_bench(cfg)
    assert rows[0]["model"] == "mixer_t4" and "divisible" in rows[0]["error"]
    assert rows[1]["model"] == "mlp" and rows[1]["img_s"] > 0


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as pm:
        x = torch.ones(16 * 2**20)  # 64 MiB, every page written
        del x
    assert pm.bytes >= 48 * 2**20


def test_inference_latency_percentiles():
    m = create_model("mlp", num_classes=2, in_chans=1, img_size=8)
    r = measure_inference(m, (1, 8, 8), 1, device=torch.device("cpu"), warmup=1, repeats=20)
    assert r["repeats"] == 20 and r["min_ms"] <= r["median_ms"] <= r["p95_ms"]


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--models", "mlp", "--img-size", "8", "--in-chans", "1", "--batch-sizes", "1,2",
               "--device", "cpu", "--quick", "--json", str(out), "--csv", str(tmp_path / "bench.csv")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "img/s" in text and "FLOPs/img" in text
    rows = json.loads(out.read_text())["rows"]
    assert {(r["batch_size"], r["mode"]) for r in rows} == {(1, "train"), (1, "infer"), (2, "train"), (2, "infer")}
    assert (tmp_path / "bench.csv").read_text().count("\n") == 5  # header + 4 rows


@pytest.mark.parametrize("argv, needle", [
    (["--models", "mlpp"], "unknown model"),
    (["--models", "mlp", "--batch-sizes", "1,x"], "--batch-sizes must be a non-empty list of whole numbers"),
    (["--models", "mlp", "--modes", "fly"], "mode"),
])
def test_cli_user_errors_exit_2(argv, needle, capsys):
    assert main(["bench", "--img-size", "8", *argv]) == 2
    assert needle in capsys.readouterr().err
