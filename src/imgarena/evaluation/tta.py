"""Test-time augmentation: average a model's logits over a few views of each (normalized) batch.

Levels, each a superset of the previous one:
  none       1 view   the image as is
  flip       2 views  + horizontal mirror
  crop       7 views  flip + four corner crops and a centre crop (87.5% of the side, resized back)
  flip-crop 12 views  crop + the mirror of every crop

Crops are resized back to the input size because many models (Mixer, ViT, Swin) accept only the
size they were built for, with the checkpoint's interpolation (preprocessing "interpolation",
bilinear when absent). Logits are averaged (not probabilities) so the result is still logits and
callers apply softmax / cross-entropy as usual. Shared by `imgarena predict --tta` and `imgarena eval --tta`.
torch is imported inside the functions that need it, so the CLI can check a mode without it.
"""

from __future__ import annotations

from imgarena.errors import UserError

from imgarena.config import TTA_MODES  # noqa: E402,F401  (one copy of the choice list)
CROP_SCALE = 0.875  # the usual 224/256 centre-crop ratio


def parse_tta(mode) -> str:
    """Normalize a TTA request: a mode name, True (-> flip), False/None/'' (-> none) or a level 0..3."""
    if mode is None or mode is False or mode == "":
        return "none"
    if mode is True:
        return "flip"
    if isinstance(mode, int) and 0 <= mode < len(TTA_MODES):
        return TTA_MODES[mode]
    name = str(mode).strip().lower().replace("_", "-")
    if name.isdigit() and int(name) < len(TTA_MODES):
        return TTA_MODES[int(name)]
    if name in TTA_MODES:
        return name
    raise UserError(f"unknown TTA mode {mode!r}: use one of {', '.join(TTA_MODES)}")


def num_views(mode) -> int:
    return {"none": 1, "flip": 2, "crop": 7, "flip-crop": 12}[parse_tta(mode)]


def _crops(x, interpolation: str = "bilinear"):
    """Four corner crops and a centre crop at CROP_SCALE, each resized back to x's size."""
    import torch.nn.functional as F

    from imgarena.config import INTERPOLATIONS  # the preprocessing names are F.interpolate's modes too

    mode = interpolation or "bilinear"
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    smooth = {"align_corners": False} if mode != "nearest" else {}

    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * CROP_SCALE)), max(1, round(w * CROP_SCALE))
    tops = (0, 0, h - ch, h - ch, (h - ch) // 2)
    lefts = (0, w - cw, 0, w - cw, (w - cw) // 2)
    out = []
    for t, l in zip(tops, lefts):
        crop = x[..., t:t + ch, l:l + cw]
        out.append(F.interpolate(crop, size=(h, w), mode=mode, **smooth))
    return out


def tta_views(x, mode, interpolation: str = "bilinear") -> list:
    """The views of batch x (B, C, H, W) that `mode` averages over; the first is always x itself."""
    mode = parse_tta(mode)
    if mode == "none":
        return [x]
    views = [x, x.flip(-1)]
    if mode in ("crop", "flip-crop"):
        crops = _crops(x, interpolation)
        views += crops
        if mode == "flip-crop":
            views += [c.flip(-1) for c in crops]
    return views


def tta_logits(model, x, mode="none", *, interpolation: str = "bilinear"):
    """Mean logits of `model` over the TTA views of x. Call under torch.inference_mode() for speed.

    Views run one at a time (not concatenated) so memory stays that of a single batch.
    """
    views = tta_views(x, mode, interpolation)
    total = None
    for v in views:
        out = model(v).float()
        total = out if total is None else total + out
    return total / len(views)
