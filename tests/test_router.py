"""Tests of the MST-Distill router (:mod:`lightning_kd.losses.router`), CPU: gates and top-k routing, the
load-balancing term against a hand computation and against the authors' expression (``nn.KLDivLoss(batchmean)`` of
``log(mean gate)`` against the uniform distribution), the KD part against :func:`kd_loss` on the routed teachers, and
where the router's gradient comes from."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import SmallCNN, fast_trainer, make_loader

from lightning_kd import DistillationModule
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.kd import kd_loss
from lightning_kd.losses.router import GateNet, RouterKD, load_balance_loss, top_k_routes
from lightning_kd.strategies.multi_teacher import TeacherEnsemble

B, C, M = 6, 5, 3
NAMES = ["t0", "t1", "t2"]


def _teachers(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: 2 * torch.randn(B, C, generator=g) for name in NAMES}


def _router(**kwargs) -> RouterKD:
    torch.manual_seed(0)
    term = RouterKD(**kwargs)
    members = _teachers()
    probe = ModelOutputs(torch.zeros(2, C), members={k: v[:2] for k, v in members.items()})
    term.setup(SetupContext(ModelOutputs(torch.zeros(2, C)), probe, torch.nn.Identity(), torch.nn.Identity(), C))
    return term


def _batch(student: torch.Tensor) -> DistillBatch:
    members = _teachers()
    return DistillBatch(ModelOutputs(student), ModelOutputs(sum(members.values()) / M, members=members))


def _student(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, C, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gates_sum_to_one_and_exactly_k_teachers_per_sample(k: int) -> None:
    term = _router(top_k=k)
    gates = term.gates(_student())
    torch.testing.assert_close(gates.sum(-1), torch.ones(B))
    indices, routes = top_k_routes(gates, k)
    assert torch.equal((routes > 0).sum(-1), torch.full((B,), k))
    torch.testing.assert_close(routes.sum(-1), torch.ones(B))
    chosen = gates.gather(-1, indices)
    others = gates.masked_fill(routes > 0, -1).amax(-1)
    assert torch.all(chosen.amin(-1) >= others)  # the routed teachers are the k largest gates


def test_load_balance_by_hand_and_as_the_authors_write_it() -> None:
    gates = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])  # mean gate (0.4, 0.4, 0.2)
    by_hand = sum(1 / 3 * math.log((1 / 3) / g) for g in (0.4, 0.4, 0.2)) / 3
    assert load_balance_loss(gates).item() == pytest.approx(by_hand, rel=1e-6)
    mean = gates.mean(0)
    authors = torch.nn.KLDivLoss(reduction="batchmean")(torch.log(mean), torch.ones_like(mean) / 3)
    assert load_balance_loss(gates).item() == pytest.approx(authors.item(), rel=1e-6)
    assert load_balance_loss(torch.full((4, 3), 1 / 3)).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_part_is_the_mean_over_the_routed_teachers() -> None:
    term = _router(top_k=2, temperature=4.0, balance_weight=0.5)
    s = _student()
    parts = term(_batch(s))
    indices, _ = top_k_routes(term.gates(s), 2)
    stacked = torch.stack(list(_teachers().values()), 1)
    per_slot = [kd_loss(s, stacked[torch.arange(B), indices[:, j]], 4.0) for j in range(2)]
    assert parts["kd"].item() == pytest.approx(sum(per_slot).item() / 2, rel=1e-5)
    assert parts["balance"].item() == pytest.approx(0.5 * load_balance_loss(term.gates(s)).item(), rel=1e-5)
    routed = [term.diagnostics[f"routed/{n}"].item() for n in NAMES]
    assert sum(routed) == pytest.approx(2.0)  # each sample counts for its k teachers


def test_the_router_learns_from_the_balance_term_only_as_in_the_authors_code() -> None:
    term = _router(top_k=1)
    sum(term(_batch(_student())).values()).backward()
    grads = [p.grad for p in term.gate.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)

    term = _router(top_k=1, balance_weight=0.0)
    sum(term(_batch(_student())).values()).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in term.gate.parameters())

    term = _router(mode="weighted", balance_weight=0.0)  # the soft variant: the KD part reaches the gates
    sum(term(_batch(_student())).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.gate.parameters())


def test_balance_gradient_reaches_the_student_unless_detached() -> None:
    s = _student()
    term = _router(balance_weight=1.0)
    term(_batch(s))["balance"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0  # the authors feed the GateNet undetached logits
    s = _student()
    term = _router(detach_input=True)
    term(_batch(s))["balance"].backward()
    assert s.grad is None


def test_weighted_mode_distils_the_gate_weighted_logits() -> None:
    term = _router(mode="weighted", temperature=2.0)
    s = _student()
    gates = term.gates(s)
    mixed = (gates.unsqueeze(-1) * torch.stack(list(_teachers().values()), 1)).sum(1)
    assert term(_batch(s))["kd"].item() == pytest.approx(kd_loss(s, mixed, 2.0).item(), rel=1e-5)


def test_gate_net_has_the_authors_shape() -> None:
    net = GateNet(10, 4)
    assert [type(m) for m in net] == [torch.nn.Linear, torch.nn.Linear]
    assert (net[0].in_features, net[0].out_features, net[1].out_features) == (10, 20, 4)


class _Snapshot(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {k: v.clone() for k, v in pl_module.engine.terms["router"].gate.state_dict().items()}


def test_gate_net_trains_with_the_student_and_is_checkpointed() -> None:
    ensemble = TeacherEnsemble({"a": SmallCNN(seed=1), "b": SmallCNN(seed=2)})
    module = DistillationModule(SmallCNN(seed=0), ensemble, loss={"router": {"top_k": 1}})
    snapshot = _Snapshot()
    fast_trainer(max_steps=2, callbacks=[snapshot]).fit(module, make_loader())
    after = module.engine.terms["router"].gate.state_dict()
    assert any(not torch.equal(snapshot.before[k], after[k]) for k in after)  # in the optimizer, updated
    assert {"engine.terms.router.gate.0.weight", "engine.terms.router.gate.1.bias"} <= set(module.state_dict())


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="top_k=4 but the teacher has 3 member"):
        _router(top_k=4)
    with pytest.raises(ValueError, match="mode"):
        RouterKD(mode="soft")
    with pytest.raises(ValueError, match="top_k"):
        RouterKD(top_k=0)
    term = _router()
    batch = _batch(_student())
    batch.teacher.members.pop("t2")
    with pytest.raises(ValueError, match="set up for the teachers"):
        term(batch)
    assert isinstance(create_loss("router", top_k=2), RouterKD)
