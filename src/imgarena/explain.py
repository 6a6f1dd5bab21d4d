"""Class-activation maps: where each architecture looks in an image (`imgarena explain RUN IMAGES...`).

Methods, all computed through the model contract's explain split (`models/_base.py`:
`explain_head(explain_features(x)) == forward(x)`, `explain_grid` views the features as a 2-D map),
so no caller branches on architecture:

- auto      (the default) rollout for models with global self-attention when explaining the predicted
            class, chefer when a class is named (rollout cannot follow a class), layercam for the rest.
            Chosen by the quadrant set of tests/test_explain.py (share of held-out maps peaking in the
            marked quadrant): trained vit_t4 (patch 8, 2 blocks, ~97% accurate) rollout 0.98, chefer 0.82,
            layercam 0.44, gradcam 0.39 (6 ViTs trained to >= 95%: rollout 0.955-1.00, chefer 0.80-0.99);
            trained cnn_s layercam 0.99, gradcam 0.65. Chefer's ReLU(dy/dA * A) can drop the very token
            a saturated attention row rests on (dy/dA ignores that a row sums to 1), hence its misses.
- gradcam   Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391: ReLU(sum_c mean_hw(dy/dA_c) * A_c).
- layercam  Jiang et al. 2021, https://doi.org/10.1109/TIP.2021.3089943: ReLU(sum_c ReLU(dy/dA_c) * A_c),
            a weight per position instead of per channel (sharper on coarse token grids).
- rollout   Abnar & Zuidema 2020, https://arxiv.org/abs/2005.00928: the product over layers of
            (A + I) / 2 (heads averaged, rows renormalised); for models with global self-attention
            only (ViT). It does not depend on the class: `--target` changes only the title.
- chefer    Chefer, Gur & Wolf 2021, https://arxiv.org/abs/2103.15679 (eq. 5-6): gradient-weighted rollout,
            R <- R + mean_heads(ReLU(dy/dA * A)) @ R from R = I, so it follows the class being explained.

One forward and one backward per batch (BatchNorm and dropout are in eval mode, so images do not
interact). Maps are upsampled bilinearly to the model's input size, scaled to [0, 1], then mapped
back onto the original image (squash: stretched back to its aspect; crop: placed over the centre
crop the model saw, NaN elsewhere).

Why not the `grad-cam` package: it hooks `nn.Module` outputs, but our split points are tensors
(ViT's tokens before the last block, Mixer's token-major trunk), it has no attention rollout, and it
pulls opencv, ttach, scikit-learn and scipy for what is ~20 lines of tensor code here.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgarena.errors import UserError, closest_matches

log = logging.getLogger(__name__)

METHODS = ("auto", "layercam", "gradcam", "rollout", "chefer")
OVERLAY_ALPHA = 0.45
MAP_MAX_SIDE = 512  # .npy maps: the image's own size, longest side capped here
PNG_MIN_SIDE, PNG_MAX_SIDE = 256, 512  # overlay PNGs: small images are enlarged so they can be seen
TILE = 160  # grid cells
COLORMAP = "jet"


# ---------------------------------------------------------------- maps from a normalised batch

def _not_explainable():
    from imgarena.models._base import NotExplainable

    return NotExplainable


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    return method


def resolve_method(model, method: str, named_target: bool = False) -> str:
    """The method "auto" stands for on this model (see the module docstring); others are returned as is."""
    import torch

    check_method(method)
    if method != "auto":
        return method
    spec = model.input_spec
    x = torch.zeros(1, spec["in_chans"], spec["img_size"], spec["img_size"], device=model_device(model))
    try:
        with torch.no_grad():
            model.attention_trace(x)  # raises before its forward for models without attention
    except _not_explainable():
        return "layercam"
    return "chefer" if named_target else "rollout"


def rollout(trace, grads=None):
    """(B, h, w) relevance of the patch tokens for an `AttentionTrace`: attention rollout, or with `grads`
    (d class score / d each attention map) Chefer et al.'s gradient-weighted rollout."""
    import torch

    R = None
    for i, a in enumerate(trace.attentions):
        a = a.detach()
        if grads is None:
            a = a.float().mean(dim=1)  # heads averaged: (B, T, T)
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)  # the residual path
            a = a / a.sum(dim=-1, keepdim=True)
            R = a if R is None else a @ R
        else:
            a = (grads[i].float() * a.float()).clamp(min=0).mean(dim=1)  # positive evidence, heads averaged
            R = torch.eye(a.shape[-1], device=a.device).expand_as(a) if R is None else R
            R = R + a @ R
    p = trace.num_prefix
    rel = R[:, 0, p:] if trace.readout == "token" and p else R[:, p:, p:].mean(dim=1)
    return rel.reshape(rel.shape[0], *trace.grid)


