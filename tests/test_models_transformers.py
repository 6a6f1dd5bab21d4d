"""MLP-Mixer, ViT and Swin: papers' configs, timm parity (params, logits, key conversion), gradients,
size handling, FLOPs, the layer summary and `imgarena models`."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.vision_transformer import VisionTransformer as TimmViT

from imgarena.cli import main
from imgarena.errors import UserError
from imgarena.models import create_model, get_entry, list_models
from imgarena.models._layers import plain_ops
from imgarena.models.convert import ours_to_timm, timm_to_ours
from imgarena.models.flops import count_flops, count_params, model_stats
from imgarena.models.summary import summarize

FAMILIES = ("mixer", "vit", "swin")

# MLP-Mixer paper, Table 1: layers, patch, hidden C, D_S (tokens MLP), D_C (channels MLP), params (M).
MIXER_TABLE1 = {
    "mixer_s32": (8, 32, 512, 256, 2048, 19), "mixer_s16": (8, 16, 512, 256, 2048, 18),
    "mixer_b32": (12, 32, 768, 384, 3072, 60), "mixer_b16": (12, 16, 768, 384, 3072, 59),
    "mixer_l32": (24, 32, 1024, 512, 4096, 206), "mixer_l16": (24, 16, 1024, 512, 4096, 207),
    "mixer_h14": (32, 14, 1280, 640, 5120, 431),
}


def _timm_reference(name: str) -> torch.nn.Module:
    """timm's model of the same config (1000 classes, 224 px); built by the caller's device context."""
    entry = get_entry(name)
    if entry.timm_name:
        return timm.create_model(entry.timm_name, pretrained=False, num_classes=1000)  # vit_h14 defaults to 0
    assert name == "mixer_h14"  # the only paper variant timm does not register
    return MlpMixer(patch_size=14, num_blocks=32, embed_dim=1280, mlp_ratio=(0.5, 4.0))


def _randomize(model: torch.nn.Module, seed: int = 0) -> dict:
    """Give every float tensor random values (heads and biases included) so parity checks bite."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return sd


# --- papers and timm: parameter counts ----------------------------------------------------------

def test_mixer_variants_follow_table1():
    for name, (layers, patch, C, DS, DC, params_m) in MIXER_TABLE1.items():
        kw = get_entry(name).kwargs
        assert (kw["num_blocks"], kw["patch_size"], kw["hidden_dim"], kw["tokens_mlp_dim"], kw["channels_mlp_dim"]) \
            == (layers, patch, C, DS, DC), name
        assert abs(model_stats(name)["params"] / 1e6 - params_m) < 1.5, name  # the paper rounds


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_variant_params_equal_timm(family):
    names = [n for n in list_models(family=family) if get_entry(n).paper]
    assert names
    for name in names:
        with torch.device("meta"):  # shapes only: ViT-H and Mixer-H cost nothing
            ours, ref = create_model(name, num_classes=1000), _timm_reference(name)
        assert count_params(ours) == count_params(ref), name


def test_headline_param_counts():
    got = {n: round(model_stats(n)["params"] / 1e6, 2) for n in ("mixer_b16", "vit_b16", "swin_t")}
    assert got == {"mixer_b16": 59.88, "vit_b16": 86.57, "swin_t": 28.29}


def test_flops_match_published_macs():
    # timm / papers: Mixer-B/16 12.61 GMACs, ViT-B/16 17.56, Swin-T 4.5 (1 MAC = 2 FLOPs here).
    assert model_stats("mixer_b16")["flops"] / 2e9 == pytest.approx(12.61, rel=0.01)
    assert model_stats("vit_b16")["flops"] / 2e9 == pytest.approx(17.56, rel=0.01)
    assert model_stats("swin_t")["flops"] / 2e9 == pytest.approx(4.5, rel=0.01)
    # The CPU attention kernel is counted too: a real CPU model gives the same number as the meta build.
    assert count_flops(create_model("vit_t4")) == model_stats("vit_t4")["flops"]


# --- timm state dict -> ours -> timm: same logits ------------------------------------------------

PARITY = [
    # (our name, our overrides, timm factory): paper variants at 224 and the small variants.
    ("mixer_s32", {}, lambda: timm.create_model("mixer_s32_224")),
    ("mixer_t4", {}, lambda: MlpMixer(img_size=32, patch_size=4, num_blocks=6, embed_dim=128, mlp_ratio=(0.5, 4.0))),
    ("vit_ti16", {}, lambda: timm.create_model("vit_tiny_patch16_224")),
    ("vit_t4", {"global_pool": "avg", "class_token": False},
     lambda: TimmViT(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, global_pool="avg",
                     class_token=False)),
    ("swin_t", {}, lambda: timm.create_model("swin_tiny_patch4_window7_224")),
    ("swin_t_cifar", {}, lambda: TimmSwin(img_size=32, patch_size=2, window_size=4, embed_dim=96,
                                          depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))),
]


