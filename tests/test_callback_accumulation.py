"""DistillCallback with gradient accumulation.

The issue's contract: "with ``accumulate_grad_batches=k`` the distillation term is scaled like the task loss, so the
final weights match (to tolerance) a run with k× batch size on the same data order for plain KD."

Lightning divides the loss that ``training_step`` returns by ``k`` before backward; the callback returns
``task_weight · task + Σ w_i · term_i`` from the wrapped ``training_step``, so the distillation term is divided with
the task loss. For per-sample terms averaged over the batch (cross-entropy, KD's ``batchmean``) the mean of k
micro-batch means is the mean over the k·b samples, and without BatchNorm (``SmallCNN``) every optimizer step sees the
gradient of a k·b batch.

Batch-coupled terms are different *by design*: RKD compares the pairwise distances and angles of the samples in one
forward pass, so with accumulation it relates the samples of each micro-batch among themselves (and normalises by each
micro-batch's mean distance) — the k·b-batch relations are never formed. The last test pins that semantics down: the
accumulated run equals a k·b-batch run in which RKD is computed on each half of the batch and averaged.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SmallCNN, UserModule, fast_trainer, make_loader

from lightning_kd import DistillCallback
from lightning_kd.losses.base import DistillBatch, ModelOutputs
from lightning_kd.losses.rkd import RKDLoss

N, B, K = 64, 8, 2  # 64 samples: 4 optimizer steps of 16 samples either way


class Student(UserModule):
    def __init__(self, momentum: float = 0.0) -> None:
        super().__init__(SmallCNN(seed=0), lr=0.1)
        self.momentum = momentum

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class RKDPerHalf(RKDLoss):
    """RKD computed on each half of the batch separately and averaged: what accumulating two half-size micro-batches
    computes for RKD."""

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        halves = [self._half(batch, part) for part in (0, 1)]
        parts = [super(RKDPerHalf, self).forward(half) for half in halves]
        return {name: (parts[0][name] + parts[1][name]) / 2 for name in parts[0]}

    @staticmethod
    def _half(batch: DistillBatch, part: int) -> DistillBatch:
        def cut(t: torch.Tensor) -> torch.Tensor:
            return t.chunk(2)[part]

        def outputs(o: ModelOutputs) -> ModelOutputs:
            return ModelOutputs(cut(o.logits), {k: cut(v) for k, v in o.features.items()})

        return DistillBatch(outputs(batch.student), outputs(batch.teacher), step=batch.step, epoch=batch.epoch)


def _fit(loss, batch: int, accumulate: int, momentum: float = 0.0, task_weight: float = 0.5) -> dict[str, torch.Tensor]:
    model = Student(momentum)
    cb = DistillCallback(teacher=SmallCNN(seed=1), loss=loss, task_weight=task_weight)
    trainer = fast_trainer(max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[cb])
    trainer.fit(model, make_loader(n=N, batch=batch))  # make_loader does not shuffle: same data order in every run
    assert trainer.global_step == N // (batch * accumulate)
    return {name: p.detach().clone() for name, p in model.net.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=atol, msg=name)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


KD = {"kd": {"weight": 2.0, "temperature": 2.0}}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_kd_accumulated_matches_large_batch(momentum: float) -> None:
    start = {n: p.detach().clone() for n, p in SmallCNN(seed=0).named_parameters()}
    big = _fit(KD, batch=K * B, accumulate=1, momentum=momentum)
    accumulated = _fit(KD, batch=B, accumulate=K, momentum=momentum)
    _assert_same(accumulated, big)
    # the runs trained: the weights moved far beyond the tolerance
    assert _max_diff(big, start) > 1e-2


def test_unscaled_distillation_term_would_not_match() -> None:
    """Were the distillation term left out of the 1/k scaling, the accumulated run would train with
    ``task_weight · task / k + Σ w_i · term_i`` — the same as the correct scaling with k× the term weight. That run
    differs from the large-batch run by far more than the tolerance, so the test above can fail."""
    big = _fit(KD, batch=K * B, accumulate=1)
    unscaled = _fit({"kd": {**KD["kd"], "weight": K * KD["kd"]["weight"]}}, batch=B, accumulate=K)
    assert _max_diff(unscaled, big) > 1e-3
    with pytest.raises(AssertionError):
        _assert_same(unscaled, big)


def test_rkd_is_batch_coupled_under_accumulation() -> None:
    """RKD under accumulation relates the samples within each micro-batch (by design): it does not match the k×
    batch run with plain RKD, and it does match a k× batch run whose RKD is computed per micro-batch-sized chunk."""
    rkd = {"distance_weight": 25.0, "angle_weight": 50.0}
    big = _fit({**KD, "rkd": rkd}, batch=K * B, accumulate=1)
    big_per_half = _fit({**KD, "rkd": RKDPerHalf(**rkd)}, batch=K * B, accumulate=1)
    accumulated = _fit({**KD, "rkd": rkd}, batch=B, accumulate=K)
    assert _max_diff(accumulated, big) > 1e-2
    # RKD's weights (25, 50) and its B³ angles amplify float32 rounding: ~1e-6 here, against ~1e-1 for plain RKD
    _assert_same(accumulated, big_per_half, atol=1e-5)