def class_maps(model, x, *, method: str = "auto", target=None):
    """Maps for a normalised batch `x` (B, C, H, W): (maps (B, H, W) in [0, 1], probs (B, K), target (B,)).

    `target`: None explains each image's predicted class, else a (B,) tensor of class indices.
    """
    import torch
    import torch.nn.functional as F

    method = resolve_method(model, method, target is not None)
    hw = tuple(x.shape[-2:])
    name = getattr(model, "model_name", "") or type(model).__name__
    if method == "rollout":
        with torch.no_grad():
            trace = model.attention_trace(x)
        logits = trace.logits.float()
        cam = rollout(trace)
        tgt = logits.argmax(dim=1) if target is None else target.to(logits.device)
    elif method == "chefer":
        with torch.enable_grad():
            trace = model.attention_trace(x.detach())
            tgt = trace.logits.argmax(dim=1) if target is None else target.to(trace.logits.device)
            grads = torch.autograd.grad(trace.logits.gather(1, tgt[:, None]).sum(), trace.attentions, allow_unused=True)
        if any(g is None for g in grads):  # a bug in a model's attention_trace, not the user's input
            raise RuntimeError(f"{name}: attention_trace returned attention maps the logits do not depend on")
        cam = rollout(trace, [g.detach() for g in grads])
        logits = trace.logits.detach().float()
    else:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # the MLP's only map is its input
            feats = model.explain_features(x)
            logits = model.explain_head(feats)
            tgt = logits.argmax(dim=1) if target is None else target.to(logits.device)
            (grad,) = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), feats)
        A = model.explain_grid(feats.detach(), hw).float()
        G = model.explain_grid(grad, hw).float()
        if not bool(G.any()) and bool((logits.detach().std(dim=1) > 0).any()):
            # zero gradient although the scores vary with the class: positions never reach the head
            # (an untrained zero-initialised head, as Mixer's, gives constant scores and an empty map)
            raise _not_explainable()(
                f"{name}: the class scores do not depend on the feature map's positions (e.g. the head reads "
                "a class token), so a class-activation map would be empty; use --method rollout or chefer if it has attention")
        weights = G.mean(dim=(2, 3), keepdim=True) if method == "gradcam" else G.clamp(min=0)
        cam = (weights * A).sum(dim=1).clamp(min=0)  # (B, h, w)
        logits = logits.detach().float()
    cam = F.interpolate(cam[:, None].float(), size=hw, mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - lo
    cam = torch.where(span > 0, (cam - lo) / span.clamp(min=1e-12), torch.zeros_like(cam))
    return cam, torch.softmax(logits, dim=1), tgt


def model_device(model):
    import torch

    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def explain_arrays(model, images: np.ndarray, mean, std, *, method: str = "auto", targets=None,
                   batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (N, C, S, S) images preprocessed like training -> (maps (N, S, S) float32 in [0, 1],
    probs (N, K), explained class (N,)). `targets` None: each image's predicted class."""
    import torch

    from imgarena.data.images import normalize

    dev = model_device(model)
    method = resolve_method(model, method, targets is not None)  # once, not per batch
    maps, probs, tgts = [], [], []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(normalize(np.asarray(images[s:s + batch_size]), mean, std)).to(dev)
        t = None if targets is None else torch.as_tensor(np.asarray(targets[s:s + batch_size]), dtype=torch.long)
        m, p, t = class_maps(model, x, method=method, target=t)
        maps.append(m.cpu().numpy())
        probs.append(p.cpu().numpy())
        tgts.append(t.cpu().numpy())
    if not maps:
        return np.zeros((0,) + tuple(images.shape[2:]), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(maps), np.concatenate(probs), np.concatenate(tgts)


# ---------------------------------------------------------------- maps back onto the image

def frame_size(w: int, h: int, lo: int, hi: int) -> tuple[int, int]:
    """(w, h) scaled so the longest side is within [lo, hi], aspect kept."""
    side = max(w, h)
    f = min(max(side, lo), hi) / side
    return max(1, round(w * f)), max(1, round(h * f))


def to_image_frame(cam: np.ndarray, orig_wh: tuple[int, int], out_wh: tuple[int, int], resize: str,
                   crop_pct: float = 1.0) -> np.ndarray:
    """A map over the model's square input -> (out_h, out_w) over the original image (same aspect).

    squash (crop_pct 1): the map is stretched back; otherwise it covers the part of the image the
    model saw (`imgarena.data.images.view_box`: crop, the centre crop of crop_pct, pad's letterbox,
    whose bars fall outside the image), NaN elsewhere.
    """
    from PIL import Image

    from imgarena.data.images import view_box

    S = cam.shape[0]
    ow, oh = out_wh
    img = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), mode="F")
    if resize == "squash" and (crop_pct or 1.0) >= 1:
        return np.asarray(img.resize((ow, oh), Image.BILINEAR), dtype=np.float32)
    W, H = orig_wh
    bx0, by0, bx1, by1 = view_box((W, H), S, resize, crop_pct)
    x0, x1 = round(bx0 * ow / W), round(bx1 * ow / W)
    y0, y1 = round(by0 * oh / H), round(by1 * oh / H)
    seen = np.asarray(img.resize((max(1, x1 - x0), max(1, y1 - y0)), Image.BILINEAR))
    out = np.full((oh, ow), np.nan, dtype=np.float32)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, ow), min(y1, oh)
    out[cy0:cy1, cx0:cx1] = seen[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out


def _lut() -> np.ndarray:
    from matplotlib import colormaps

    return np.round(colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def overlay(rgb: np.ndarray, cam: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3) image with the heat map blended in (where the map is defined, i.e. not NaN)."""
    from PIL import Image

    lut = _lut() if lut is None else lut
    ok = np.isfinite(cam)
    heat = lut[(np.clip(np.nan_to_num(cam), 0, 1) * 255).astype(np.uint8)]
    base = Image.fromarray(np.ascontiguousarray(rgb))
    out = Image.blend(base, Image.fromarray(heat), OVERLAY_ALPHA)
    if not ok.all():
        out = Image.composite(out, base, Image.fromarray(ok.astype(np.uint8) * 255))
    return np.asarray(out)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _caption(img, text: str, *, color=(255, 255, 255), where: str = "top"):
    """Write `text` in a translucent band at the top (or bottom) of PIL image `img`, in place."""
    from PIL import Image, ImageDraw

    w, h = img.size
    font = _font(max(9, min(w // 18, h // 8, 18)))
    probe = ImageDraw.Draw(img)
    lines = text.split("\n")
    heights = [probe.textbbox((0, 0), ln, font=font)[3] for ln in lines]
    band_h = sum(heights) + 2 * len(lines) + 4
    band = Image.new("RGBA", (w, band_h), (0, 0, 0, 150))
    y = 0 if where == "top" else h - band_h
    img.paste(Image.alpha_composite(img.crop((0, y, w, y + band_h)).convert("RGBA"), band).convert("RGB"), (0, y))
    draw = ImageDraw.Draw(img)
    ty = y + 2
    for ln, lh in zip(lines, heights):
        draw.text((3, ty), ln, fill=color, font=font)
        ty += lh + 2


def save_png(img, path, title: str | None = None) -> None:
    """Atomic PNG write; the title also goes into the PNG's standard "Title" text chunk."""
    from PIL.PngImagePlugin import PngInfo

    from imgarena.checkpoint import atomic_write

    info = PngInfo()
    if title:
        info.add_text("Title", title)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info, compress_level=1))  # level 6 takes ~10x longer


