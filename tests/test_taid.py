"""Tests of TAID (:mod:`lightning_kd.losses.taid`), CPU.

Reference values: a hand computation with ``math`` for one position; the schedule of t recomputed from the update rule
of the reference code (github.com/SakanaAI/TAID, ``src/distil_losses/taid.py``) by hand; the gradient against autograd
through :func:`~lightning_kd.lm.divergences.dense_token_divergence` with ``teacher_mix=t``.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import pytest
import torch

from lightning_kd.lm.divergences import dense_token_divergence, next_token_mask
from lightning_kd.losses import DistillBatch, ModelOutputs, create_loss
from lightning_kd.losses.taid import TAIDLoss


def batch_of(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, *, step: int = 0, max_steps: int = 10
):
    return DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=labels, step=step, max_steps=max_steps)


def run(term: TAIDLoss, steps: int, *, max_steps: int, seed: int = 0, scale: float = 1.0) -> list[float]:
    """``steps`` training steps of random logits whose student approaches the teacher; the t used at each step."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2, 5, 7, generator=g)
    used = []
    for step in range(steps):
        student = teacher + scale * torch.randn(2, 5, 7, generator=g) * (1 - step / (steps + 1))
        term(batch_of(student, teacher, step=step, max_steps=max_steps))
        used.append(float(term.t))
    return used


# ------------------------------------------------------------------------------------------------- value and gradient
def test_hand_worked_one_position() -> None:
    z_s, z_t, t = [1.0, 0.0, -1.0], [-0.5, 2.0, 0.5], 0.4
    mix = [t * a + (1 - t) * b for a, b in zip(z_t, z_s)]
    p = [math.exp(v) / sum(math.exp(u) for u in mix) for v in mix]
    log_q = [v - math.log(sum(math.exp(u) for u in z_s)) for v in z_s]
    expected = -sum(pi * lq for pi, lq in zip(p, log_q))  # cross-entropy of p_t against q_S
    term = TAIDLoss(t_start=t, shift_labels=False)
    s = torch.tensor([[z_s]], requires_grad=True)
    got = term(batch_of(s, torch.tensor([[z_t]])))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the reference's value = KL(p_t ‖ q) + H(p_t)
    entropy = -sum(pi * math.log(pi) for pi in p)
    kl = dense_token_divergence(s.detach(), torch.tensor([[z_t]]), teacher_mix=t).item()
    assert got.item() == pytest.approx(kl + entropy, rel=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.4, 0.85])
def test_gradient_equals_autograd_of_dense_forward_kl(t: float) -> None:
    torch.manual_seed(0)
    s = torch.randn(3, 6, 11, requires_grad=True)
    teacher = torch.randn(3, 6, 11) * 2
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, 4:] = -100
    term = TAIDLoss(t_start=t, temperature=1.5, chunk_size=4).eval()
    term(batch_of(s, teacher, labels)).backward()
    ours = s.grad.clone()
    s.grad = None
    dense = dense_token_divergence(s, teacher, next_token_mask(labels), temperature=1.5, teacher_mix=t)
    dense.backward()
    torch.testing.assert_close(ours, s.grad, atol=1e-6, rtol=1e-5)


def test_masked_positions_and_padded_vocabulary_are_ignored() -> None:
    torch.manual_seed(1)
    s, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    labels = torch.randint(0, 6, (2, 5))
    labels[1, 1:3] = -100  # positions 0 and 1 of row 1 are not scored
    term = TAIDLoss().eval()
    base = term(batch_of(s, teacher, labels))
    s2 = s.clone()
    s2[1, 0:2] = 50.0
    assert term(batch_of(s2, teacher, labels)).item() == pytest.approx(base.item(), rel=1e-6)
    pad = torch.full((2, 5, 2), -torch.inf)
    padded = term(batch_of(torch.cat([s, pad], -1), torch.cat([teacher, pad], -1), labels))
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------ the schedule
def test_update_rule_hand_worked() -> None:
    term = TAIDLoss(t_start=0.4, t_end=1.0, alpha=0.05, beta=0.99)
    term.update(2.0, step=0, max_steps=100)  # first step: only remembers the loss
    assert float(term.t) == pytest.approx(0.4) and bool(term.started) and float(term.prev_loss) == 2.0
    term.update(1.5, step=1, max_steps=100)
    m = 0.01 * (2.0 - 1.5) / 2.0
    delta = 0.05 / (1 + math.exp(-m)) * (1 - 0.4)
    assert float(term.momentum) == pytest.approx(m, rel=1e-5)
    assert float(term.t) == pytest.approx(max(0.4 + 0.6 * 1 / 100, 0.4 + delta), rel=1e-6)
    assert float(term.delta) == pytest.approx(delta, rel=1e-5)
    term.update(1.5, step=90, max_steps=100)  # the linear floor wins when it is ahead
    assert float(term.t) == pytest.approx(0.4 + 0.6 * 0.9, rel=1e-6)


