"""Batched augmentation on the training device, with per-sample random parameters.

Plain torch ops (chosen by measurement over torchvision v2 and kornia; see README "Your data" and
benchmarks/data_pipeline.py --augment-choice). Every function takes images as float (B, C, H, W) in
0..1 and a torch.Generator on the images' device; all randomness comes from that generator, so the
loader can make it a pure function of (seed, epoch, step).

Presets:
- none
- flip: horizontal flip only (no shifts: patch models on small centred images, e.g. Fashion-MNIST,
  learn shifted patches slowly; benchmarks/time_to_accuracy.py)
- light: horizontal flip + pad-4-and-random-crop (seed 003's CIFAR recipe)
- standard: seed 000's Albumentations set, same limits and probabilities (ShiftScaleRotate 0.0625/0.2/45
  reflect p=.3, RandomGamma 85-150 p=.3, RandomBrightnessContrast .5/.5 p=.4, CoarseDropout 1-4 holes of
  22-45% of the side p=.4) plus horizontal flip
- strong: standard + a RandAugment-like policy (2 ops per sample) + random erasing (p=.25)
- photo: for images stored larger than the training size (crop_pct < 1) and pretrained weights:
  RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, as torchvision) to the output size, horizontal
  flip (both one grid_sample), colour jitter (brightness/contrast/saturation 0.4, timm's default)

Every preset but photo sees the centre crop of the stored images at the output size (the eval view).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from imgarena.config import AUGMENT_PRESETS as PRESETS  # one list for the CLI (torch-free) and the loader


def _u(gen, n, lo=0.0, hi=1.0):
    return torch.rand(n, generator=gen, device=gen.device) * (hi - lo) + lo


def _coin(gen, n, p):
    return torch.rand(n, generator=gen, device=gen.device) < p


def _col(v):
    return v.view(-1, 1, 1, 1)


def _pick(gen, n, p):
    """Indices of the samples an op with probability p applies to (drawn for the whole batch)."""
    return _coin(gen, n, p).nonzero().squeeze(1)


# The ops below work in place on the chosen samples only: on a CPU the cost is memory traffic, so
# touching 30-50% of the batch instead of all of it is what makes them fast.

def flip_(x, gen, p=0.5):
    idx = _pick(gen, x.shape[0], p)
    if idx.numel():
        x[idx] = x[idx].flip(-1)
    return x


def pad_crop(x, gen, pad=4):
    """Zero-pad by `pad` and crop back at a random offset per sample (integer shifts, exact).
    Done as one overlapping-region copy per sample, with no padded intermediate."""
    b, c, h, w = x.shape
    oy = torch.randint(-pad, pad + 1, (b,), generator=gen, device=gen.device).tolist()
    ox = torch.randint(-pad, pad + 1, (b,), generator=gen, device=gen.device).tolist()
    out = torch.zeros_like(x)
    for i, (dy, dx) in enumerate(zip(oy, ox)):
        # output pixel (r, q) comes from input (r + dy, q + dx)
        out[i, :, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = \
            x[i, :, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
    return out


def _affine_params(gen, b, shift=0.0625, scale=0.2, rotate=45.0):
    """Per-sample 2x3 matrices (output -> input, normalised coords) for shift/scale/rotate."""
    a = _u(gen, b, -rotate, rotate) * (math.pi / 180)
    s = 1 + _u(gen, b, -scale, scale)
    tx, ty = _u(gen, b, -shift, shift) * 2, _u(gen, b, -shift, shift) * 2
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def warp_(x, theta, idx, padding="reflection"):
    """Apply per-sample affine `theta` (B, 2, 3) to the samples `idx`, in place."""
    if idx.numel():
        sub = x[idx]
        grid = F.affine_grid(theta[idx].to(x.dtype), list(sub.shape), align_corners=False)
        x[idx] = F.grid_sample(sub, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return x


def brightness_contrast_(x, gen, p=0.4, brightness=0.5, contrast=0.5):
    """Albumentations' RandomBrightnessContrast (brightness_by_max): x * (1 + c) + b."""
    b = x.shape[0]
    idx = _pick(gen, b, p)
    alpha, beta = 1 + _u(gen, b, -contrast, contrast), _u(gen, b, -brightness, brightness)
    if idx.numel():
        x[idx] = x[idx].mul_(_col(alpha[idx])).add_(_col(beta[idx])).clamp_(0, 1)
    return x


def gamma_(x, gen, p=0.3, lo=0.85, hi=1.5):
    b = x.shape[0]
    idx = _pick(gen, b, p)
    g = _u(gen, b, lo, hi)
    if idx.numel():
        x[idx] = x[idx].clamp_(min=1e-6).pow_(_col(g[idx]))
    return x