def save_npy(arr: np.ndarray, path) -> None:
    from imgarena.checkpoint import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)

    atomic_write(path, write)


def _chw_to_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) with 1 or 3 channels -> (H, W, 3)."""
    img = np.asarray(img)
    return np.repeat(img[0][..., None], 3, axis=2) if img.shape[0] == 1 else np.transpose(img[:3], (1, 2, 0))


def tile(rgb: np.ndarray, cam: np.ndarray | None, text: str, *, size: int = TILE, color=(255, 255, 255), lut=None):
    """One grid cell: the overlay (or the plain image when `cam` is None) letterboxed in a size x size square."""
    from PIL import Image

    h, w = rgb.shape[:2]
    tw, th = frame_size(w, h, size, size)
    im = Image.fromarray(rgb).resize((tw, th), Image.BILINEAR)
    if cam is not None:
        im = Image.fromarray(overlay(np.asarray(im), resize_map(cam, tw, th), lut))
    cell = Image.new("RGB", (size, size), (255, 255, 255))
    cell.paste(im, ((size - tw) // 2, (size - th) // 2))
    if text:
        _caption(cell, text, color=color, where="bottom")
    return cell


def resize_map(cam: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear resize of a float map to (h, w); NaN outside its support (crop mode) stays outside."""
    from PIL import Image

    ok = np.isfinite(cam)
    if ok.all():
        return np.asarray(Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), mode="F").resize((w, h), Image.BILINEAR))
    vals = np.asarray(Image.fromarray(np.where(ok, cam, 0).astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(ok.astype(np.float32), mode="F").resize((w, h), Image.NEAREST)) > 0.5
    return np.where(mask, vals, np.nan)


def mosaic(cells: list, cols: int, *, header: list[str] | None = None, title: str | None = None,
           row_labels: list[str] | None = None):
    """Cells (PIL, all TILE x TILE) in rows of `cols`, with an optional title, column headers and row labels."""
    from PIL import Image, ImageDraw

    size = cells[0].size[0]
    rows = -(-len(cells) // cols)
    font = _font(13)
    gap = 4
    title_h = 24 if title else 0
    head_h = 20 if header else 0
    label_w = 150 if row_labels else 0
    W = label_w + cols * (size + gap) + gap
    H = title_h + head_h + rows * (size + gap) + gap
    out = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((gap, 4), title, fill=(0, 0, 0), font=_font(15))
    for c, text in enumerate(header or []):
        draw.text((label_w + gap + c * (size + gap), title_h + 2), text[:24], fill=(0, 0, 0), font=font)
    for i, cell in enumerate(cells):
        r, c = divmod(i, cols)
        out.paste(cell, (label_w + gap + c * (size + gap), title_h + head_h + gap + r * (size + gap)))
    for r, text in enumerate(row_labels or []):
        draw.multiline_text((gap, title_h + head_h + gap + r * (size + gap) + size // 3), text, fill=(0, 0, 0),
                            font=font, spacing=3)
    return out


# ---------------------------------------------------------------- `imgarena explain RUN IMAGES...`

@dataclass
class ExplainConfig:
    checkpoint: str
    inputs: list
    method: str = "auto"
    target: str = "predicted"  # or a class name
    out: str = "explain"
    batch_size: int = 32
    device: str = "auto"
    which: str = "best"
    workers: int = 0
    grid: bool = True  # grid.png when more than one image


@dataclass
class ExplainRow:
    path: str
    label: str | None = None  # predicted class
    prob: float | None = None
    target: str | None = None  # the class the map explains
    target_prob: float | None = None
    png: str | None = None
    npy: str | None = None
    error: str | None = None


def check_options(cfg: ExplainConfig) -> None:
    check_method(cfg.method)
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if not cfg.inputs:
        raise UserError("nothing to explain: pass image files, folders or glob patterns after the run")
    if not cfg.target:
        raise UserError("--target: use 'predicted' or a class name")


def resolve_target(target: str, class_names: list[str]) -> int | None:
    """None for "predicted", else the index of class `target` (UserError naming close names)."""
    if target == "predicted":
        return None
    if target in class_names:
        return class_names.index(target)
    near = closest_matches(target, class_names)
    raise UserError(f"--target {target!r} is not a class of this model"
                    + (f"; closest: {', '.join(near)}" if near else f"; classes: {', '.join(class_names[:20])}"))


def _unique_stems(paths: list[str]) -> list[str]:
    """File stems, made unique with -2, -3... when two inputs share one (a/x.png, b/x.png)."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        out.append(stem if n == 1 else f"{stem}-{n}")
    taken = set()
    for i, s in enumerate(out):  # a real file named x-2 next to a renamed duplicate
        while s in taken:
            s += "_"
        taken.add(s)
        out[i] = s
    return out


def display_image(path: str):
    """The file as it looks (EXIF rotation applied) as a PIL RGB image, and its (width, height)."""
    from PIL import ImageOps

    from imgarena.data.images import open_image, to_mode

    with open_image(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = to_mode(img, 3)
    return rgb, rgb.size


def _title(row: ExplainRow, method: str) -> str:
    t = f"{row.label} {row.prob:.2f}"
    if row.target != row.label:
        t = f"map: {row.target} {row.target_prob:.2f} | pred: {t}"
    return f"{t}  [{method}]"


def run_explain(cfg: ExplainConfig) -> list[ExplainRow]:
    """Write <out>/<stem>.png (overlay) and <stem>.npy (map, the image's aspect) per input, grid.png
    for several, and explain.csv; returns one row per input (errors kept, the rest go on)."""
    from PIL import Image

    from imgarena.checkpoint import atomic_write_text, load_model
    from imgarena.data.images import BadImage, decode_settings
    from imgarena.engine.distributed import resolve_device
    from imgarena.predict import class_names_of, decoded_batches, default_workers, expand_inputs, path_decoder

    check_options(cfg)
    paths = expand_inputs(cfg.inputs)
    model, meta = load_model(cfg.checkpoint, which=cfg.which, device=resolve_device(cfg.device))
    names = class_names_of(meta)
    pre = meta["preprocessing"]
    view = decode_settings(pre)  # resize and crop_pct, with an older checkpoint's defaults
    tgt = resolve_target(cfg.target, names)
    method = resolve_method(model, cfg.method, tgt is not None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = dict(zip(paths, _unique_stems(paths)))
    lut = _lut()
    rows: list[ExplainRow] = []
    cells = []
    it = iter(paths)
    for batch in decoded_batches(paths, path_decoder(pre), batch_size=cfg.batch_size, workers=default_workers(cfg.workers)):
        bpaths = [next(it) for _ in batch]
        good = [(p, a) for p, (a, _) in zip(bpaths, batch) if a is not None]
        result = {}
        if good:
            arr = np.stack([a for _, a in good])
            targets = None if tgt is None else np.full(len(good), tgt)
            maps, probs, t = explain_arrays(model, arr, pre["mean"], pre["std"], method=method, targets=targets,
                                            batch_size=cfg.batch_size)
            result = {p: (maps[i], probs[i], int(t[i])) for i, (p, _) in enumerate(good)}
        for p, (_, err) in zip(bpaths, batch):
            row = ExplainRow(p, error=err)
            if p in result:
                cam, pr, ti = result[p]
                k = int(np.argmax(pr))
                row = ExplainRow(p, names[k], float(pr[k]), names[ti], float(pr[ti]))
                try:
                    rgb, (w, h) = display_image(p)
                except BadImage as e:
                    rows.append(ExplainRow(p, error=str(e)))
                    continue
                raw = to_image_frame(cam, (w, h), frame_size(w, h, 1, MAP_MAX_SIDE), view["resize"], view["crop_pct"])
                pw, ph = frame_size(w, h, PNG_MIN_SIDE, PNG_MAX_SIDE)
                shown = np.asarray(rgb.resize((pw, ph), Image.BILINEAR))
                heat = resize_map(raw, pw, ph)
                img = Image.fromarray(overlay(shown, heat, lut))
                title = _title(row, method)
                _caption(img, title)
                row.png, row.npy = str(out / f"{stems[p]}.png"), str(out / f"{stems[p]}.npy")
                save_png(img, row.png, title)
                save_npy(raw, row.npy)
                if cfg.grid and len(paths) > 1:
                    cells.append(tile(shown, heat, f"{stems[p][:18]}\n{row.label} {row.prob:.2f}", lut=lut))
            rows.append(row)
    if cells:
        cols = min(8, len(cells))
        head = f"{meta['model']['name']}: {method}, " + ("predicted class" if tgt is None else f"class {names[tgt]}")
        g = mosaic(cells, cols, title=head)
        save_png(g, out / "grid.png", head)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "prob", "target", "target_prob", "png", "npy", "error"])
    for r in rows:
        w.writerow([r.path, r.label or "", "" if r.prob is None else f"{r.prob:.6f}", r.target or "",
                    "" if r.target_prob is None else f"{r.target_prob:.6f}", r.png or "", r.npy or "", r.error or ""])
    atomic_write_text(out / "explain.csv", buf.getvalue())
    return rows


# ---------------------------------------------------------------- the run folder: explain.png

def write_explain_png(run_dir, data, model, probs, *, method: str = "auto", limit: int = 12,
                      title: str | None = None, split=None) -> int:
    """`run_dir/explain.png`: for the most confident validation mistakes, the map of the class the model
    said next to the map of the true class. `probs` (N, K) are the model's validation probabilities
    (as `plots.plot_errors` takes them). Returns the mistakes drawn; 0 (no file) when the model has no
    map to explain, which is logged."""
    from imgarena.data.images import center_crop
    from imgarena.evaluation.plots import most_confident_errors

    split = data.val if split is None else split
    targets = np.asarray(split.labels)
    idx = most_confident_errors(probs, targets, limit)
    path = Path(run_dir) / "explain.png"
    head = title or f"{getattr(model, 'model_name', '') or 'model'}: where it looked in its most confident mistakes"
    if len(idx) == 0:
        from PIL import Image

        img = Image.new("RGB", (360, 60), (255, 255, 255))
        _caption(img, "no mistakes on this split", color=(255, 255, 255))
        save_png(img, path, head)
        return 0
    images = np.asarray(split.images[np.sort(idx)])[np.argsort(np.argsort(idx))]  # memmap: read in file order
    # the eval view, what the model was scored on (a data object without img_size: images as they are)
    images = np.ascontiguousarray(center_crop(images, getattr(data, "img_size", None) or images.shape[-1]))
    pred = np.asarray(probs)[idx].argmax(axis=1)
    was_training = model.training
    model.eval()
    try:
        method = resolve_method(model, method, named_target=True)
        m_pred, p, _ = explain_arrays(model, images, data.mean, data.std, method=method, targets=pred)
        m_true, _, _ = explain_arrays(model, images, data.mean, data.std, method=method, targets=targets[idx])
    except _not_explainable() as e:
        log.info("explain.png skipped: %s", e)
        return 0
    finally:
        model.train(was_training)
    names = [str(c) for c in data.classes]
    lut = _lut()
    cells = []
    for k, i in enumerate(idx):
        rgb = _chw_to_rgb(images[k])
        t, q = int(targets[i]), int(pred[k])
        cells.append(tile(rgb, m_pred[k], f"said {names[q][:14]} {p[k, q]:.2f}", lut=lut, color=(255, 190, 190)))
        cells.append(tile(rgb, m_true[k], f"true {names[t][:14]} {p[k, t]:.2f}", lut=lut, color=(190, 255, 190)))
    cols = 4 if len(cells) >= 4 else len(cells)  # two mistakes (map pairs) per row
    save_png(mosaic(cells, cols, title=f"{head} ({method}; left: the class it said, right: the true class)"), path, head)
    return len(idx)


# ---------------------------------------------------------------- the compare report

def pick_report_images(preds: dict[str, np.ndarray], targets: np.ndarray, n: int = 8) -> tuple[list[int], list[str]]:
    """Up to `n` validation indices, about half that every model gets right and half they disagree on
    (predictions differ), the rest filled from the other kind; deterministic. Returns (indices, kind)."""
    P = np.stack([np.asarray(p) for p in preds.values()])  # (models, N)
    t = np.asarray(targets)
    all_right = np.flatnonzero((P == t[None]).all(axis=0))
    disagree = np.flatnonzero((P != P[:1]).any(axis=0))
    rng = np.random.default_rng(0)
    all_right, disagree = rng.permutation(all_right), rng.permutation(disagree)
    n_dis = min(len(disagree), max(n - len(all_right), n // 2))
    n_right = min(len(all_right), n - n_dis)
    chosen = [(int(i), "all right") for i in all_right[:n_right]] + [(int(i), "disagree") for i in disagree[:n_dis]]
    if len(chosen) < n:  # too few of both kinds: other images (all wrong alike) fill up
        used = {i for i, _ in chosen}
        rest = [int(i) for i in rng.permutation(len(t)) if int(i) not in used]
        chosen += [(i, "all wrong") for i in rest[:n - len(chosen)]]
    return [i for i, _ in chosen], [k for _, k in chosen]


def explain_grid_for_report(compare_dir, run_dirs: dict, data, *, n: int = 8, method: str = "auto",
                            pool: int = 2000, batch_size: int = 64, device="cpu") -> Path | None:
    """`compare_dir/figures/explain.png` (+ explain.json): the same `n` validation images as rows
    (some every model gets right, some they disagree on), each model's map as a column.

    `run_dirs` maps model name -> run folder (its best checkpoint is loaded). A model without a map
    gets grey cells saying why. Returns the PNG path, or None when no model could be loaded.
    """
    import json

    import torch

    from imgarena.checkpoint import atomic_write_text, load_model
    from imgarena.data.images import center_crop

    val = data.val
    m = min(len(val.labels), pool)
    if not run_dirs or m == 0:
        return None
    images = np.asarray(val.images[:m])
    images = np.ascontiguousarray(center_crop(images, getattr(data, "img_size", None) or images.shape[-1]))  # eval view
    targets = np.asarray(val.labels[:m])
    preds, failed = {}, {}
    for name, rd in run_dirs.items():
        model, _ = load_model(rd, which="best", device=device)
        with torch.inference_mode():
            from imgarena.data.images import normalize

            out = [model(torch.from_numpy(normalize(images[s:s + batch_size], data.mean, data.std)).to(device)).argmax(1)
                   for s in range(0, m, batch_size)]
        preds[name] = torch.cat(out).cpu().numpy()
        del model
    idx, kinds = pick_report_images(preds, targets, n)
    names = [str(c) for c in data.classes]
    lut = _lut()
    grid, used = {}, {}
    for name, rd in run_dirs.items():
        model, _ = load_model(rd, which="best", device=device)
        try:
            used[name] = resolve_method(model, method)
            grid[name] = explain_arrays(model, images[idx], data.mean, data.std, method=method, batch_size=batch_size)
        except _not_explainable() as e:
            failed[name] = str(e)
        del model
    cells, row_labels = [], []
    for r, (i, kind) in enumerate(zip(idx, kinds)):
        rgb = _chw_to_rgb(images[i])
        cells.append(tile(rgb, None, ""))
        row_labels.append(f"true: {names[int(targets[i])][:16]}\n{kind}")
        for name in run_dirs:
            if name in failed:
                cells.append(tile(np.full_like(rgb, 200), None, "no map"))
                continue
            maps, probs, t = grid[name]
            q = int(t[r])
            ok = q == int(targets[i])
            cells.append(tile(rgb, maps[r], f"{names[q][:14]} {probs[r, q]:.2f}", lut=lut,
                              color=(190, 255, 190) if ok else (255, 190, 190)))
    cols = 1 + len(run_dirs)
    fig_dir = Path(compare_dir) / "figures"
    path = fig_dir / "explain.png"
    how = method if method != "auto" else ", ".join(sorted(set(used.values()))) or "auto"
    head = f"Where each model looks ({how}, map of its predicted class; green: right, red: wrong)"
    save_png(mosaic(cells, cols, header=["image"] + list(run_dirs), title=head, row_labels=row_labels), path, head)
    info = {"method": method, "images": [{"index": int(i), "path": val.paths[int(i)] if i < len(val.paths) else None,
                                           "target": names[int(targets[i])], "kind": k} for i, k in zip(idx, kinds)],
            "models": {name: ({"error": failed[name]} if name in failed else
                              {"method": used[name], "pred": [names[int(q)] for q in grid[name][2]],
                               "prob": [round(float(grid[name][1][r, int(q)]), 4) for r, q in enumerate(grid[name][2])]})
                       for name in run_dirs}}
    atomic_write_text(fig_dir / "explain.json", json.dumps(info, indent=2) + "\n")
    return path
