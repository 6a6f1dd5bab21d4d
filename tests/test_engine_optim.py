"""Optimizer defaults, weight-decay groups, per-step schedules, EMA and loss pieces."""

import math

import pytest
import torch
from torch import nn

from imgarena.engine.ema import ModelEma
from imgarena.engine.loop import StepSettings, compute_loss
from imgarena.engine.optim import Schedule, build_optimizer, param_groups, resolve_lr, resolve_weight_decay
from imgarena.engine.state import step_seed
from imgarena.errors import UserError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.fc(x + self.pos_embed).mean(1)))

    def no_weight_decay(self):
        return {"pos_embed"}


def test_lr_defaults_scale_with_batch():
    assert resolve_lr("adamw", None, 256) == pytest.approx(1e-3)
    assert resolve_lr("adamw", None, 64) == pytest.approx(2.5e-4)
    assert resolve_lr("sgd", None, 512) == pytest.approx(0.2)
    assert resolve_lr("sgd", 0.03, 512) == 0.03  # an explicit lr is never rescaled
    assert resolve_weight_decay("adamw", None) == 0.05 and resolve_weight_decay("adam", None) == 0.0
    with pytest.raises(UserError):
        resolve_lr("lamb", None, 128)


def test_no_decay_on_norms_biases_embeddings():
    m = Tiny()
    groups = param_groups(m, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in decayed}
    assert names == {"fc.weight", "head.weight"}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 5
    opt = build_optimizer(m, "sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


# The substring rule optim.py used before weight decay went by parameter kind (ndim <= 1, or named
# by the model's no_weight_decay()): every registered family must get the same groups as then.
_OLD_NO_DECAY = ("pos_embed", "cls_token", "dist_token", "mask_token", "absolute_pos_embed",
                 "relative_position_bias_table", "pos_emb", "position_embedding")


def _old_rule(name, p):
    return p.ndim <= 1 or any(n in name for n in _OLD_NO_DECAY)


def test_weight_decay_by_kind_matches_the_old_name_rule_for_every_family():
    from imgarena.models import create_model, list_models
    from imgarena.models._registry import get_entry

    families = {}
    for name in list_models():
        families.setdefault(get_entry(name).family, name)  # the first variant of each family
    families["vit_distilled"] = "vit_t7"
    assert {"cnn", "mlp", "mixer", "vit", "convnext", "resnet", "mobilenet", "swin"} <= set(families)
    for key, name in [*families.items(), ("timm", "timm/vit_tiny_patch16_224"), ("timm_swin", "timm/swin_tiny_patch4_window7_224")]:
        kw = {"distilled": True} if key == "vit_distilled" else {}
        with torch.device("meta"):
            m = create_model(name, num_classes=3, **kw)
        groups = param_groups(m, 0.05)
        new = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        old = {id(p) for n, p in m.named_parameters() if _old_rule(n, p)}
        assert new == old, name
        assert [g["name"] for g in groups] == ["all", "all_no_decay"]


def _vit(**kw):
    from imgarena.models import create_model

    torch.manual_seed(0)
    return create_model("vit_t7", num_classes=3, depth=3, embed_dim=32, num_heads=2, mlp_dim=64, **kw)


def test_layer_decay_groups_carry_exact_lrs():
    """BEiT/timm layer decay on a 3-block ViT: layers stem 0, blocks 1-3, head 4 (fc_norm joins the
    head's layer as in timm); lr_backbone multiplies every non-classifier group."""
    m = _vit()
    groups = param_groups(m, 0.05, lr=1e-3, layer_decay=0.5, lr_backbone=0.1)
    by = {g["name"]: g for g in groups}
    expect = {"layer_0": 1e-3 * 0.1 * 0.5 ** 4, "layer_1": 1e-3 * 0.1 * 0.5 ** 3, "layer_2": 1e-3 * 0.1 * 0.5 ** 2,
              "layer_3": 1e-3 * 0.1 * 0.5, "layer_4_no_decay": 1e-3 * 0.1, "head": 1e-3}
    for name, lr in expect.items():
        assert by[name]["lr"] == pytest.approx(lr, rel=1e-12), name
    names = {n for n, p in m.named_parameters()}
    where = {n: g["name"] for g in groups for n, p in m.named_parameters() if any(p is q for q in g["params"])}
    assert where["pos_embed"] == "layer_0_no_decay" and where["patch_embed.proj.weight"] == "layer_0"
    assert where["blocks.2.attn.qkv.weight"] == "layer_3" and where["blocks.0.norm1.weight"] == "layer_1_no_decay"
    assert where["fc_norm.weight"] == "layer_4_no_decay" and where["head.weight"] == "head"
    assert where["head.bias"] == "head_no_decay" and set(where) == names
    assert by["layer_2"]["layer_id"] == 2 and by["head"]["lr_scale"] == 1.0
    # the optimizer keeps them, and the schedule scales all alike
    opt = build_optimizer(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5, lr_backbone=0.1)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["layer_0"] == pytest.approx(1e-3 * 0.1 / 16) and lrs["head"] == pytest.approx(1e-3)
    sched = Schedule(opt, "cosine", steps_per_epoch=4, epochs=2)
    sched.apply(4)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["layer_1"] == pytest.approx(lrs["layer_1"] * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_mixer_layer_ids_follow_timm():
    from imgarena.models import create_model
    from imgarena.models._base import layer_ids

    with torch.device("meta"):
        m = create_model("mixer_t7", num_classes=3, num_blocks=2)
    ids = layer_ids(m)
    assert ids["stem.proj.weight"] == 0 and ids["blocks.0.norm1.weight"] == 1 and ids["blocks.1.mlp_tokens.fc1.weight"] == 2
    assert ids["norm.weight"] == 2 and ids["head.weight"] == 3  # the final norm joins the last block, as in timm
    groups = {g["name"]: g["lr"] for g in param_groups(m, 0.05, lr=1.0, layer_decay=0.75)}
    assert groups == pytest.approx({"layer_0": 0.75 ** 3, "layer_0_no_decay": 0.75 ** 3, "layer_1": 0.75 ** 2,
                                    "layer_1_no_decay": 0.75 ** 2, "layer_2": 0.75, "layer_2_no_decay": 0.75,
                                    "head": 1.0, "head_no_decay": 1.0})


def test_timm_wrapper_delegates_grouping():
    import timm

    from imgarena.models import create_model
    from imgarena.models._base import layer_ids

    with torch.device("meta"):
        ours = create_model("timm/resnet18", num_classes=3)
        theirs = timm.create_model("resnet18", num_classes=3)
    from timm.models._manipulate import group_parameters

    expect = group_parameters(theirs, theirs.group_matcher(), reverse=True)
    assert layer_ids(ours) == {f"model.{k}": v for k, v in expect.items()}


def test_two_stage_schedule_restarts_at_the_switch():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = Schedule(opt, "cosine", steps_per_epoch=10, epochs=4, warmup_epochs=0.5, restart_epoch=1)
    lrs = [s.apply(i) for i in range(40)]
    assert lrs[:5] == pytest.approx([(i + 1) / 5 for i in range(5)])  # stage one: warmup over its half epoch ...
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 5)))  # ... and its own anneal
    assert lrs[10:15] == pytest.approx([(i + 1) / 5 for i in range(5)])  # the backbone joins: warmup again
    assert lrs[39] == pytest.approx(0.5 * (1 + math.cos(math.pi * 24 / 25)))
    again = Schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), "cosine", steps_per_epoch=10,
                     epochs=4)
    again.load_state_dict(s.state_dict())  # a resumed run keeps the saved switch
    assert [again.factor(i) for i in range(40)] == pytest.approx(lrs)


