import json

import pytest
import torch

from imgarena.checkpoint import load_model, read_metadata, save_checkpoint
from imgarena.errors import UserError
from imgarena.models import create_model


def _meta(model, classes):
    return {
        "model": {"name": model.model_name, "kwargs": model.model_kwargs},
        "num_classes": len(classes),
        "class_names": classes,
        "preprocessing": {"img_size": 8, "channels": 1, "resize": "squash", "mean": [0.5], "std": [0.5]},
        "metrics": {"val_acc": 0.5},
    }


def test_roundtrip_and_reset(tmp_path):
    m = create_model("mlp", num_classes=3, in_chans=1, img_size=8)
    save_checkpoint(tmp_path / "best.safetensors", m, _meta(m, ["a", "b", "c"]))
    assert json.loads((tmp_path / "best.json").read_text())["class_names"] == ["a", "b", "c"]
    m2, meta = load_model(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    m.eval()
    assert torch.equal(m(x), m2(x))
    assert read_metadata(tmp_path / "best.safetensors")["num_classes"] == 3
    m3, _ = load_model(tmp_path, num_classes=5)
    assert m3(x).shape == (2, 5)


def test_crash_mid_write_keeps_old(tmp_path, monkeypatch):
    m = create_model("mlp", num_classes=2, in_chans=1, img_size=8)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, m, _meta(m, ["a", "b"]))
    before = path.read_bytes()
    import safetensors.torch as st

    def boom(sd, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, m, _meta(m, ["a", "b"]))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_bad_checkpoint_is_user_error(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_model(bad)
    with pytest.raises(UserError):
        load_model(tmp_path / "missing")