def _boxes(gen, b, h, w, hh, ww):
    """Top-left corners for boxes of per-sample size (hh, ww), uniformly inside the image."""
    y0 = (_u(gen, b) * (h - hh + 1)).floor()
    x0 = (_u(gen, b) * (w - ww + 1)).floor()
    return y0, x0


def fill_boxes_(x, idx, boxes, fill, use_slices=None):
    """Fill boxes [(y0, x0, hh, ww, active)] (tensors over the batch) of the samples `idx` in place.

    On CPU each box is a slice assignment touching only its own pixels; on GPUs one masked fill
    over the chosen samples avoids a kernel launch per box. Both give the same result."""
    if idx.numel() == 0:
        return x
    c, h, w = x.shape[1:]
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).expand(c).reshape(c, 1, 1)
    if use_slices if use_slices is not None else x.device.type == "cpu":
        rows = torch.stack([torch.stack([y0, x0, hh, ww, act.to(y0.dtype)], 1)[idx] for y0, x0, hh, ww, act in boxes], 1)
        for i, sample_boxes in zip(idx.tolist(), rows.long().tolist()):
            for y0, x0, hh, ww, act in sample_boxes:
                if act:
                    x[i, :, y0 : y0 + hh, x0 : x0 + ww] = fill
        return x
    ys = torch.arange(h, device=x.device).view(1, h)
    xs = torch.arange(w, device=x.device).view(1, w)
    mask = torch.zeros(idx.numel(), h, w, dtype=torch.bool, device=x.device)
    for y0, x0, hh, ww, act in boxes:
        y0, x0, hh, ww, act = y0[idx], x0[idx], hh[idx], ww[idx], act[idx]
        r = (ys >= y0[:, None]) & (ys < (y0 + hh)[:, None])
        q = (xs >= x0[:, None]) & (xs < (x0 + ww)[:, None])
        mask |= r[:, :, None] & q[:, None, :] & act.view(-1, 1, 1)
    x[idx] = torch.where(mask[:, None], fill, x[idx])
    return x


def coarse_dropout_(x, gen, p=0.4, holes=(1, 4), size=(50 / 224, 100 / 224), fill=0.0, use_slices=None):
    """Albumentations' CoarseDropout: 1-4 rectangles per chosen sample, sides a fraction of the image."""
    b, _, h, w = x.shape
    idx = _pick(gen, b, p)
    n = torch.randint(holes[0], holes[1] + 1, (b,), generator=gen, device=gen.device)
    boxes = []
    for k in range(holes[1]):
        hh = (_u(gen, b, *size) * h).round().clamp(1, h)
        ww = (_u(gen, b, *size) * w).round().clamp(1, w)
        boxes.append((*_boxes(gen, b, h, w, hh, ww), hh, ww, k < n))
    return fill_boxes_(x, idx, boxes, fill, use_slices)


def random_erasing_(x, gen, fill, p=0.25, area=(0.02, 0.33), ratio=(0.3, 3.3), use_slices=None):
    """One box per chosen sample, filled with `fill` (per channel; the mean gives 0 after normalising)."""
    b, c, h, w = x.shape
    idx = _pick(gen, b, p)
    a = _u(gen, b, *area) * h * w
    r = torch.exp(_u(gen, b, math.log(ratio[0]), math.log(ratio[1])))
    hh = (a * r).sqrt().round().clamp(1, h)
    ww = (a / r).sqrt().round().clamp(1, w)
    box = (*_boxes(gen, b, h, w, hh, ww), hh, ww, torch.ones(b, dtype=torch.bool, device=x.device))
    return fill_boxes_(x, idx, [box], fill, use_slices)


# ---- RandAugment-like policy: 2 random ops per sample at a random magnitude ----

def _gray(x):
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a, b, f):
    return (b + (a - b) * _col(f)).clamp_(0, 1)


def _autocontrast(x, _m):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)


def _sharpness(x, m):
    k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    c = x.shape[1]
    blur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)
    return _blend(x, blur, 1 + m)


_PHOTOMETRIC = {
    "autocontrast": _autocontrast,
    "brightness": lambda x, m: _blend(x, torch.zeros_like(x), 1 + m),
    "contrast": lambda x, m: _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), 1 + m),
    "color": lambda x, m: _blend(x, _gray(x).expand_as(x), 1 + m),
    "sharpness": _sharpness,
    "solarize": lambda x, m: torch.where(x >= _col(1 - m.abs()), 1 - x, x),
    "posterize": lambda x, m: torch.floor(x * _col(2 ** (8 - (m.abs() * 4).round())))
    / _col(2 ** (8 - (m.abs() * 4).round())),
}
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_OPS = ("identity", *_PHOTOMETRIC, *_GEOMETRIC)