def test_t_is_monotone_and_clamped_at_t_end() -> None:
    term = TAIDLoss(t_start=0.2, t_end=0.9, alpha=0.3).train()
    used = run(term, 40, max_steps=40)
    assert used[0] == used[1] == pytest.approx(0.2)  # steps 0 and 1 use t_start (step 0's update only stores L)
    assert all(b >= a for a, b in itertools.pairwise(used))
    assert used[-1] == pytest.approx(0.9) and max(used) <= 0.9 + 1e-7  # reaches t_end and stays there
    linear = [term.linear_t(s - 1, 40) if s >= 2 else 0.2 for s in range(40)]
    assert all(u >= lin - 1e-6 for u, lin in zip(used, linear))  # never behind the linear floor


def test_disable_adaptive_gives_the_linear_schedule() -> None:
    steps = 20
    term = TAIDLoss(t_start=0.4, t_end=1.0, disable_adaptive=True).train()
    used = run(term, steps, max_steps=steps)
    expected = [0.4, 0.4] + [0.4 + 0.6 * (s - 1) / steps for s in range(2, steps)]
    assert used == pytest.approx(expected, rel=1e-6)
    # the update after the final step (step N - 1) gives t_lin(N - 1), as in the reference; t_end is t_lin(N)
    term.update(1.0, step=steps - 1, max_steps=steps)
    assert float(term.t) == pytest.approx(0.4 + 0.6 * (steps - 1) / steps)
    term.update(1.0, step=steps, max_steps=steps)
    assert float(term.t) == pytest.approx(1.0)


def test_unknown_number_of_steps() -> None:
    adaptive = TAIDLoss(t_start=0.3, alpha=0.2).train()
    used = run(adaptive, 8, max_steps=-1)
    assert used[1] == pytest.approx(0.3) and used[-1] > 0.3  # grows by the adaptive part only
    linear = TAIDLoss(disable_adaptive=True).train()
    linear(batch_of(torch.randn(1, 3, 4), torch.randn(1, 3, 4), step=0, max_steps=-1))
    with pytest.raises(ValueError, match="disable_adaptive"):
        linear(batch_of(torch.randn(1, 3, 4), torch.randn(1, 3, 4), step=1, max_steps=-1))


