"""BatchLoader order/resume/sharding and batched augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgarena.data.augment import PRESETS, augment_batch, mix_batch
from imgarena.data.loader import BatchLoader
from imgarena.data.prepare import Split


def _split(n=50, c=1, size=8):
    # Image i is filled with value i, so a batch tells exactly which samples it holds.
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(c, 1).repeat(size, 2).repeat(size, 3)
    return Split(images, np.arange(n, dtype=np.int64) % 5, [f"x/{i}" for i in range(n)])


def _ids(x):
    return (x[:, 0, 0, 0] * 1 + 0).round().long().tolist()


def _loader(split, **kw):
    kw = {"shuffle": True, "seed": 7, "mean": (0.0,), "std": (1 / 255,), **kw}
    return BatchLoader(split, kw.pop("batch_size", 8), **kw)


def test_epoch_order_labels_and_drop_last():
    s = _split()
    L = _loader(s)
    L.set_epoch(0)
    e0 = [(_ids(x), y.tolist()) for x, y in L]
    assert len(e0) == len(L) == 7
    ids = [i for b, _ in e0 for i in b]
    assert sorted(ids) == list(range(50))
    assert all(y == [i % 5 for i in b] for b, y in e0)  # labels travel with their images
    L.set_epoch(1)
    assert [i for x, _ in L for i in _ids(x)] != ids  # reshuffled each epoch
    L.set_epoch(0)
    assert [i for x, _ in L for i in _ids(x)] == ids  # ... from the seed
    assert len(_loader(s, drop_last=True)) == 6
    x, y = next(iter(_loader(s)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (8, 1, 8, 8)


def test_sharding_gives_disjoint_equal_shards():
    s = _split(n=48)
    shards = []
    for rank in range(3):
        L = _loader(s, rank=rank, world_size=3)
        L.set_epoch(2)
        shards.append([i for x, _ in L for i in _ids(x)])
    assert [len(sh) for sh in shards] == [16, 16, 16]
    assert sorted(sum(shards, [])) == list(range(48))
    odd = [len(_loader(_split(n=50), rank=r, world_size=3)) for r in range(3)]
    assert len(set(odd)) == 1  # equal batch counts per rank even when N is not divisible


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_resume_at_epoch_step_gives_identical_batches(preset):
    s = _split()
    L = _loader(s, augment=preset, mean=(0.5,), std=(0.25,))
    L.set_epoch(3)
    full = list(L)
    L.set_epoch(3, start_step=4)
    resumed = list(L)
    assert len(resumed) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("preset", PRESETS)
def test_augment_keeps_shape_dtype_and_varies_per_sample(preset):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = torch.rand(1, 3, 16, 16)
    x = base.repeat(32, 1, 1, 1)  # 32 copies of one image
    out = augment_batch(x.clone(), preset, g)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    distinct = len({tuple(o.flatten().round(decimals=4).tolist()) for o in out})
    if preset == "none":
        assert torch.equal(out, x)
    elif preset == "flip":  # each sample is the image or its mirror, and both occur
        mirrored = [torch.equal(o, base[0].flip(-1)) for o in out]
        assert all(m or torch.equal(o, base[0]) for m, o in zip(mirrored, out)) and 0 < sum(mirrored) < 32
    else:
        assert distinct >= 4  # per-sample random parameters, not one draw for the whole batch
    assert torch.equal(x, base.repeat(32, 1, 1, 1))  # the input batch is not modified in place


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="augment must be one of"):
        _loader(_split(), augment="heavy")


def test_mix_batch_soft_targets():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    xm, ys = mix_batch(x, y, 3, mixup_alpha=0.4, cutmix_alpha=0.0, generator=g, label_smoothing=0.1)
    assert xm.shape == x.shape and ys.shape == (6, 3)
    assert torch.allclose(ys.sum(1), torch.ones(6)) and not torch.equal(xm, x)
    xc, yc = mix_batch(x, y, 3, mixup_alpha=0.0, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(yc.sum(1), torch.ones(6))
    changed = (xc != x).any(dim=1)  # cutmix pastes a box: some pixels changed, others untouched
    assert changed.any() and not changed.all()
    _, plain = mix_batch(x, y, 3, mixup_alpha=0, cutmix_alpha=0)
    assert torch.equal(plain, torch.nn.functional.one_hot(y, 3).float())


def test_channels_last_and_normalisation():
    s = _split(c=3)
    L = _loader(s, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, channels_last=True, shuffle=False)
    x, _ = next(iter(L))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert _ids(x) == list(range(8))


@pytest.mark.parametrize("op", ["coarse_dropout_", "random_erasing_"])
def test_box_fill_paths_agree(op):
    # The CPU slice path and the GPU mask path must erase exactly the same pixels.
    from imgarena.data import augment

    x = torch.rand(16, 3, 20, 20)
    kwargs = {"fill": torch.tensor([0.1, 0.2, 0.3])} if op == "random_erasing_" else {}
    a = getattr(augment, op)(x.clone(), torch.Generator().manual_seed(5), p=0.7, use_slices=True, **kwargs)
    b = getattr(augment, op)(x.clone(), torch.Generator().manual_seed(5), p=0.7, use_slices=False, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, x)