def _geometric_theta(ops, mags):
    """Compose the chosen geometric ops into one 2x3 matrix per sample (identity where none)."""
    b = ops.shape[0]
    theta = torch.eye(3, device=mags.device).repeat(b, 1, 1)
    for k in range(ops.shape[1]):
        name_idx, m = ops[:, k], mags[:, k]
        t = torch.eye(3, device=mags.device).repeat(b, 1, 1)
        ang = m * (30 * math.pi / 180)
        rot = name_idx == _OPS.index("rotate")
        t[rot, 0, 0], t[rot, 0, 1] = torch.cos(ang[rot]), -torch.sin(ang[rot])
        t[rot, 1, 0], t[rot, 1, 1] = torch.sin(ang[rot]), torch.cos(ang[rot])
        sx, sy = name_idx == _OPS.index("shear_x"), name_idx == _OPS.index("shear_y")
        t[sx, 0, 1] = 0.3 * m[sx]
        t[sy, 1, 0] = 0.3 * m[sy]
        tx, ty = name_idx == _OPS.index("translate_x"), name_idx == _OPS.index("translate_y")
        t[tx, 0, 2] = 0.6 * m[tx]  # 0.6 in normalised coords = 30% of the image
        t[ty, 1, 2] = 0.6 * m[ty]
        theta = theta @ t
    return theta[:, :2]


def rand_augment_(x, gen, n_ops=2, max_mag=0.9):
    """Photometric part applied here, in place; returns (x, theta, geo_mask) so the caller folds the geometric
    part into its single warp."""
    b = x.shape[0]
    ops = torch.randint(0, len(_OPS), (b, n_ops), generator=gen, device=gen.device)
    sign = torch.where(_coin(gen, b * n_ops, 0.5), 1.0, -1.0).view(b, n_ops).to(x.device)
    mags = _u(gen, b * n_ops, 0.1, max_mag).view(b, n_ops) * sign
    for k in range(n_ops):
        for name, fn in _PHOTOMETRIC.items():
            sel = (ops[:, k] == _OPS.index(name)).nonzero().squeeze(1)
            if sel.numel():
                x[sel] = fn(x[sel], mags[sel, k])
    geo = torch.zeros(b, dtype=torch.bool, device=x.device)
    for name in _GEOMETRIC:
        geo |= (ops == _OPS.index(name)).any(1)
    return x, _geometric_theta(ops, mags), geo


def _compose(a, b):
    """Matrix product of two batches of 2x3 affine matrices."""
    last = torch.tensor([0, 0, 1], dtype=a.dtype, device=a.device).expand(a.shape[0], 1, 3)
    return (torch.cat([a, last], 1) @ torch.cat([b, last], 1))[:, :2]


# ---- photo: RandomResizedCrop + flip + colour jitter ----

