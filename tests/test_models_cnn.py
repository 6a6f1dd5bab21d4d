"""ConvNeXt, ResNet, MobileNet and the plain CNN: parameter counts and logits against timm, the shared contract,
gradients for every registered variant, and the CPU inference fast path against the reference path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm
from imgarena.errors import UserError
from imgarena.models import _fastpaths, create_model, get_entry, list_models
from imgarena.models.convert import ours_to_timm, timm_to_ours

FAMILIES = ("convnext", "resnet", "mobilenet", "cnn")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- parameter counts at 224 px / 1000 classes, built on the meta device (no memory, no init cost) ----

PARAM_CASES = [  # (ours, overrides, timm name, published count in M: issue #3 / the papers' tables)
    ("convnext_atto", {}, "convnext_atto", None),
    ("convnext_femto", {}, "convnext_femto", None),
    ("convnext_pico", {}, "convnext_pico", None),
    ("convnext_nano", {}, "convnext_nano", None),
    ("convnext_t", {}, "convnext_tiny", 28.59),
    ("convnext_s", {}, "convnext_small", 50.22),
    ("convnext_b", {}, "convnext_base", 88.59),
    ("convnext_l", {}, "convnext_large", 197.77),
    ("resnet18", {}, "resnet18", 11.69),
    ("resnet34", {}, "resnet34", 21.80),
    ("resnet50", {}, "resnet50", 25.56),
    ("mobilenetv1", {}, "mobilenetv1_100", 4.23),
    ("mobilenetv1", {"width": 1.25}, "mobilenetv1_125", None),
    ("mobilenetv2", {}, "mobilenetv2_100", 3.50),
    ("mobilenetv2", {"width": 0.5}, "mobilenetv2_050", None),
    ("mobilenetv2", {"width": 1.4}, "mobilenetv2_140", None),
]


@pytest.mark.parametrize("name,overrides,timm_name,paper_m", PARAM_CASES,
                         ids=[c[0] + "".join(f"-{k}{v}" for k, v in c[1].items()) for c in PARAM_CASES])
def test_param_count_equals_timm(name, overrides, timm_name, paper_m):
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000, **overrides)
        ref = timm.create_model(timm_name, num_classes=1000)
    assert n_params(ours) == n_params(ref)
    if paper_m is not None:
        assert round(n_params(ours) / 1e6, 2) == paper_m
    if not overrides:
        assert get_entry(name).timm_name == timm_name


def test_registered_variants():
    assert set(list_models(family="convnext")) == {
        "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_t", "convnext_s",
        "convnext_b", "convnext_l", "convnext_atto_cifar", "convnext_t_cifar"}
    assert set(list_models(family="resnet")) == {"resnet18", "resnet34", "resnet50", "resnet18_cifar",
                                                 "resnet50_cifar"}
    assert set(list_models(family="mobilenet")) == {"mobilenetv1", "mobilenetv2", "mobilenetv2_cifar"}
    assert set(list_models(family="cnn")) == {"cnn_s", "cnn_m"}
    assert {n for f in FAMILIES for n in list_models(family=f) if get_entry(n).paper} == {
        "convnext_t", "convnext_s", "convnext_b", "convnext_l", "resnet18", "resnet34", "resnet50",
        "mobilenetv1", "mobilenetv2"}


# --- timm state dict -> ours: same logits; ours -> timm: loads and gives the same logits ------------

def timm_twin(name: str) -> nn.Module:
    """timm's model of the same config as our variant `name` (small stems patched in where timm has none)."""
    torch.manual_seed(0)
    if name == "convnext_atto_cifar":  # seed 003's stem: 2x2 stride 2, stage 1 keeps that resolution
        m = timm.create_model("convnext_atto", num_classes=10)
        m.stem[0] = nn.Conv2d(3, 40, 2, 2)
        return m
    if name == "resnet18_cifar":
        m = timm.create_model("resnet18", num_classes=10, zero_init_last=False)
        m.conv1, m.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        return m
    if name == "mobilenetv2_cifar":
        m = timm.create_model("mobilenetv2_100", num_classes=10)
        m.conv_stem.stride = (1, 1)
        return m
    extra = {"zero_init_last": False} if get_entry(name).family == "resnet" else {}
    return timm.create_model(get_entry(name).timm_name, num_classes=10, **extra)


