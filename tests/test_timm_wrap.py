"""Any timm model as `timm/<name>`: the shared contract, self-description, checkpoints, local weights."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from imgarena.checkpoint import load_model, save_checkpoint
from imgarena.errors import UserError
from imgarena.models import create_model


def test_cnn_contract():
    m = create_model("timm/resnet18", num_classes=5, in_chans=1, img_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    assert m(x).shape == (2, 5) and m.num_classes == 5
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 512) == (2, m.num_features)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.num_classes == 3 and m.get_classifier().out_features == 3
    assert m.input_spec == {"img_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.5]}
    assert m.model_name == "timm/resnet18"


def test_vit_gets_img_size_and_timm_normalization():
    m = create_model("timm/vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=4)
    assert m.model.pos_embed.shape == (1, 1 + 64, 192)
    assert m.input_spec["mean"] == [0.5, 0.5, 0.5]  # from timm's pretrained config, not ImageNet's
    assert m.model_kwargs == {"patch_size": 4, "img_size": 32}


def test_unknown_timm_name_lists_closest():
    with pytest.raises(UserError, match="closest: resnet18"):
        create_model("timm/resnet181")


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    m = create_model("timm/vit_tiny_patch16_224", num_classes=3, in_chans=1, img_size=32, patch_size=8,
                     drop_path_rate=0.1).eval()
    meta = {"model": {"name": m.model_name, "kwargs": m.model_kwargs}, "num_classes": 3, "class_names": ["a", "b", "c"],
            "preprocessing": {"img_size": 32, "channels": 1, "resize": "squash", "mean": [0.5], "std": [0.5]}}
    save_checkpoint(tmp_path / "best.safetensors", m, meta)
    loaded, _ = load_model(tmp_path / "best.safetensors")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_local_timm_weights_with_new_head(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", num_classes=1000).eval()
    save_file(ref.state_dict(), str(tmp_path / "r18.safetensors"))
    m = create_model("timm/resnet18", num_classes=7, pretrained=str(tmp_path / "r18.safetensors")).eval()
    assert torch.equal(m.model.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert m.model.fc.weight.shape == (7, 512)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m.forward_head(m.forward_features(x), pre_logits=True),
                              ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5)