@pytest.mark.parametrize("name,overrides,make_timm", PARITY, ids=[p[0] for p in PARITY])
def test_timm_weights_give_same_logits_and_convert_back(name, overrides, make_timm):
    torch.manual_seed(0)
    ref = make_timm().eval()
    sd = _randomize(ref)
    ours = create_model(name, num_classes=1000, **overrides).eval()
    family = get_entry(name).family
    ours.load_state_dict(timm_to_ours(family, sd), strict=True)
    size = ours.input_spec["img_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = ref(x)
        assert (ours(x) - expected).abs().max().item() <= 1e-5
        assert expected.abs().max().item() > 0.1  # not a trivially zero output
        # ...and back: our weights load into a fresh timm model with the same result.
        back = make_timm().eval()
        back.load_state_dict(ours_to_timm(family, ours.state_dict()), strict=True)
        assert (back(x) - expected).abs().max().item() <= 1e-5


def test_vit_other_input_size_resamples_pos_embed_like_timm():
    ref = TimmViT(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, dynamic_img_size=True).eval()
    ours = create_model("vit_t4", num_classes=1000, embed_dim=64, depth=2, num_heads=2, mlp_dim=256).eval()
    ours.load_state_dict(timm_to_ours("vit", _randomize(ref)))
    x = torch.randn(2, 3, 48, 48)  # a 12x12 grid for an 8x8 position embedding
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


# --- every variant trains: forward + backward, all parameters get a gradient ---------------------

def _tiny(name: str) -> dict:
    """Overrides that keep a variant's structure (patch, windows, pooling) but make it cheap."""
    e = get_entry(name)
    if not e.paper:
        return {}  # the small-image variants run as they are
    if e.family == "mixer":
        return dict(img_size=2 * e.kwargs["patch_size"], hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=64,
                    num_blocks=2)
    if e.family == "vit":
        return dict(img_size=2 * e.kwargs["patch_size"], embed_dim=32, depth=2, num_heads=2)
    return dict(embed_dim=24, depths=(2, 2, 2, 2))  # swin_t: real 224 px grid and 7x7 shifted windows


@pytest.mark.parametrize("name", [n for f in FAMILIES for n in list_models(family=f)])
def test_variant_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1, **_tiny(name))
    model.reset_classifier(3)  # Mixer zero-inits its head, which would block all other gradients
    size = model.input_spec["img_size"]
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 3)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    # Non-zero too, except Mixer's token-MLP output bias: it adds a per-token constant across channels,
    # which the next LayerNorm removes, so its exact gradient is 0 (in timm's Mixer as well).
    zero = [n for n, p in model.named_parameters()
            if not p.grad.abs().sum() > 1e-6 * max(q.grad.abs().max().item() for q in model.parameters())
            and not n.endswith("mlp_tokens.fc2.bias")]
    assert not zero, f"{name}: no gradient for {zero[:5]}"


def test_drop_path_is_active_in_training_only():
    model = create_model("vit_t4", num_classes=3, depth=2, drop_path_rate=0.5)
    model.reset_classifier(3)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        model.train()
        torch.manual_seed(1)
        c = model(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert model.model_kwargs["drop_path_rate"] == 0.5


@pytest.mark.parametrize("name", ["mixer_t4", "vit_t4", "swin_t_cifar"])
def test_fused_cpu_inference_equals_plain_forward(name):
    # Under no_grad on CPU the MLPs and projections run as fused oneDNN kernels (`_layers.py`);
    # with autograd on, the same eval-mode model runs plain PyTorch ops. Both must agree.
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    _randomize(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)  # oneDNN linear+GELU / linear+add kernels
        with plain_ops():
            plain = model(x)  # the reference: module calls, separate adds
    folded = model(x).detach()  # autograd on: residual adds folded into addmm
    assert plain.abs().max().item() > 0.1
    assert (fused - plain).abs().max().item() <= 1e-5 and (folded - plain).abs().max().item() <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape checks
        traced = torch.jit.trace(model, x[:1], check_trace=False)  # what the ONNX exporter records
    graph = str(traced.inlined_graph)
    assert "mkldnn::" not in graph and "aten::linear" in graph


@pytest.mark.parametrize("name,overrides", [("mixer_t4", {}), ("vit_t4", {"depth": 2}),
                                            ("swin_t_cifar", {"embed_dim": 24, "depths": (2, 2, 2, 2)})])
def test_folded_residual_training_gradients_equal_reference(name, overrides):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **overrides).train()
    _randomize(model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])

    def grads():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fast = grads()
    with plain_ops():
        ref = grads()
    # (Mixer's token-MLP output bias has a zero true gradient - the next LayerNorm removes a per-token
    # constant - so it is compared in absolute terms.)
    bad = [n for n in ref if not torch.allclose(fast[n], ref[n], rtol=1e-4, atol=1e-7)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("name,overrides", [("mixer_t4", {"num_blocks": 2}), ("vit_t4", {"depth": 2}),
                                            ("swin_t_cifar", {"embed_dim": 24, "depths": (2, 2, 2, 2)})])
def test_bf16_autocast_paths(name, overrides):
    # The AMP path (bf16 autocast, as on CUDA) must skip the float32-only fused/folded kernels.
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **overrides)
    _randomize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
        assert (low - model(x)).abs().max().item() < 0.05


