"""State-dict conversion between timm's key layout and ours, in one place.

`CONVERTERS[family] = (timm_to_ours, ours_to_timm)`; each maps a state dict to a state dict.
Families whose module names already match timm's use `_identity`.
"""

from __future__ import annotations


def _identity(sd: dict) -> dict:
    return dict(sd)


def _rename(pairs):
    """Converter pair that renames key prefixes (timm prefix -> ours) one way and back the other."""

    def swap(sd: dict, frm: int) -> dict:
        out = {}
        for k, v in sd.items():
            for pair in pairs:
                if k.startswith(pair[frm]):
                    k = pair[1 - frm] + k[len(pair[frm]):]
                    break
            out[k] = v
        return out

    return (lambda sd: swap(sd, 0), lambda sd: swap(sd, 1))


CONVERTERS: dict = {
    "mlp": (_identity, _identity),
    "mixer": (_identity, _identity),  # same names and shapes (token MLP weights are (D_S, S) in both)
    "vit": (_identity, _identity),
    "swin": _rename([("head.fc.", "head.")]),  # timm wraps the head in a ClassifierHead
    "convnext": _rename([("head.fc.", "head."), ("head.norm.", "head_norm.")]),  # timm: NormMlpClassifierHead
    "resnet": _rename([("fc.", "head.")]),
    "mobilenet": _rename([("classifier.", "head.")]),  # timm's EfficientNet class
}


def timm_to_ours(family: str, sd: dict) -> dict:
    if family not in CONVERTERS:
        raise ValueError(f"no timm key conversion for family {family!r}")
    return CONVERTERS[family][0](sd)


def ours_to_timm(family: str, sd: dict) -> dict:
    if family not in CONVERTERS:
        raise ValueError(f"no timm key conversion for family {family!r}")
    return CONVERTERS[family][1](sd)
