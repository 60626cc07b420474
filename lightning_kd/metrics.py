"""Distillation metrics
^^^^^^^^^^^^^^^^^^^^

:class:`TeacherStddev` ("T. stddev"): how much the teacher's *mean* prediction moves from one chunk of (augmented)
training samples to the next. Wang, Lohit, Jones, Fu, "What Makes a 'Good' Data Augmentation in Knowledge
Distillation -- A Statistical Perspective", NeurIPS 2022 (arXiv:2012.02909): a good augmentation for KD lowers the
variance of the teacher–student cross-entropy, and this teacher-only statistic is the paper's practical proxy (lower
is better; it correlates with the student's test loss across augmentations).

.. math::

    \\bar p_k = \\frac{1}{|C_k|} \\sum_{i \\in C_k} \\mathrm{softmax}(z_{T,i}), \\qquad
    \\text{T-stddev} = \\frac{1}{C} \\sum_{c=1}^{C} \\mathrm{std}_k\\big(\\bar p_{k,c}\\big)

for consecutive chunks :math:`C_k` of ``chunk_size`` samples, with the unbiased standard deviation over the
:math:`K` complete chunks (a final incomplete chunk is left out) and the softmax at temperature 1. Sums are kept in
float64, enough for the values of the paper (standard deviations of 1e-3 to 1e-2 of mean probabilities).

Checked against the authors' code, MingSun-Tse/Good-DA-in-KD ``helper/loops.py`` (``utils.check_ce_var``): softmax
of the teacher's logits, chunks of 5 batches (10 with mixing, where each batch adds its original and its mixed half),
mean probability vector per chunk, ``torch.std`` across chunks (unbiased) per class, mean over classes; only complete
chunks count. Here a chunk is a number of *samples* (``chunk_size``); with batches of 64 the authors' chunk is 320
samples (the default). Chunks are cut at sample boundaries, so a chunk may span two batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchmetrics import Metric

from lightning_kd.engine import as_logits, eval_mode, unpack_batch


class TeacherStddev(Metric):
    """T-stddev: the standard deviation of the teacher's mean probability vector across chunks of samples, averaged
    over classes (Wang et al., NeurIPS 2022; see the module docstring for the formula and what was checked).

    Call :meth:`update` with the teacher's logits ``[N, C]`` on (augmented) training inputs, then :meth:`compute`.

    The state is the number of complete chunks :math:`K` and the sums :math:`\\sum_k \\bar p_k`,
    :math:`\\sum_k \\bar p_k^2` (float64), so the unbiased variance is
    :math:`(\\sum_k \\bar p_k^2 - (\\sum_k \\bar p_k)^2 / K) / (K - 1)`; under DDP each rank cuts its own samples into
    chunks and the sums are added across ranks (the same value as the standard deviation over all ranks' chunk
    means). The samples of a rank's incomplete chunk wait in a buffer for the next update and are left out of
    :meth:`compute`. Give ``num_classes`` under DDP when a rank may see no data (the state's shape is otherwise set by
    the first update).

    Args:
        chunk_size: samples per chunk (> 0). The authors' chunk is 5 batches of 64 = 320 samples.
        num_classes: the number of classes ``C``; default: taken from the first update.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``...).

    Example::

        >>> metric = TeacherStddev(chunk_size=2)
        >>> p = torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
        >>> metric.update(p.log())          # logits whose softmax is p
        >>> round(float(metric.compute()), 4)   # chunk means (0.6, 0.4), (0.3, 0.7): std 0.3/sqrt(2) per class
        0.2121
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = True

    num_chunks: torch.Tensor
    mean_sum: torch.Tensor
    mean_sq_sum: torch.Tensor
    pending: torch.Tensor
    pending_count: torch.Tensor

    def __init__(self, chunk_size: int = 320, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(
                f"TeacherStddev: chunk_size must be a positive integer (samples per chunk), got {chunk_size}"
            )
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"TeacherStddev: num_classes must be a positive integer or None, got {num_classes}")
        self.chunk_size = chunk_size
        c = num_classes or 0
        f64 = torch.float64
        self.add_state("num_chunks", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("mean_sum", torch.zeros(c, dtype=f64), dist_reduce_fx="sum")
        self.add_state("mean_sq_sum", torch.zeros(c, dtype=f64), dist_reduce_fx="sum")
        # the rows of this rank's incomplete chunk (its reduction is never used: compute() leaves them out)
        self.add_state("pending", torch.zeros(chunk_size, c, dtype=f64), dist_reduce_fx="sum")
        self.add_state("pending_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor) -> None:
        """Add the teacher's logits ``[N, C]`` of ``N`` samples (softmax at temperature 1)."""
        logits = as_logits(logits)
        if logits.dim() != 2:
            raise ValueError(f"TeacherStddev.update expects teacher logits of shape [N, C], got {tuple(logits.shape)}")
        probs = logits.detach().to(torch.float64).softmax(dim=-1)
        c = probs.shape[-1]
        if self.mean_sum.numel() == 0:  # first update: the class count sets the state's shape
            self.mean_sum, self.mean_sq_sum = probs.new_zeros(c), probs.new_zeros(c)
            self.pending = probs.new_zeros(self.chunk_size, c)
        elif self.mean_sum.numel() != c:
            raise ValueError(f"TeacherStddev: got logits for {c} classes after {self.mean_sum.numel()}")
        rows = torch.cat([self.pending[: int(self.pending_count)], probs], dim=0)
        full = rows.shape[0] // self.chunk_size * self.chunk_size
        if full:
            means = rows[:full].reshape(-1, self.chunk_size, c).mean(dim=1)
            self.num_chunks += means.shape[0]
            self.mean_sum += means.sum(dim=0)
            self.mean_sq_sum += means.square().sum(dim=0)
        rest = rows[full:]
        self.pending = torch.cat([rest, rest.new_zeros(self.chunk_size - rest.shape[0], c)])
        self.pending_count = torch.tensor(rest.shape[0], dtype=torch.long, device=probs.device)

    def forward(self, logits: torch.Tensor) -> None:
        """Same as :meth:`update` (one batch rarely holds the 2 chunks a per-batch value needs); returns ``None``."""
        self.update(logits)

    def compute(self) -> torch.Tensor:
        """Mean over classes of the unbiased standard deviation across chunk means; NaN (with a warning) when fewer
        than 2 complete chunks were collected."""
        k = float(self.num_chunks)
        if k < 2:
            rank_zero_warn(
                f"TeacherStddev needs at least 2 complete chunks of {self.chunk_size} samples, got {int(k)}; "
                "returning NaN. Feed more samples or use a smaller chunk_size."
            )
            return torch.tensor(float("nan"))
        variance = (self.mean_sq_sum - self.mean_sum.square() / k) / (k - 1)
        return variance.clamp_min(0).sqrt().mean().float()


@torch.no_grad()
def teacher_stddev(
    teacher: nn.Module,
    dataloader: Iterable[Any],
    *,
    chunk_size: int = 320,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> float:
    """T-stddev of ``teacher`` over ``dataloader`` (one pass, eval mode, no grad).

    Args:
        teacher: the teacher (any module returning logits, a ``.logits`` attribute or a ``'logits'`` key).
        dataloader: batches as accepted by :func:`~lightning_kd.engine.unpack_batch` (``(x, y, index)``, dicts...).
        chunk_size: samples per chunk (see :class:`TeacherStddev`).
        transform: a batch augmentation applied to the inputs on the device before the teacher sees them (the point
            of the metric is to compare augmentations: run it once per candidate augmentation).
        device: where to run the teacher (default: the device of its parameters).
        max_batches: stop after this many batches.

    Raises:
        ValueError: when the data gives fewer than 2 complete chunks.
    """
    if device is None:
        param = next(teacher.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    metric = TeacherStddev(chunk_size=chunk_size, sync_on_compute=False).to(device)
    with eval_mode(teacher):
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            inputs = unpack_batch(batch)[0].to(device)
            if transform is not None:
                inputs = transform(inputs)
            metric.update(as_logits(teacher(inputs)))
    if int(metric.num_chunks) < 2:
        raise ValueError(
            f"teacher_stddev: the data gave {int(metric.num_chunks)} complete chunk(s) of {chunk_size} samples; at least 2 "
            "are needed. Use a smaller chunk_size, more batches or a larger max_batches."
        )
    return float(metric.compute())


__all__ = ["TeacherStddev", "teacher_stddev"]
