"""Exponential moving average of model weights (as timm's ModelEmaV2), evaluated for the best checkpoint.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the average is useful
after a few hundred steps instead of being dominated by the random initialisation on short runs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from imgarena.checkpoint import unwrap_model


class ModelEma:
    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        src = unwrap_model(model).state_dict()
        floats_e, floats_m = [], []
        for k, e in self.module.state_dict().items():
            m = src[k]
            if e.is_floating_point():
                floats_e.append(e)
                floats_m.append(m.detach())
            else:
                e.copy_(m)  # integer buffers (e.g. BatchNorm's num_batches_tracked) are copied
        if floats_e:
            torch._foreach_lerp_(floats_e, floats_m, 1.0 - d)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
