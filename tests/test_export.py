"""`imgarena export`: ONNX / TorchScript files that run in onnxruntime / torch.jit and match PyTorch,
for every model family; the sidecar; and `imgarena predict model.onnx` with torch never imported."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from imgarena.checkpoint import load_model
from imgarena.cli import main
from imgarena.config import ExportConfig, PredictConfig
from imgarena.export import PARITY_ATOL, run_export
from imgarena.models import get_entry, list_models
from imgarena.predict import run_predict
from predict_helpers import CLASSES, save_run, write_images
from _no_torch import NO_TORCH

# One tiny variant per family (few blocks, narrow, small images) so exporting every family stays fast.
TINY = {
    "mlp": ("mlp", 16, {}),
    "mixer": ("mixer_t4", 16, dict(num_blocks=2, hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=64)),
    "vit": ("vit_t4", 16, dict(depth=2, embed_dim=32, num_heads=2, mlp_dim=64)),
    # depth 2 in the 8x8 stage: the second block uses shifted windows (roll + attention mask)
    "swin": ("swin_t_cifar", 16, dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2))),
    # residual branches live at init (no zero-init / 1e-6 layer scale), so they count in the parity check
    "convnext": ("convnext_atto_cifar", 16, dict(depths=(1, 1), dims=(16, 32), ls_init_value=1.0)),
    "resnet": ("resnet18_cifar", 16, dict(layers=(1, 1), widths=(8, 16), stem_width=8, zero_init_last=False)),
    "mobilenet": ("mobilenetv2_cifar", 16, dict(width=0.25)),
    "cnn": ("cnn_s", 16, dict(widths=(8, 16), hidden=16)),
}
FAMILIES = sorted({get_entry(n).family for n in list_models()})


def _tiny(family: str):
    """(model name, img_size, overrides); a family added later without a TINY row uses its small-image
    variant (`_cifar` or patch-4 names) at 32 px, else its first variant."""
    if family in TINY:
        return TINY[family]
    names = list_models(family=family)
    small = [n for n in names if n.endswith("_cifar") or n.endswith("4")]
    return ((small or names)[0], 32, {})


def _reference(run_dir, x_u8):
    from imgarena.data.images import normalize

    model, meta = load_model(run_dir)
    x = torch.from_numpy(normalize(x_u8, meta["preprocessing"]["mean"], meta["preprocessing"]["std"]))
    with torch.no_grad():
        return model(x).numpy(), x.numpy()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load announces its own deprecation
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_and_matches_pytorch(family, tmp_path):
    name, size, overrides = _tiny(family)
    run = save_run(tmp_path / "run", name, img_size=size, **overrides)
    x_u8 = np.random.default_rng(1).integers(0, 256, size=(3, 3, size, size), dtype=np.uint8)
    ref, x = _reference(run, x_u8)

    res = run_export(ExportConfig(checkpoint=str(run), format="onnx", dynamic_batch=True))
    assert res.parity.ok and res.parity.max_abs_diff <= PARITY_ATOL and res.parity.source == "the embedded sample"
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]  # a batch of 3 although traced with 2: the batch is dynamic
    assert np.abs(got - ref).max() <= PARITY_ATOL and (got.argmax(1) == ref.argmax(1)).all()

    res = run_export(ExportConfig(checkpoint=str(run), format="torchscript"))
    assert res.parity.ok and res.path.endswith(".pt")
    with torch.no_grad():
        got = torch.jit.load(res.path)(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() <= PARITY_ATOL


def test_sidecar_static_batch_and_cli(tmp_path, capsys):
    run = save_run(tmp_path / "run", "mlp", img_size=12, channels=1, resize="crop", mean=[0.3], std=[0.2])
    out = tmp_path / "deploy" / "m.onnx"
    assert main(["export", str(run), "--out", str(out), "--opset", "18"]) == 0
    printed = capsys.readouterr().out
    assert "parity vs PyTorch" in printed and "OK" in printed and "max |logit diff|" in printed
    side = json.loads((tmp_path / "deploy" / "m.onnx.json").read_text())
    assert side["class_names"] == CLASSES and side["num_classes"] == 3
    # a checkpoint written without crop_pct/interpolation: the sidecar spells out the values it was made with
    assert side["preprocessing"] == {"img_size": 12, "channels": 1, "resize": "crop", "crop_pct": 1.0,
                                     "interpolation": "bilinear", "mean": [0.3], "std": [0.2]}
    assert side["parity"]["ok"] and side["parity"]["max_abs_diff"] <= PARITY_ATOL and side["opset"] == 18
    inp = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert inp.shape == [1, 1, 12, 12]  # without --dynamic-batch: exactly one image
    # user errors: exit 2, one line
    assert main(["export", str(run), "--opset", "5"]) == 2
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "imgarena: error:" in capsys.readouterr().err


def test_parity_uses_the_runs_split_files_or_given_images(tmp_path):
    files = write_images(tmp_path / "imgs")
    run = save_run(tmp_path / "run", "mlp", img_size=16)
    rel = lambda paths: [str(Path(p).relative_to(tmp_path / "imgs")) for p in paths]  # noqa: E731
    # the layout run_training writes: paths relative to the data root
    (run / "split.json").write_text(json.dumps({"root": str(tmp_path / "imgs"), "splits": {
        "train": rel(files["good"][:2]), "val": rel(files["good"][2:] + files["bad"])}}))
    res = run_export(ExportConfig(checkpoint=str(run)))
    # the five decodable files of the split (val first); the corrupt ones are skipped
    assert res.parity.ok and res.parity.source == "the run's split files" and res.parity.n_images == 5
    res = run_export(ExportConfig(checkpoint=str(run), check_images=[files["good"][0]], out=str(tmp_path / "x.onnx")))
    assert res.parity.source == "--check-images" and res.parity.n_images == 1


_TORCH_FREE = NO_TORCH + r"""
rc = main(["predict", sys.argv[1], sys.argv[2], "--format", "json", "--out", sys.argv[3]])
assert "torch" not in sys.modules, "torch was imported"
print("RC", rc)
"""


def test_onnx_predict_runs_without_torch_and_matches_the_checkpoint(tmp_path):
    files = write_images(tmp_path / "imgs")
    run = save_run(tmp_path / "run", "mixer_t4", img_size=16, **TINY["mixer"][2])
    res = run_export(ExportConfig(checkpoint=str(run), dynamic_batch=True))
    out = tmp_path / "onnx.json"
    proc = subprocess.run([sys.executable, "-c", _TORCH_FREE, res.path, str(tmp_path / "imgs"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert "RC 1" in proc.stdout, proc.stderr  # two corrupt files -> exit code 1, the rest predicted
    onnx_rows = json.loads(out.read_text())
    torch_rows = [r.as_dict() for r in run_predict(PredictConfig(checkpoint=str(run), inputs=[str(tmp_path / "imgs")],
                                                                 device="cpu"), progress=False)]
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows] == sorted(files["good"] + files["bad"])
    for a, b in zip(onnx_rows, torch_rows):
        assert a["error"] == b["error"] and a["label"] == b["label"]
        if a["error"] is None:
            np.testing.assert_allclose([t["prob"] for t in a["topk"]], [t["prob"] for t in b["topk"]], atol=1e-5)


def test_onnx_predict_static_batch_and_missing_sidecar(tmp_path):
    files = write_images(tmp_path / "imgs")
    run = save_run(tmp_path / "run", "mlp", img_size=16)
    res = run_export(ExportConfig(checkpoint=str(run)))  # batch fixed at 1: images go one by one
    rows = run_predict(PredictConfig(checkpoint=res.path, inputs=files["good"], batch_size=4), progress=False)
    assert [r.path for r in rows] == files["good"] and all(r.label in CLASSES for r in rows)
    Path(res.sidecar).unlink()
    with pytest.raises(Exception, match="keep the JSON"):
        run_predict(PredictConfig(checkpoint=res.path, inputs=files["good"]), progress=False)