def rrc_boxes(gen, b: int, h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
    """Per-sample crop boxes (top, left, height, width) as float tensors, torchvision's
    RandomResizedCrop.get_params batched: up to `attempts` (area, aspect) draws per sample, the
    first that fits wins; a sample with none that fits gets torchvision's fallback (the whole image,
    cropped to the nearest allowed aspect ratio, centred). The same number of draws whatever the
    outcome, so the generator's stream never depends on the data."""
    dev = gen.device
    area = _u(gen, b * attempts, *scale).view(b, attempts) * (h * w)
    aspect = torch.exp(_u(gen, b * attempts, math.log(ratio[0]), math.log(ratio[1]))).view(b, attempts)
    cw = torch.sqrt(area * aspect).round()
    ch = torch.sqrt(area / aspect).round()
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = torch.where(fits, torch.arange(attempts, 0, -1, device=dev), 0).argmax(1)  # first fitting attempt
    any_fit = fits.any(1)
    rows = torch.arange(b, device=dev)
    cw, ch = cw[rows, first], ch[rows, first]
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = float(w), float(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(h * ratio[1])), float(h)
    else:
        fw, fh = float(w), float(h)
    cw = torch.where(any_fit, cw, torch.full_like(cw, fw))
    ch = torch.where(any_fit, ch, torch.full_like(ch, fh))
    ry, rx = _u(gen, b), _u(gen, b)
    top = torch.where(any_fit, (ry * (h - ch + 1)).floor().clamp(max=h - ch), ((h - ch) / 2).floor())
    left = torch.where(any_fit, (rx * (w - cw + 1)).floor().clamp(max=w - cw), ((w - cw) / 2).floor())
    return top, left, ch, cw


def random_resized_crop(x, gen, out_size: int, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5):
    """(B, C, H, W) -> (B, C, out_size, out_size): a random box per sample (`rrc_boxes`) resized
    bilinearly to out_size, mirrored with probability flip_p, all in one affine grid_sample.
    No antialiasing: crops are at most ~1/crop_pct larger than the output, so it barely downsamples."""
    b, _, h, w = x.shape
    top, left, ch, cw = rrc_boxes(gen, b, h, w, scale, ratio)
    flip = torch.where(_coin(gen, b, flip_p), -1.0, 1.0).to(x.device)
    top, left, ch, cw = (t.to(x.device) for t in (top, left, ch, cw))
    # output [-1, 1] (pixel edges, align_corners=False) -> the box's edges in the input's normalised coords
    zero = torch.zeros_like(cw)
    theta = torch.stack([torch.stack([flip * cw / w, zero, (2 * left + cw) / w - 1], 1),
                         torch.stack([zero, ch / h, (2 * top + ch) / h - 1], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), [b, x.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter_(x, gen, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):
    """torchvision's ColorJitter(brightness, contrast, saturation) per sample, in place, in a fixed
    order (brightness, contrast, saturation; torchvision shuffles it per image, which would cost
    three times the passes here): each factor uniform in [1 - v, 1 + v], results clamped to 0..1."""
    b = x.shape[0]
    fb = _col(_u(gen, b, 1 - brightness, 1 + brightness).to(x.device))
    fc = _col(_u(gen, b, 1 - contrast, 1 + contrast).to(x.device))
    fs = _col(_u(gen, b, 1 - saturation, 1 + saturation).to(x.device))
    x.mul_(fb).clamp_(0, 1)
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x.sub_(m).mul_(fc).add_(m).clamp_(0, 1)
    if x.shape[1] == 3:
        g = _gray(x)
        x.sub_(g).mul_(fs).add_(g).clamp_(0, 1)
    return x


def augment_batch(x, preset: str, gen: torch.Generator, *, fill=None, inplace: bool = False,
                  out_size: int | None = None):
    """Augment float (B, C, H, W) images in 0..1 with `preset`; `fill` = per-channel value for
    random erasing (the dataset mean, so erased areas are 0 after normalising). `out_size` (default
    H): photo crops at random to it, the other presets take the centre crop first. The input is
    left untouched unless inplace=True (the loader owns its batches and skips the copy)."""
    if preset not in PRESETS:
        raise ValueError(f"augment must be one of {', '.join(PRESETS)}, got {preset!r}")
    out_size = int(out_size or x.shape[-1])
    if preset == "photo" and x.shape[0]:
        return color_jitter_(random_resized_crop(x, gen, out_size), gen)
    if out_size != x.shape[-1] or out_size != x.shape[-2]:
        from imgarena.data.images import center_crop

        x, inplace = center_crop(x, out_size).clone(), True  # a batch of its own now
    if preset in ("none", "photo") or x.shape[0] == 0:
        return x
    if preset == "flip":
        return flip_(x if inplace else x.clone(), gen)
    if preset == "light":
        return pad_crop(flip_(x if inplace else x.clone(), gen), gen, pad=max(1, round(x.shape[-1] / 8)))
    x = x if inplace else x.clone()
    b = x.shape[0]
    theta = _affine_params(gen, b)
    warp = _coin(gen, b, 0.3)
    if preset == "strong":
        x, ra_theta, ra_geo = rand_augment_(x, gen)
        theta = torch.where(warp.view(-1, 1, 1), theta, torch.eye(2, 3, device=x.device).expand(b, 2, 3))
        theta = _compose(theta, ra_theta)
        warp = warp | ra_geo
    warp_(x, theta, warp.nonzero().squeeze(1))
    gamma_(x, gen)
    brightness_contrast_(x, gen)
    coarse_dropout_(x, gen)
    flip_(x, gen)
    if preset == "strong":
        random_erasing_(x, gen, torch.zeros(x.shape[1], device=x.device) if fill is None else fill)
    return x


def mix_batch(x, y, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              generator: torch.Generator | None = None, label_smoothing: float = 0.0):
    """Mixup / CutMix (one picked at random per batch when both are on) -> (x, soft targets (B, K)).

    Each sample is mixed with its mirror in the batch (x.flip(0)); lambda ~ Beta(alpha, alpha)."""
    off = label_smoothing / num_classes
    y1 = torch.full((y.shape[0], num_classes), off, device=y.device, dtype=torch.float32)
    y1.scatter_(1, y.view(-1, 1), 1.0 - label_smoothing + off)
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or x.shape[0] < 2:
        return x, y1
    gen = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
    # torch has no seeded Beta sampler; a numpy RNG seeded from `gen` keeps lambda reproducible.
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item()))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    y2 = y1.flip(0)
    if use_cutmix:
        _, _, h, w = x.shape
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1_, x0, x1_ = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1_, x0:x1_] = x.flip(0)[:, :, y0:y1_, x0:x1_]
        lam = 1 - (y1_ - y0) * (x1_ - x0) / (h * w)
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    return x, y1 * lam + y2 * (1 - lam)
