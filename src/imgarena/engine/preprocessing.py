"""The preprocessing a training run uses: what the user set, the rest from the pretrained weights.

`resolve_data_config(cfg)` fills every DataConfig field the user left unset (img_size, channels,
crop_pct, interpolation, mean, std) from the weights' own preprocessing
(`imgarena.models.pretrained.pretrained_preprocessing`): a pretrained model sees its inputs the way
it was trained on them. `resize` stays as given (its default cannot be told from a choice). With
--augment photo an unset crop_pct becomes 0.875, so random crops have a border to come from.
`check_prepared` does the checking for data that was loaded already (`run_training(cfg, data=...)`).
"""

from __future__ import annotations

import dataclasses
import logging

from imgarena.config import DataConfig, TrainConfig
from imgarena.errors import UserError

log = logging.getLogger(__name__)

FROM_WEIGHTS = ("img_size", "channels", "crop_pct", "interpolation", "mean", "std")
PHOTO_CROP_PCT = 0.875  # timm's default crop fraction


def resolve_data_config(cfg: TrainConfig) -> DataConfig:
    """cfg.data (with the cfg.img_size shortcut applied) with its unset fields filled from the weights."""
    return _resolve(cfg)[0]


def _resolve(cfg: TrainConfig) -> tuple[DataConfig, dict]:
    """(the resolved DataConfig, {field: "user" | "weights" | "default"} for every field that is set)."""
    d = cfg.data
    if cfg.img_size:
        d = dataclasses.replace(d, img_size=cfg.img_size)
    origin = {k: "user" for k in FROM_WEIGHTS if getattr(d, k) is not None}
    weights = {}
    if cfg.pretrained:
        from imgarena.models.pretrained import pretrained_preprocessing

        weights = pretrained_preprocessing(cfg.pretrained, cfg.model)
    fill = {k: weights[k] for k in ("img_size", "crop_pct", "interpolation") if getattr(d, k) is None and k in weights}
    channels = d.channels
    if channels is None and "channels" in weights:
        channels = fill["channels"] = weights["channels"]
    if d.mean is None and "mean" in weights and "std" in weights:
        mean, std = list(weights["mean"]), list(weights["std"])
        if channels is None:  # statistics of RGB weights mean RGB inputs
            channels = fill["channels"] = len(mean)
        fill["mean"], fill["std"] = fit_channels(mean, channels), fit_channels(std, channels)
    origin.update(dict.fromkeys(fill, "weights"))
    if cfg.augment == "photo" and d.crop_pct is None and "crop_pct" not in fill:
        fill["crop_pct"] = PHOTO_CROP_PCT
        origin["crop_pct"] = "default"
    return (dataclasses.replace(d, **fill) if fill else d), origin


def fit_channels(values: list[float], channels: int) -> list[float]:
    """Per-channel statistics for `channels` inputs: RGB values averaged for gray (timm's rule for
    in_chans=1), one value repeated for RGB."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if channels == 1:
        return [sum(values) / len(values)]
    if len(values) == 1:
        return values * channels
    raise UserError(f"cannot map {len(values)} per-channel statistics {values} to {channels} channels")


def check_prepared(data, cfg: TrainConfig) -> DataConfig:
    """For data loaded already: a setting the user asked for that the data does not have is a
    UserError; one the weights brought is a warning (the data's is used). Returns the DataConfig
    that describes the data as used, for the run's config.yaml."""
    data_cfg, origin = _resolve(cfg)
    from imgarena.data.images import decode_settings

    pre = data.preprocessing
    have = {k: v for k, v in decode_settings(pre).items() if k in FROM_WEIGHTS}
    have.update(mean=[float(v) for v in pre["mean"]], std=[float(v) for v in pre["std"]])
    actual = {}
    for key in FROM_WEIGHTS:
        want = getattr(data_cfg, key)
        if want is None:
            continue
        if key in ("mean", "std"):
            try:
                want = fit_channels(want, have["channels"])
            except UserError:
                pass
        if _same(want, have[key]):
            continue
        if origin.get(key) == "default":  # photo's crop fraction: the data's own, without a word
            actual[key] = have[key]
            continue
        if origin.get(key) == "user":
            raise UserError(f"the prepared data has {key} {have[key]} but the run asks for {want}: load the data "
                            f"with these settings (imgarena.engine.preprocessing.resolve_data_config(cfg)) or drop "
                            f"the {key} option")
        log.warning("the pretrained weights %s were trained with %s %s but the prepared data has %s; training with "
                    "the data's (load the data with resolve_data_config(cfg) to use the weights')",
                    cfg.pretrained, key, want, have[key])
        actual[key] = have[key]
    return dataclasses.replace(data_cfg, **actual) if actual else data_cfg


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-6 for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-9
    return a == b