def test_once_per_optimizer_step_and_only_in_training() -> None:
    torch.manual_seed(2)
    micro = [(torch.randn(2, 4, 5), torch.randn(2, 4, 5)) for _ in range(6)]
    term = TAIDLoss(alpha=0.5).train()
    losses, used = [], []
    for i, (s, t) in enumerate(micro):  # 3 optimizer steps of 2 micro-batches each
        losses.append(term(batch_of(s, t, step=i // 2, max_steps=100)).item())
        used.append(float(term.t))
    assert used[0] == used[1] and used[2] == used[3] and used[4] == used[5]  # one t per optimizer step
    reference = TAIDLoss(alpha=0.5)
    reference.update((losses[0] + losses[1]) / 2, 0, 100)
    reference.update((losses[2] + losses[3]) / 2, 1, 100)
    assert used[4] == pytest.approx(float(reference.t), rel=1e-6) and used[4] > used[0]
    before = {k: v.clone() for k, v in term.state_dict().items()}
    term.eval()
    term(batch_of(*micro[0], step=7, max_steps=100))  # validation: no update, nothing pending
    assert all(torch.equal(before[k], v) for k, v in term.state_dict().items())
    assert set(term.diagnostics) == {"t", "delta"}


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(3)
    batches = [(torch.randn(2, 4, 5), torch.randn(2, 4, 5)) for _ in range(12)]
    first = TAIDLoss(alpha=0.4).train()
    for step, (s, t) in enumerate(batches[:6]):
        first(batch_of(s, t, step=step, max_steps=12))
    state = first.state_dict()
    assert {"t", "prev_loss", "momentum", "started", "pending_sum", "pending_count", "pending_step"} <= set(state)
    resumed = TAIDLoss(alpha=0.4).train()
    resumed.load_state_dict(state)
    for step, (s, t) in enumerate(batches[6:], start=6):
        a = first(batch_of(s, t, step=step, max_steps=12))
        b = resumed(batch_of(s, t, step=step, max_steps=12))
        assert a.item() == b.item() and float(first.t) == float(resumed.t)
    assert float(first.t) > 0.4


def test_state_keeps_float32_when_the_module_is_cast() -> None:
    term = TAIDLoss().train().to(torch.bfloat16)  # default α = 5e-4: steps far below bf16's spacing near 0.4
    assert term.t.dtype == torch.float32 and term.pending_sum.dtype == torch.float64
    used = run(term, 4, max_steps=-1)  # t grows by the adaptive part only
    reference = run(TAIDLoss().train(), 4, max_steps=-1)
    assert term.t.dtype == torch.float32 and used == reference and used[-1] > 0.4


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="t_start"):
        TAIDLoss(t_start=1.0)
    with pytest.raises(ValueError, match="t_end"):
        TAIDLoss(t_start=0.5, t_end=0.4)
    with pytest.raises(ValueError, match="alpha"):
        TAIDLoss(alpha=2.0)
    assert isinstance(create_loss("taid", t_start=0.2), TAIDLoss)


# ------------------------------------------------------------------------------------------------------------- DDP
STEPS = 5


def _ddp_worker(rank: int, pg: str, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    torch.distributed.init_process_group("gloo", init_method=f"file://{pg}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # different logits on each rank
        term = TAIDLoss(alpha=0.5).train()
        used, losses = [], []
        for step in range(STEPS):
            for buffer in term.buffers():  # as DDP does before each forward (broadcast_buffers=True)
                torch.distributed.broadcast(buffer, src=0)
            s, t = torch.randn(2, 4, 6) * (1 + rank), torch.randn(2, 4, 6)
            losses.append(term(batch_of(s, t, step=step, max_steps=50)).item())
            used.append(float(term.t))
        torch.save({"t": used, "loss": losses}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_share_t(tmp_path: Path) -> None:
    # fork (not spawn): the children inherit the imported package instead of importing it again (~30 s on 2 cores)
    context = torch.multiprocessing.start_processes(
        _ddp_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 60 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["loss"] != r1["loss"]
    assert r0["t"] == r1["t"]
    expected, alone = TAIDLoss(alpha=0.5), TAIDLoss(alpha=0.5)
    for step in range(STEPS - 1):
        expected.update((r0["loss"][step] + r1["loss"][step]) / 2, step, 50)
        alone.update(r0["loss"][step], step, 50)
    assert r0["t"][-1] == pytest.approx(float(expected.t), rel=1e-6)
    assert float(alone.t) != pytest.approx(float(expected.t), rel=1e-6)  # the all-reduce mattered


def test_lightning_checkpoint_resume_continues_the_schedule(tmp_path: Path) -> None:
    """Through a real fit: a run stopped after 2 steps (one epoch of 2 batches), saved (weights_only load) and resumed
    to 4 steps ends with the same t, prev_loss and momentum as an uninterrupted 4-step run."""
    import lightning as L
    from lm_helpers import tiny_lm, token_loader

    from lightning_kd.lm.module import LMDistillationModule

    def fit(steps: int, ckpt=None, save=None):
        torch.manual_seed(0)
        teacher = tiny_lm(50, n_layer=2, seed=1)  # constant learning rate: a cosine over max_steps would differ
        module = LMDistillationModule(tiny_lm(50, seed=0), teacher, loss={"taid": {}}, scheduler=None)
        trainer = L.Trainer(
            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, token_loader(2), ckpt_path=ckpt)
        if save is not None:
            trainer.save_checkpoint(save)
        return module.engine.terms["taid"]

    straight = fit(4)
    fit(2, save=tmp_path / "two.ckpt")
    state = torch.load(tmp_path / "two.ckpt", weights_only=True)["state_dict"]
    assert "engine.terms.taid.t" in state
    resumed = fit(4, ckpt=tmp_path / "two.ckpt")
    for name in ("t", "prev_loss", "momentum"):
        assert torch.allclose(getattr(resumed, name), getattr(straight, name)), name
    assert float(straight.t) > straight.t_start  # the schedule moved
