"""Pretrained weights in timm's format: local files, head replacement, channel and size adaptation,
and the offline error for pretrained="timm"."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.mlp_mixer import MlpMixer
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.vision_transformer import VisionTransformer as TimmViT

import imgarena.models.pretrained as pretrained
from imgarena.errors import UserError
from imgarena.models import create_model


def _timm_vit_t4(**kw):
    return TimmViT(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, **kw).eval()


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A timm ViT with vit_t4's config (random weights, 1000 classes) saved as safetensors."""
    torch.manual_seed(0)
    ref = _timm_vit_t4()
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("w") / "vit_t4_timm.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


def test_local_safetensors_fresh_head_same_features(vit_weights):
    ref, path = vit_weights
    ours = create_model("vit_t4", num_classes=10, pretrained=str(path)).eval()
    assert ours.head.weight.shape == (10, 192)
    assert torch.equal(ours.blocks[3].mlp.fc1.weight, ref.blocks[3].mlp.fc1.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = ours.forward_head(ours.forward_features(x), pre_logits=True)
        assert (feats - ref.forward_head(ref.forward_features(x), pre_logits=True)).abs().max() <= 1e-5
    # Same class count: the pretrained head is kept and the logits match timm's.
    same = create_model("vit_t4", num_classes=1000, pretrained=str(path)).eval()
    with torch.no_grad():
        assert (same(x) - ref(x)).abs().max() <= 1e-5


def test_pth_state_dict_and_nested_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = MlpMixer(img_size=32, patch_size=4, num_blocks=6, embed_dim=128, mlp_ratio=(0.5, 4.0)).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    ours = create_model("mixer_t4", num_classes=1000, pretrained=str(tmp_path / "ckpt.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5


def test_grayscale_sums_the_rgb_kernel(vit_weights):
    ref, path = vit_weights
    gray = create_model("vit_t4", num_classes=1000, in_chans=1, pretrained=str(path)).eval()
    assert torch.allclose(gray.patch_embed.proj.weight, ref.patch_embed.proj.weight.sum(1, keepdim=True))
    x1 = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # a gray image through the summed kernel == the same image as RGB through the original
        assert (gray(x1) - ref(x1.repeat(1, 3, 1, 1))).abs().max() <= 1e-4
    four = create_model("vit_t4", num_classes=10, in_chans=4, pretrained=str(path))
    w = ref.patch_embed.proj.weight
    assert torch.allclose(four.patch_embed.proj.weight, torch.cat([w, w[:, :1]], 1) * 0.75)


def test_position_embedding_resized_bicubically(vit_weights):
    ref, path = vit_weights
    big = create_model("vit_t4", num_classes=10, img_size=48, pretrained=str(path))
    expected = resample_abs_pos_embed(ref.pos_embed, (12, 12), num_prefix_tokens=1)
    assert big.pos_embed.shape == (1, 145, 192)
    assert (big.pos_embed - expected).abs().max() <= 1e-6


def test_swin_timm_format_and_head_key(tmp_path):
    torch.manual_seed(0)
    ref = TimmSwin(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2, 2, 2),
                   num_heads=(3, 6, 12, 24)).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "swin.safetensors"))
    ours = create_model("swin_t_cifar", num_classes=1000, embed_dim=24, depths=(2, 2, 2, 2),
                        pretrained=str(tmp_path / "swin.safetensors")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5  # head.fc.* landed in our head


def test_mismatches_are_user_errors(vit_weights, tmp_path):
    _, path = vit_weights
    with pytest.raises(UserError, match="not found"):
        create_model("vit_t4", num_classes=10, pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="does not match"):
        create_model("mixer_t4", num_classes=10, pretrained=str(path))
    mixer = MlpMixer(img_size=32, patch_size=4, num_blocks=6, embed_dim=128, mlp_ratio=(0.5, 4.0))
    save_file(mixer.state_dict(), str(tmp_path / "mixer.safetensors"))
    with pytest.raises(UserError, match=r"mlp_tokens\.fc1\.weight has shape \(64, 64\).*img_size"):
        create_model("mixer_t4", num_classes=10, img_size=28, pretrained=str(tmp_path / "mixer.safetensors"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        create_model("vit_t4", num_classes=10, pretrained=str(tmp_path / "junk.pth"))


class _Evil:  # a pickled object that is not plain tensors: weights_only=True must refuse it
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"pos_embed": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="weights_only"):
        create_model("vit_t4", num_classes=10, pretrained=str(tmp_path / "evil.pth"))


_OFFLINE_SCRIPT = r"""
import huggingface_hub.constants as c
from imgarena.errors import UserError
from imgarena.models import create_model

before = {k: v for k, v in vars(c).items() if k.isupper()}
try:
    create_model("resnet18", num_classes=10, pretrained="timm")  # weights on the hub, not in the (empty) cache
    print("LOADED")
except UserError as e:
    print("ERROR", e)
print("UNCHANGED", before == {k: v for k, v in vars(c).items() if k.isupper()})
"""


def test_timm_spec_offline_fails_fast_with_advice(tmp_path):
    """HF_HUB_OFFLINE=1 (huggingface_hub's own switch) and an empty hub cache: one clear line, no
    network, and huggingface_hub's settings untouched (the env var is read in a fresh process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(Path(pretrained.__file__).parents[2]))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ERROR could not fetch timm weights for 'resnet18' (LocalEntryNotFoundError: ")
    assert "HF_HUB_OFFLINE=1 is set, so only the local cache was searched" in lines[0]
    assert "pass the local file: pretrained=PATH" in lines[0]
    assert lines[1] == "UNCHANGED True"
    assert time.monotonic() - t0 < 90  # no retries against an unreachable hub


def test_timm_config_without_published_weights(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)  # a guard: this test must never reach the network
    with pytest.raises(UserError, match=r"timm publishes no pretrained weights for 'mixer_s32_224'; pass pretrained=PATH"):
        create_model("mixer_s32", num_classes=10, pretrained="timm")
    assert c.HF_HUB_OFFLINE is True and not hasattr(pretrained, "_hub_reachable")  # no probe, no switch flipped


def test_timm_spec_without_timm_counterpart():
    with pytest.raises(UserError, match="no timm counterpart"):
        create_model("mixer_t4", num_classes=10, pretrained="timm")