@torch.no_grad()
def randomize(model: nn.Module, img: int) -> None:
    """Non-trivial weights: layer scale and norm affines away from their init (so every block matters),
    BN running statistics measured on random images (so activations stay at a realistic scale)."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
        elif "norm" in name or "bn" in name or "downsample.1" in name:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: the statistics of this one batch
    if bns:
        model.train()
        model(torch.randn(8, 3, img, img, generator=g))
        for bn in bns:
            bn.momentum = 0.1
    model.eval()


PARITY = ["convnext_t", "convnext_atto", "convnext_atto_cifar", "resnet18", "resnet50", "resnet18_cifar",
          "mobilenetv1", "mobilenetv2", "mobilenetv2_cifar"]


@pytest.mark.parametrize("name", PARITY)
def test_timm_weights_give_same_logits_both_ways(name):
    family = get_entry(name).family
    img = 32 if name.endswith("_cifar") else 64
    ref = timm_twin(name)
    randomize(ref, img)
    with torch.device("meta"):  # no init cost: every tensor comes from timm's state dict
        ours = create_model(name, num_classes=10)
    ours.load_state_dict(timm_to_ours(family, ref.state_dict()), strict=True, assign=True)
    ours.eval()
    x = torch.randn(4, 3, img, img, generator=torch.Generator().manual_seed(2))
    # Our ResNet/MobileNet run channels-last; timm given a channels-last input runs the same oneDNN
    # kernels, so the comparison isolates the architecture and the weight mapping from the
    # memory-format-dependent fp32 summation order (timm vs timm across formats differs by ~2e-5).
    x_ref = x if family == "convnext" else x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = ref(x_ref)
    with torch.enable_grad():  # the reference (autograd) path
        got = ours(x)
    assert got.shape == (4, 10)
    assert (got - expected).abs().max().item() <= 1e-5
    with torch.inference_mode():  # the fused CPU inference path: BN folding changes fp32 rounding
        fused = ours(x)
    assert (fused - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item()) * 10

    with torch.device("meta"):
        back = timm_twin(name)  # an empty timm model, filled from ours converted back
    back.load_state_dict(ours_to_timm(family, ours.state_dict()), strict=True, assign=True)
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(x_ref), expected)


# --- every registered variant: forward + backward, every parameter gets a gradient -----------------

def _tiny_overrides(name: str) -> dict:
    extra = {"zero_init_last": False} if get_entry(name).family == "resnet" else {}  # else branches get 0 grad
    with torch.device("meta"):
        big = n_params(create_model(name, num_classes=3)) > 40e6
    if big:  # convnext_s/b/l: the variant's widths, one block per stage
        extra["depths"] = (1, 1, 1, 1)
    if get_entry(name).family == "cnn":  # its flattening head is built for one input size
        extra["img_size"] = 32
    return extra


@pytest.mark.parametrize("name", [n for f in FAMILIES for n in list_models(family=f)])
def test_forward_backward_every_parameter_gets_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **_tiny_overrides(name))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    out = model.train()(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # In train mode a BN bias that reaches the loss only through linear layers and another BN gets
    # an exactly-zero gradient (the next BN subtracts the batch mean), e.g. MobileNetV2's linear
    # bottlenecks. In eval mode (BN as a fixed affine map) every parameter must move the loss.
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model.eval()(x), y).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient for {dead[:5]}"


# --- the contract ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,img,feat_shape", [
    ("convnext_atto", 64, (320, 2, 2)),
    ("convnext_atto_cifar", 32, (320, 2, 2)),  # 2x2 stem: 16, 8, 4, 2
    ("resnet18", 64, (512, 2, 2)),
    ("resnet18_cifar", 32, (512, 4, 4)),  # 3x3 stride-1 stem, no max-pool: 32, 16, 8, 4
    ("mobilenetv1", 64, (1024, 2, 2)),
    ("mobilenetv2_cifar", 32, (1280, 2, 2)),  # stride-1 first conv
])
def test_contract(name, img, feat_shape):
    model = create_model(name, num_classes=5, in_chans=1).eval()
    x = torch.randn(2, 1, img, img)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, *feat_shape)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        assert model.forward_head(feats).shape == (2, 5) and model.num_classes == 5
        assert isinstance(model.head, nn.Linear) and model.num_features == feat_shape[0]
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(0)
        assert isinstance(model.head, nn.Identity) and model(x).shape == (2, feat_shape[0])
    spec = model.input_spec
    assert spec["in_chans"] == 1 and spec["img_size"] == (32 if name.endswith("_cifar") else 224)
    assert model.model_name == name


def test_plain_cnn_shapes_contract_and_parameters():
    model = create_model("cnn_s", num_classes=10, in_chans=1, img_size=28).eval()
    # conv 1->32 (288) + BN (64), conv 32->64 (18,432) + BN (128), fc 64*7*7->256 (803,072),
    # BN1d (512), head 256->10 (2,570)
    assert n_params(model) == 288 + 64 + 18_432 + 128 + 3136 * 256 + 256 + 512 + 2570
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64, 7, 7)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features) == (2, 256)
        assert model(x).shape == (2, 10)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.num_classes == 3
    assert model.input_spec["img_size"] == 28 and model.model_name == "cnn_s"
    m = create_model("cnn_m", num_classes=4, img_size=32)
    assert m.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 128, 4, 4) and m.fc.in_features == 128 * 16
    with pytest.raises(UserError, match="drop_path"):
        create_model("cnn_s", num_classes=3, drop_path_rate=0.1)
    with pytest.raises(UserError, match="at least 8 px"):
        create_model("cnn_m", num_classes=3, img_size=4)


@pytest.mark.parametrize("name", ["cnn_s", "resnet18_cifar", "mobilenetv2_cifar"])
def test_grayscale_input_runs_channels_last(name):
    """A (B, 1, H, W) batch has NCHW strides that contiguous(channels_last) keeps; the ConvNets must
    still run NHWC (convolutions choose their layout from the strides: NCHW was 1.7x slower here)."""
    kw = {"widths": (8, 16), "layers": (1, 1), "stem_width": 8} if name.startswith("resnet") else {}
    model = create_model(name, num_classes=3, in_chans=1, img_size=28, **kw)
    x = torch.randn(2, 1, 28, 28)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) != 1  # the trap
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    seen = []
    stem.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].stride(1), out.stride(1))))
    model(x)
    assert seen == [(1, 1)]  # input restrided to NHWC, so the first conv's output is NHWC too


def test_convnext_layer_scale_and_stochastic_depth():
    model = create_model("convnext_atto", num_classes=3, drop_path_rate=0.2)
    blocks = [b for s in model.stages for b in s.blocks]
    assert all(torch.all(b.gamma == 1e-6) for b in blocks)  # layer scale init
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert all(b > a for a, b in zip(rates, rates[1:]))  # linear in depth
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropping in eval
        for b in blocks:
            b.gamma.fill_(1.0)  # make the dropped branches visible in the output
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, model(x))


def test_depthwise_conv_weight_gradient_trick():
    from imgarena.models.convnext import _DepthwiseConvFn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.double, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 1, 3, 5, dtype=torch.double, generator=g)
    b = torch.randn(3, dtype=torch.double, generator=g)
    assert torch.autograd.gradcheck(lambda *t: _DepthwiseConvFn.apply(*t, (1, 2)),
                                    (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("hw", [(9, 11), (3, 3), (2, 5), (1, 1)])
def test_depthwise_conv_matches_nn_conv2d(hw):
    """Our conv_dw (cropped kernel on small maps, custom weight gradient) == a plain 7x7 nn.Conv2d, in
    the ConvNeXt layout (a channels-last view of an NHWC tensor), values and all gradients, fp32."""
    from imgarena.models.convnext import DepthwiseConv2d

    g = torch.Generator().manual_seed(0)
    conv = DepthwiseConv2d(16, 7)
    x = torch.randn(4, *hw, 16, generator=g).permute(0, 3, 1, 2).requires_grad_()
    grad_out = torch.randn(4, 16, *hw, generator=g)
    ours = conv(x)
    ours.backward(grad_out)
    got = [t.grad.clone() for t in (x, conv.weight, conv.bias)]
    x.grad = None
    conv.zero_grad()
    ref = nn.Conv2d.forward(conv, x)
    ref.backward(grad_out)
    assert (ours - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    for a, e in zip(got, (x.grad, conv.weight.grad, conv.bias.grad)):
        assert (a - e).abs().max().item() <= 1e-5 * e.abs().max().item()
    with torch.no_grad():
        assert (conv(x) - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_bad_options_fail_with_a_message():
    with pytest.raises(UserError, match="resnet18"):
        create_model("resnet18", num_classes=3, depth=3)  # not a ResNet option
    with pytest.raises(ValueError, match="stem"):
        create_model("convnext_t", num_classes=3, stem="tiny")
    with pytest.raises(ValueError, match="version"):
        create_model("mobilenetv2", num_classes=3, version=3)
    with pytest.raises(UserError, match="at least 32 px"):
        create_model("convnext_t", num_classes=3, img_size=28)  # 4x4 stem: 7, 3, 1, then nothing to downsample
    assert create_model("convnext_atto_cifar", num_classes=3, img_size=28)(torch.randn(1, 3, 28, 28)).shape == (1, 3)
    model = create_model("convnext_atto", num_classes=3).eval()
    with pytest.raises(ValueError, match="smaller than"):
        model(torch.randn(1, 3, 16, 16))


# --- CPU fast paths (_fastpaths.py) -------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not _fastpaths._AVAILABLE, reason="this torch build has no oneDNN fused ops")


@pytest.mark.parametrize("cfg", [
    dict(k=3, s=1, p=1, hw=(1, 1)),  # ResNet stage 4 at 32 px: only the centre tap sees the pixel
    dict(k=3, s=2, p=1, hw=(2, 2)),  # the stride-2 conv into it: 2x2 taps of 3x3
    dict(k=1, s=2, p=0, hw=(2, 2)),  # the projection shortcut
    dict(k=3, s=1, p=1, hw=(1, 1), groups=True),  # MobileNet depthwise on a 1x1 map
    dict(k=3, s=2, p=1, hw=(2, 3), groups=True),
    dict(k=3, s=1, p=1, hw=(3, 3)),  # output 3x3: the plain conv
])
def test_small_map_conv_matches_nn_conv2d(cfg):
    from imgarena.models._fastpaths import SmallMapConv2d

    torch.manual_seed(0)
    cin, cout = (8, 8) if cfg.get("groups") else (6, 5)
    conv = SmallMapConv2d(cin, cout, cfg["k"], stride=cfg["s"], padding=cfg["p"], groups=cin if cfg.get("groups") else 1)
    x = torch.randn(3, cin, *cfg["hw"]).contiguous(memory_format=torch.channels_last).requires_grad_()
    ours = conv(x)
    ours.square().sum().backward()
    got = [x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()]
    x.grad = None
    conv.zero_grad()
    ref = nn.Conv2d.forward(conv, x)
    ref.square().sum().backward()
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-5
    for a, e in zip(got, (x.grad, conv.weight.grad, conv.bias.grad)):
        assert (a - e).abs().max().item() <= 1e-5 * max(1.0, e.abs().max().item())


@pytest.mark.parametrize("name,overrides", [
    ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),  # 32 px: 8, 4, 2, 1 (cropped kernels)
    ("resnet18", dict(widths=(8, 16, 32, 64), stem_width=8)),  # 32 px: stage 4 is 1x1 (SmallMapConv2d)
    ("mobilenetv2", dict(width=0.25)),
])
def test_onnx_export_of_tiny_maps_matches(name, overrides, tmp_path):
    """The small-map shortcuts step aside while tracing: ONNX gets plain convs and the same logits."""
    import warnings

    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **overrides).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})  # as `imgarena export` does
        expected = model(x).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x.numpy()})[0]
    assert abs(got - expected).max() <= 1e-4


@needs_onednn
def test_fast_path_only_when_allowed():
    x = torch.zeros(1, 3, 4, 4)
    with torch.no_grad():
        assert _fastpaths.fast_path_ok(x)
        assert not _fastpaths.fast_path_ok(x.double())
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False):
            assert not _fastpaths.fast_path_ok(x)  # FLOP counting sees the reference ops
    assert not _fastpaths.fast_path_ok(x)  # autograd on


@needs_onednn
@pytest.mark.parametrize("name,img", [("convnext_atto", 32), ("resnet50", 64), ("mobilenetv1", 32),
                                      ("mobilenetv2_cifar", 32), ("cnn_s", 28)])
def test_fast_path_matches_reference_before_and_after_training(name, img):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **({"zero_init_last": False} if "resnet" in name else {}))
    randomize(model, img)
    x = torch.randn(3, 3, img, img)
    for step in range(2):
        with torch.enable_grad():
            ref = model(x).detach()
        with torch.inference_mode():
            fused = model(x)
        exact = copy.deepcopy(model).double()(x.double()).detach()  # fp64: the reference path
        # Folding BN into the conv rounds differently in fp32, not much worse: compare both to fp64
        # (a real mistake, e.g. a lost residual or activation, is off by the logits' own scale).
        err_ref, err_fused = (ref - exact).abs().max().item(), (fused - exact).abs().max().item()
        assert err_fused <= max(4 * err_ref, 1e-5 * exact.abs().max().item()), (err_fused, err_ref)
        # A training step (weights and BN statistics change in place), then the same check again.
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        F.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
        opt.step()
        model.eval()
