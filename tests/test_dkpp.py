"""Dark Knowledge with Permuted Predictions (:mod:`lightning_kd.losses.dkpp`, BAN's second ablation), CPU: the
permutation (argmax kept, multiset kept, uniformly random, per sample, reproducible from (seed, step)), hand-worked
values with ``math`` only, the reduction to KD with two classes, the paper's gradient (Eq. 11), dtype, the YAML
config and the module wrapper."""

from __future__ import annotations

import inspect
import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import GapNet, fast_trainer, gen, make_loader
from omegaconf import OmegaConf

from lightning_kd import DistillationModule
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, create_loss
from lightning_kd.losses.dkpp import DKPPLoss, dkpp_loss, dkpp_step_seed, permute_non_argmax
from lightning_kd.losses.kd import kd_loss

TOL = {"atol": 1e-6, "rtol": 1e-5}


def batch_of(s, t, step: int = 0) -> DistillBatch:
    return DistillBatch(ModelOutputs(s), ModelOutputs(t), step=step)


def _softmax(z: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# --------------------------------------------------------------------------------------------------- the permutation
def test_keeps_the_argmax_in_place_and_the_multiset_of_values() -> None:
    t = torch.randn(64, 10, generator=gen(0)) * 3
    out = permute_non_argmax(t, gen(1))
    rows = torch.arange(64)
    top = t.argmax(-1)
    assert torch.equal(out.argmax(-1), top) and torch.equal(out[rows, top], t[rows, top])
    assert torch.equal(out.sort(-1).values, t.sort(-1).values)  # same values per row, only moved
    p, q = F.softmax(t, -1), F.softmax(out, -1)  # so the probabilities are the same multiset too
    torch.testing.assert_close(q.sort(-1).values, p.sort(-1).values, **TOL)
    moved = (out != t).any(-1)
    assert moved.float().mean() > 0.9  # with 9 free classes nearly every row is really permuted


def test_permutations_are_uniform_and_independent_per_sample() -> None:
    # 3 classes with the argmax first: the two others either stay or swap, each with probability 1/2; with 4 classes
    # each of the 3! arrangements of the non-argmax values appears with probability 1/6 (not a cyclic shift, etc.)
    n = 6000
    t = torch.tensor([[9.0, 1.0, 2.0, 3.0]]).expand(n, 4)
    out = permute_non_argmax(t, gen(2))
    counts = Counter(tuple(row[1:].tolist()) for row in out)
    assert set(counts) == set(itertools.permutations([1.0, 2.0, 3.0]))
    for c in counts.values():
        assert abs(c / n - 1 / 6) < 0.025
    assert len({tuple(r.tolist()) for r in out[:8]}) > 1  # the rows of one batch get different permutations


def test_the_argmax_may_be_any_class() -> None:
    t = torch.tensor([[0.0, 1.0, 5.0, 2.0, 3.0], [4.0, 0.0, 1.0, 2.0, 3.0]])
    for seed in range(20):
        out = permute_non_argmax(t, gen(seed))
        assert out[0, 2] == 5.0 and out[1, 0] == 4.0


def test_reproducible_from_seed_and_step() -> None:
    s, t = torch.randn(8, 10, generator=gen(3)), torch.randn(8, 10, generator=gen(4))
    term = DKPPLoss(seed=5)
    a, b = term(batch_of(s, t, step=7)), DKPPLoss(seed=5)(batch_of(s, t, step=7))
    assert torch.equal(a, b)
    assert not torch.equal(a, term(batch_of(s, t, step=8)))
    assert not torch.equal(a, DKPPLoss(seed=6)(batch_of(s, t, step=7)))
    torch.manual_seed(123)  # independent of the global RNG
    assert torch.equal(a, term(batch_of(s, t, step=7)))
    assert len({dkpp_step_seed(seed, step) for seed in range(4) for step in range(100)}) == 400


# --------------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_hand_worked_three_classes(tau: float) -> None:
    # teacher argmax = class 0; the two others either stay ([3, 1, 0.5]) or swap ([3, 0.5, 1])
    s, t = [1.0, 2.0, 0.0], [3.0, 1.0, 0.5]
    stay = tau**2 * _kl(_softmax(t, tau), _softmax(s, tau))
    swap = tau**2 * _kl(_softmax([3.0, 0.5, 1.0], tau), _softmax(s, tau))
    assert abs(stay - swap) > 1e-3
    seen = set()
    for seed in range(12):
        g = gen(seed)
        permuted = permute_non_argmax(torch.tensor([t]), gen(seed))
        expected = stay if permuted[0, 1] == 1.0 else swap
        seen.add(expected)
        assert dkpp_loss(torch.tensor([s]), torch.tensor([t]), tau, g).item() == pytest.approx(expected, rel=1e-5)
    assert seen == {stay, swap}  # both outcomes occur


def test_is_kd_with_the_permuted_teacher_and_exactly_kd_with_two_classes() -> None:
    s, t = torch.randn(6, 7, generator=gen(5)), torch.randn(6, 7, generator=gen(6))
    torch.testing.assert_close(dkpp_loss(s, t, 2.0, gen(9)), kd_loss(s, permute_non_argmax(t, gen(9)), 2.0), **TOL)
    s2, t2 = torch.randn(6, 2, generator=gen(7)), torch.randn(6, 2, generator=gen(8))
    for step in range(3):
        torch.testing.assert_close(DKPPLoss(temperature=3.0)(batch_of(s2, t2, step)), kd_loss(s2, t2, 3.0), **TOL)


def test_gradient_is_the_papers_eq_11() -> None:
    # τ = 1: d/dz_S = (q − φ(p_T)) / b, with φ(p_T) the permuted teacher distribution (argmax entry = max p_T)
    s = torch.randn(5, 6, generator=gen(10), requires_grad=True)
    t = torch.randn(5, 6, generator=gen(11)) * 2
    dkpp_loss(s, t, 1.0, gen(12)).backward()
    target = F.softmax(permute_non_argmax(t, gen(12)), -1)
    torch.testing.assert_close(s.grad, (F.softmax(s.detach(), -1) - target) / 5, **TOL)
    rows = torch.arange(5)
    torch.testing.assert_close(target[rows, t.argmax(-1)], F.softmax(t, -1).amax(-1), **TOL)


def test_float32_under_bf16_and_no_teacher_gradient() -> None:
    s = torch.randn(4, 5, generator=gen(13)).bfloat16().requires_grad_()
    t = torch.randn(4, 5, generator=gen(14)).bfloat16().requires_grad_()
    out = DKPPLoss()(batch_of(s, t, step=3))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert s.grad is not None and t.grad is None


def test_errors() -> None:
    with pytest.raises(ValueError, match="dkpp: temperature"):
        DKPPLoss(temperature=0.0)
    with pytest.raises(ValueError, match="dkpp: seed must be an integer"):
        DKPPLoss(seed=-1)
    with pytest.raises(ValueError, match="differ in shape"):
        dkpp_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="batch, classes"):
        permute_non_argmax(torch.zeros(3))


# ---------------------------------------------------------------------------------------------- config and the module
def test_yaml_keys_are_the_constructor_params() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "dkpp.yaml"))
    assert set(yaml["terms"]["dkpp"]) == {p for p in inspect.signature(DKPPLoss.__init__).parameters if p != "self"}
    assert yaml["task_weight"] == 0.0  # the paper's DKPP students learn from the teacher's outputs only
    term = build_terms(compose(["loss=dkpp"]).loss.terms)["dkpp"]
    assert isinstance(term, DKPPLoss) and (term.weight, term.temperature, term.seed) == (1.0, 1.0, 0)
    assert isinstance(create_loss("dkpp"), DKPPLoss)


def test_trains_through_the_module() -> None:
    module = DistillationModule(GapNet(classes=10, seed=0), GapNet(classes=10, seed=1), loss="dkpp", task_weight=0.0)
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = fast_trainer(max_steps=1)
    trainer.fit(module, make_loader(n=16, size=8))
    assert math.isfinite(float(trainer.callback_metrics["train/dkpp"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))