def _lrs(kind, **kw):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = Schedule(opt, kind, steps_per_epoch=10, epochs=10, **kw)
    return [s.apply(i) for i in range(100)], s


def test_schedules():
    lrs, _ = _lrs("cosine", warmup_epochs=1)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear warmup to the peak
    assert lrs[10] == pytest.approx(1.0) and lrs[99] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then monotone decay
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    step, _ = _lrs("step", step_size=3, gamma=0.1)
    assert step[29] == pytest.approx(1.0) and step[30] == pytest.approx(0.1) and step[60] == pytest.approx(0.01)
    one, s = _lrs("onecycle")
    assert s.warmup == 30 and one[0] == pytest.approx(1 / 25 + (1 - 1 / 25) / 30) and max(one) == pytest.approx(1.0)
    const, _ = _lrs("constant")
    assert set(const) == {1.0}
    # a time budget anneals by the share of the budget used when that is ahead of the step count
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    timed = Schedule(opt, "cosine", steps_per_epoch=10, epochs=1000)
    assert timed.apply(5, time_frac=0.5) == pytest.approx(0.5)
    assert timed.apply(5, time_frac=1.0) == pytest.approx(0.0)


def test_ema_tracks_weights():
    m = nn.Linear(2, 1)
    ema = ModelEma(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.fill_(1.0)
    before = ema.module.weight.clone()
    ema.update(m)  # decay warms up: min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, before * d + 1.0 * (1 - d))
    assert not ema.module.weight.requires_grad
    state = ema.state_dict()
    ema2 = ModelEma(nn.Linear(2, 1), decay=0.5)
    ema2.load_state_dict(state)
    assert torch.equal(ema2.module.weight, ema.module.weight) and ema2.updates == 1


def test_losses_soft_and_weighted():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    s = StepSettings(device=torch.device("cpu"), num_classes=2, label_smoothing=0.2)
    hard = compute_loss(logits, y, s)
    soft = compute_loss(logits, torch.tensor([[0.9, 0.1], [0.1, 0.9]]), s)  # smoothing 0.2 over 2 classes
    assert torch.allclose(hard, soft)
    w = StepSettings(device=torch.device("cpu"), num_classes=2, class_weights=torch.tensor([0.0, 1.0]))
    assert torch.allclose(compute_loss(logits, y, w), torch.nn.functional.cross_entropy(logits[1:], y[1:]))


def test_step_seeds_distinct():
    seeds = {step_seed(0, e, s, r) for e in range(3) for s in range(50) for r in range(2)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)
    assert step_seed(1, 0, 0) != step_seed(0, 0, 0)
