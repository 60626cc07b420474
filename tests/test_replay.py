"""Replayable augmentation: per-sample views that depend only on (seed, slot, dataset index)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import SmallCNN, UserModule, fast_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.strategies.replay import (
    RandomCropFlip,
    RandomShift,
    ReplayAugment,
    draw,
    fmix32,
    sample_keys,
)


def murmur3_fmix32(h: int) -> int:
    """The reference finaliser (MurmurHash3, fmix32), written with explicit 32-bit wrap-around."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_fmix32_is_murmur3_on_ints_and_tensors() -> None:
    rng = random.Random(0)
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + [rng.getrandbits(32) for _ in range(2000)]
    expected = [murmur3_fmix32(v) for v in values]
    assert [fmix32(v) for v in values] == expected
    assert fmix32(torch.tensor(values, dtype=torch.int64)).tolist() == expected
    assert murmur3_fmix32(1) == 0x514E28B7  # a published test value of fmix32


def test_draws_are_uniform_and_independent() -> None:
    keys = sample_keys(torch.arange(30000), seed=0, slot=0)
    for j in (0, 1):
        counts = torch.bincount(draw(keys, j) % 5, minlength=5).float() / len(keys)
        assert torch.allclose(counts, torch.full((5,), 0.2), atol=0.01), counts
    # two draws of the same sample are not correlated
    joint = torch.bincount((draw(keys, 0) % 3) * 3 + draw(keys, 1) % 3, minlength=9).float() / len(keys)
    assert torch.allclose(joint, torch.full((9,), 1 / 9), atol=0.01), joint
    flips = (draw(keys, 2) & 1).float().mean()
    assert abs(float(flips) - 0.5) < 0.01


def test_same_seed_slot_index_same_view_whatever_the_batch() -> None:
    aug = ReplayAugment(RandomCropFlip(4), seed=7, period=3)
    x = torch.randn(16, 3, 12, 12)
    idx = torch.arange(100, 116)
    full = aug.apply(x, idx, epoch=1)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:5]
    # another batch composition, order and size; epoch 4 has the same slot (4 % 3 == 1)
    part = aug.apply(x[perm], idx[perm], epoch=4)
    assert torch.equal(full[perm], part)
    # another slot or another seed gives other views (offsets: 81 crops x 2 flips, so nearly all differ)
    other_slot = aug.apply(x, idx, epoch=2)
    other_seed = ReplayAugment(RandomCropFlip(4), seed=8, period=3).apply(x, idx, epoch=1)
    for other in (other_slot, other_seed):
        differ = (other != full).flatten(1).any(1).float().mean()
        assert differ > 0.8
    # period=None: every epoch is its own slot
    assert not torch.equal(
        ReplayAugment(RandomShift(2)).apply(x, idx, 0), ReplayAugment(RandomShift(2)).apply(x, idx, 1)
    )


def test_shift_and_crop_flip_are_the_documented_crops() -> None:
    x = torch.randn(6, 2, 5, 7)
    keys = sample_keys(torch.arange(6), seed=1, slot=0)
    shift = RandomShift(2)
    top, left, flipped = shift.offsets(keys)
    assert not flipped.any() and int(top.max()) <= 4 and int(left.max()) <= 4
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    expected = torch.stack([padded[b, :, t : t + 5, l : l + 7] for b, (t, l) in enumerate(zip(top, left))])
    assert torch.equal(shift(x, keys), expected)

    crop = RandomCropFlip(padding=3, fill=-1.0)
    top, left, flipped = crop.offsets(keys)
    padded = F.pad(x, (3, 3, 3, 3), value=-1.0)
    crops = [padded[b, :, t : t + 5, l : l + 7] for b, (t, l) in enumerate(zip(top, left))]
    expected = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flipped)])
    assert torch.equal(crop(x, keys), expected)
    assert flipped.any() and not flipped.all()


def test_signature_is_json_and_leaves_out_the_period() -> None:
    a = ReplayAugment(RandomCropFlip(4), seed=3, period=2).signature()
    b = ReplayAugment(RandomCropFlip(4), seed=3, period=5).signature()
    assert a == b == json.loads(json.dumps(a))
    assert a["transform"] == {"name": "RandomCropFlip", "padding": 4, "fill": 0.0}
    assert ReplayAugment(RandomShift(1), seed=3).signature() != a


def test_batch_containers() -> None:
    aug = ReplayAugment(RandomShift(2), seed=0)
    x, y, idx = torch.randn(4, 3, 8, 8), torch.arange(4), torch.arange(4)
    batch = [x, y, idx]
    aug.augment_batch(batch, epoch=0)
    assert torch.equal(batch[0], aug.apply(x, idx, 0)) and batch[1] is y
    mapping = {"image": x, "label": y, "index": idx}
    aug.augment_batch(mapping, epoch=0)
    assert torch.equal(mapping["image"], aug.apply(x, idx, 0))
    with pytest.raises(TypeError, match="list"):
        aug.augment_batch((x, y, idx), epoch=0)
    with pytest.raises(TypeError, match="list"):
        aug.augment_batch(x, epoch=0)
    with pytest.raises(ValueError, match="dataset index"):
        aug.augment_batch([x, y], epoch=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="period"):
        ReplayAugment(RandomShift(2), period=0)
    with pytest.raises(TypeError, match="ReplayTransform"):
        ReplayAugment(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="padding"):
        RandomCropFlip(-1)
    with pytest.raises(ValueError, match="B, C, H, W"):
        RandomShift(1)(torch.randn(3, 8, 8), torch.arange(3))


class Recording(UserModule):
    def __init__(self) -> None:
        super().__init__(SmallCNN())
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch[0].clone(), batch[2].clone()))
        return super().training_step(batch, batch_idx)


def test_training_step_sees_the_view_of_its_epoch() -> None:
    x = torch.randn(12, 3, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.arange(12) % 10, torch.arange(12)), batch_size=4, shuffle=True)
    aug = ReplayAugment(RandomShift(2), seed=5, period=2)
    module = Recording()
    fast_trainer(max_epochs=3, callbacks=[aug]).fit(module, loader)
    views: dict[tuple[int, int], torch.Tensor] = {}
    for epoch, inputs, idx in module.seen:
        assert torch.equal(inputs, aug.apply(x[idx], idx, epoch))
        for i, view in zip(idx.tolist(), inputs):
            views[(epoch, i)] = view
    # epoch 2 replays epoch 0 (same slot) although the shuffled batches differ; epoch 1 shows other views
    assert all(torch.equal(views[(2, i)], views[(0, i)]) for i in range(12))
    assert sum(not torch.equal(views[(1, i)], views[(0, i)]) for i in range(12)) >= 9
