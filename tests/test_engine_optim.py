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
