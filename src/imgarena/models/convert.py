"""State-dict conversion between timm's key layout and ours, in one place.

`CONVERTERS[family] = (timm_to_ours, ours_to_timm)`; each maps a state dict to a state dict.
Families whose module names already match timm's use `_identity`.
"""

from __future__ import annotations


def _identity(sd: dict) -> dict:
    return dict(sd)


CONVERTERS: dict = {
    "mlp": (_identity, _identity),
}


def timm_to_ours(family: str, sd: dict) -> dict:
    if family not in CONVERTERS:
        raise ValueError(f"no timm key conversion for family {family!r}")
    return CONVERTERS[family][0](sd)


def ours_to_timm(family: str, sd: dict) -> dict:
    if family not in CONVERTERS:
        raise ValueError(f"no timm key conversion for family {family!r}")
    return CONVERTERS[family][1](sd)