# --- configs, sizes, errors ----------------------------------------------------------------------

def test_seed002_vit_config_via_kwargs():
    m = create_model("vit_s16", num_classes=10, img_size=32, patch_size=8, embed_dim=128, depth=3, num_heads=2,
                     mlp_dim=256)
    assert m.pos_embed.shape == (1, 1 + 16, 128) and len(m.blocks) == 3
    assert m.blocks[0].attn.num_heads == 2 and m.blocks[0].mlp.fc1.weight.shape == (256, 128)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10) and m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 128)


def test_small_variant_configs():
    t4 = create_model("mixer_t4", num_classes=10)
    assert t4.stem.patch_size == (4, 4) and len(t4.blocks) == 6 and t4.num_features == 128
    assert t4.blocks[0].mlp_tokens.fc1.weight.shape == (64, 64)  # D_S x S at 32 px
    assert t4.blocks[0].mlp_channels.fc1.weight.shape == (512, 128)  # D_C x C
    assert create_model("mixer_t4", num_classes=10, in_chans=1, img_size=28).blocks[0].mlp_tokens.fc1.weight.shape \
        == (64, 49)
    v = create_model("vit_t4", num_classes=10)
    blk = v.blocks[0]
    assert (v.embed_dim, len(v.blocks), blk.attn.num_heads, blk.mlp.fc1.out_features) == (192, 6, 3, 768)
    s = create_model("swin_t_cifar", num_classes=10)
    assert s.patch_embed.patch_size == (2, 2) and s.layers[0].blocks[1].window == 4 and s.layers[0].blocks[1].shift == 2


def test_swin_rejects_grids_that_do_not_divide():
    with pytest.raises(ValueError, match=r"img_size 28 .*use img_size 16 or 32"):
        create_model("swin_t_cifar", num_classes=10, img_size=28)
    with pytest.raises(ValueError, match="use img_size 224"):
        create_model("swin_t", img_size=200)


def test_swin_shift_mask_matches_timm():
    ours = create_model("swin_t_cifar", num_classes=10, embed_dim=24, depths=(2, 2, 2, 2))
    ref = TimmSwin(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2, 2, 2),
                   num_heads=(3, 6, 12, 24))
    mask = ours.layers[0].attn_mask
    assert torch.equal(mask, ref.layers[0].blocks[1].attn_mask)
    assert (mask == -100).any() and (mask == 0).any()


def test_patch_size_must_divide_image():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        create_model("mixer_t4", num_classes=10, img_size=30)
    m = create_model("mixer_t4", num_classes=10)
    with pytest.raises(ValueError, match="built for 32x32"):
        m(torch.randn(1, 3, 28, 28))


def test_contract_input_spec_and_reset():
    for name in ("mixer_t4", "vit_t4", "swin_t_cifar"):
        m = create_model(name, num_classes=5, in_chans=1)
        assert m.input_spec == {"img_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.5]}
        m.reset_classifier(7)
        assert m(torch.randn(1, 1, 32, 32)).shape == (1, 7) and m.num_classes == 7
        rebuilt = create_model(m.model_name, num_classes=7, in_chans=1, **m.model_kwargs)
        rebuilt.load_state_dict(m.state_dict(), strict=True)


# --- summary and CLI -----------------------------------------------------------------------------

def test_summary_rows_sum_to_total_params():
    m = create_model("mixer_t4", num_classes=10)
    rows = summarize(m, (3, 32, 32))
    assert sum(r.params for r in rows) == count_params(m)
    by_name = {r.name: r for r in rows}
    assert by_name["stem"].output_shape == "[64, B, 128]"  # Mixer runs token-major: (S, B, C)
    assert by_name["blocks.0.mlp_tokens.fc1"].params == 64 * 64 + 64  # W1 (D_S x S) + b1
    assert by_name["blocks.0.mlp_channels.fc1"].output_shape == "[64, B, 512]"  # token-major inside
    assert by_name["head"].output_shape == "[B, 10]"


def test_cli_models_list_and_summary(capsys):
    assert main(["models", "mixer_*"]) == 0
    out = capsys.readouterr().out
    assert "mixer_b16" in out and "59.88M" in out and "25.20" in out and "vit_b16" not in out
    assert main(["models", "--family", "swin"]) == 0
    assert "swin_t_cifar" in capsys.readouterr().out
    assert main(["models", "summary", "vit_t4", "--num-classes", "10", "--in-chans", "1"]) == 0
    out = capsys.readouterr().out
    assert "blocks.5.mlp.fc2" in out and "Total params: 2,687,434" in out


def test_cli_models_errors(capsys):
    assert main(["models", "summary", "mixr_t4"]) == 2
    assert "closest: mixer_t4" in capsys.readouterr().err
    assert main(["models", "summary", "swin_t_cifar", "--img-size", "28"]) == 2
    assert "use img_size 16 or 32" in capsys.readouterr().err
    with pytest.raises(UserError):
        create_model("vit_t4", num_classes=3, no_such_option=1)
