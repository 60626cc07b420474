"""ND loss of KD++ (:mod:`lightning_kd.losses.nd`): hand-worked values and gradients, the authors' per-sample loop,
the minimum and invariances, the class-mean pass (exact means, empty classes, a real 2-process gloo all-reduce),
errors, dtype, state_dict round trip, the YAML and a timm pair through Lightning (CPU)."""

from __future__ import annotations

import inspect
import math
import os
import socket
import tempfile

import pytest
import timm
import torch
from conftest import fast_trainer, gen, make_loader, tiny
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import DistillEngine, build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, TeacherPass, create_loss
from lightning_kd.losses.connectors import ShapeMismatchError
from lightning_kd.losses.nd import NDLoss, all_reduce_sum, class_means, class_sums, nd_loss

TOL = {"atol": 1e-6, "rtol": 1e-5}
EMB = "embedding"


def _ctx(s_width: int, t_width: int, classes: int = 2, batch: int = 2) -> SetupContext:
    return SetupContext(
        student=ModelOutputs(torch.zeros(batch, classes), {NDLoss().student_tap: torch.zeros(batch, s_width)}),
        teacher=ModelOutputs(torch.zeros(batch, classes), {NDLoss().teacher_tap: torch.zeros(batch, t_width)}),
        student_model=nn.Identity(),
        teacher_model=nn.Identity(),
        num_classes=classes,
    )


def _pass(t: torch.Tensor, y: torch.Tensor) -> TeacherPass:
    return TeacherPass(ModelOutputs(torch.zeros(len(t), 2), {NDLoss().teacher_tap: t}), y, None)


def _batch(term: NDLoss, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> DistillBatch:
    b = len(s)
    return DistillBatch(
        ModelOutputs(torch.zeros(b, 2), {term.student_tap: s}),
        ModelOutputs(torch.zeros(b, 2), {term.teacher_tap: t}),
        y,
    )


def _prepared(centres: torch.Tensor, s_width: int | None = None) -> NDLoss:
    """A term whose class means are exactly ``centres`` (one pass with one sample per class)."""
    k, d = centres.shape
    term = NDLoss()
    term.setup(_ctx(s_width or d, d, classes=k))
    term.prepare([_pass(centres, torch.arange(k))])
    return term


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_two_samples_value_and_gradient() -> None:
    # class 0 centre (2, 0) -> e = (1, 0); class 1 centre (0, -3) -> e = (0, -1)
    centres = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    # sample 1, y = 0: s = (3, 4), |s| = 5 > |t| = 2  -> 1 - 3/5 = 0.4
    # sample 2, y = 1: s = (1, -1), |s| = sqrt 2 < |t| = 4 -> 1 - 1/4 = 0.75
    s = torch.tensor([[3.0, 4.0], [1.0, -1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    y = torch.tensor([0, 1])
    term = _prepared(centres)
    loss = term(_batch(term, s, t, y))
    assert float(loss) == pytest.approx((0.4 + 0.75) / 2, rel=1e-6)
    loss.backward()
    # sample 1 (student norm is the max): d/ds [1 - s·e/|s|] = -(e/|s| - (s·e) s/|s|^3), / B
    g1 = [-(1 / 5 - 3 * 3 / 125) / 2, -(0 - 3 * 4 / 125) / 2]
    # sample 2 (teacher norm is the max, a constant): d/ds [1 - s·e/|t|] = -e/|t|, / B
    g2 = [0.0, 1 / 4 / 2]
    torch.testing.assert_close(s.grad, torch.tensor([g1, g2]), **TOL)


def _authors_loop(s: torch.Tensor, t: torch.Tensor, centres: dict[str, list[float]], y: torch.Tensor) -> torch.Tensor:
    """The authors' DirectNormLoss.project_center + forward (CIFAR/utils.py), re-typed with plain Python control flow."""
    loss = 0.0
    for si, ti, yi in zip(s, t, y):
        c = torch.tensor(centres[str(int(yi))])
        e = c / c.norm(p=2)
        max_norm = max(si.norm(p=2), ti.norm(p=2))
        loss = loss + 1 - torch.dot(si, e) / max_norm
    return loss / len(y)


def test_matches_the_authors_per_sample_loop_with_gradients() -> None:
    k, d, b = 5, 16, 12
    centres = torch.randn(k, d, generator=gen(1))
    t = torch.randn(b, d, generator=gen(2)) * torch.linspace(0.2, 3.0, b).unsqueeze(1)  # both norm orders occur
    s0 = torch.randn(b, d, generator=gen(3))
    y = torch.randint(0, k, (b,), generator=gen(4))
    s_ref, s_ours = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    expected = _authors_loop(s_ref, t, {str(i): c.tolist() for i, c in enumerate(centres)}, y)
    expected.backward()
    term = _prepared(centres)
    got = term(_batch(term, s_ours, t, y))
    got.backward()
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(s_ours.grad, s_ref.grad, **TOL)
    assert (s0.norm(dim=1) > t.norm(dim=1)).any() and (s0.norm(dim=1) < t.norm(dim=1)).any()


# --------------------------------------------------------------------------------------------------- properties
def test_minimum_is_zero_when_aligned_with_the_centre_and_at_least_as_large_as_the_teacher() -> None:
    centres = torch.randn(3, 8, generator=gen(5))
    y = torch.tensor([0, 1, 2, 1])
    t = torch.randn(4, 8, generator=gen(6))
    e = nn.functional.normalize(centres[y], dim=1)
    t_norm = t.norm(dim=1, keepdim=True)
    # aligned and large-norm: exactly 0 (any norm >= |t|)
    assert abs(float(nd_loss(e * t_norm, t, centres[y]))) < 1e-6
    assert abs(float(nd_loss(e * t_norm * 7.0, t, centres[y]))) < 1e-6
    # aligned but small: 1 - |s|/|t|, decreasing as the norm grows
    values = [float(nd_loss(e * t_norm * a, t, centres[y])) for a in (0.1, 0.5, 0.9)]
    assert values == pytest.approx([0.9, 0.5, 0.1], abs=1e-6)
    # large but misaligned: positive; opposite direction: 2 (the maximum)
    assert float(nd_loss(torch.randn(4, 8, generator=gen(7)) * 10, t, centres[y])) > 0.1
    assert float(nd_loss(-e * t_norm * 2, t, centres[y])) == pytest.approx(2.0, abs=1e-6)
    # never negative on random inputs
    for seed in range(5):
        assert (
            float(nd_loss(torch.randn(6, 8, generator=gen(seed)) * 5, t[:1].expand(6, 8), centres[:1].expand(6, 8)))
            >= 0
        )


def test_invariances() -> None:
    centres = torch.randn(4, 6, generator=gen(8))
    y = torch.tensor([3, 0, 2, 2, 1])
    s, t = torch.randn(5, 6, generator=gen(9)), torch.randn(5, 6, generator=gen(10))
    ref = nd_loss(s, t, centres[y])
    # only the centres' directions matter
    torch.testing.assert_close(nd_loss(s, t, 3.5 * centres[y]), ref, **TOL)
    # scaling student and teacher together leaves it unchanged
    torch.testing.assert_close(nd_loss(4.0 * s, 4.0 * t, centres[y]), ref, **TOL)
    # the teacher enters only through its norm
    torch.testing.assert_close(nd_loss(s, t.flip(1), centres[y]), ref, **TOL)
    # a rotation of the whole space (student, teacher and centres) leaves it unchanged
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(11), dtype=torch.float64))
    q = q.float()
    torch.testing.assert_close(nd_loss(s @ q, t @ q, centres[y] @ q), ref, **TOL)


# ---------------------------------------------------------------------------------------------- class means
def test_prepare_gives_the_exact_class_means_over_several_batches() -> None:
    t1 = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    t2 = torch.tensor([[7.0, 8.0], [-1.0, 0.0]])
    y1, y2 = torch.tensor([0, 1, 0]), torch.tensor([2, 1])
    term = NDLoss()
    term.setup(_ctx(2, 2, classes=3))
    assert not bool(term.prepared)
    term.prepare(iter([_pass(t1, y1), _pass(t2, y2)]))
    expected = torch.tensor([[3.0, 4.0], [1.0, 2.0], [7.0, 8.0]])  # (1+5)/2,(2+6)/2 ; (3-1)/2,(4+0)/2 ; (7, 8)
    torch.testing.assert_close(term.class_means, expected)
    assert bool(term.prepared) and term.class_means.dtype == torch.float32


def test_engine_prepare_on_a_tiny_loader_gives_the_teacher_class_means() -> None:
    student, teacher = tiny("resnet18", classes=4, seed=0), tiny("resnet18", classes=4, seed=1)
    loader = make_loader(n=12, classes=4, size=16, batch=5)
    engine = DistillEngine("nd", teacher)
    engine.setup(student, next(iter(loader))[0], student)
    engine.prepare(loader, "cpu")
    teacher.eval()
    with torch.no_grad():
        x, y, _ = loader.dataset.tensors
        emb = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
    expected = torch.stack([emb[y == k].mean(0) for k in range(4)])
    torch.testing.assert_close(engine.terms["nd"].class_means, expected, atol=1e-5, rtol=1e-5)
    assert engine.terms["nd"].connector.__class__ is nn.Identity  # equal widths: no projector (authors)


def test_a_class_without_samples_is_named() -> None:
    term = NDLoss()
    term.setup(_ctx(2, 2, classes=5))
    with pytest.raises(ValueError, match=r"class\(es\) 1, 4 \(2 of 5 classes\)"):
        term.prepare([_pass(torch.randn(3, 2), torch.tensor([0, 2, 3]))])
    assert not bool(term.prepared)
    with pytest.raises(ValueError, match="no labels"):
        term.prepare([_pass(torch.randn(3, 2), None)])
    with pytest.raises(ValueError, match="outside"):
        term.prepare([_pass(torch.randn(2, 2), torch.tensor([0, 5]))])


def test_reduction_of_sums_and_counts_with_a_fake_two_rank_reducer() -> None:
    # rank 0 sees classes {0, 1}, rank 1 sees classes {1, 2}: neither alone covers the 3 classes
    r0 = class_sums(
        [_pass(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]))], NDLoss().teacher_tap, 3, 2, "cpu"
    )
    r1 = class_sums(
        [_pass(torch.tensor([[0.0, 4.0], [6.0, 6.0]]), torch.tensor([1, 2]))], NDLoss().teacher_tap, 3, 2, "cpu"
    )
    other = {id(r0[0]): r1[0], id(r0[1]): r1[1]}

    def fake_all_reduce(x: torch.Tensor) -> None:  # what dist.all_reduce(SUM) does on rank 0
        x.add_(other[id(x)])

    means = class_means(*r0, reduce=fake_all_reduce)
    torch.testing.assert_close(means, torch.tensor([[1.0, 0.0], [0.0, 3.0], [6.0, 6.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"class\(es\) 2 "):
        class_means(*class_sums([_pass(torch.ones(2, 2), torch.tensor([0, 1]))], NDLoss().teacher_tap, 3, 2, "cpu"))
    all_reduce_sum(torch.ones(2))  # no process group: a no-op, no error


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(8 * 3, dtype=torch.float32).view(8, 3) ** 1.5, torch.tensor([0, 1, 0, 2, 1, 1, 2, 2])


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data, labels = _ddp_data()
        shard = slice(rank * 4, rank * 4 + 4)  # rank 1 has no sample of class 0: alone, it would raise
        term = NDLoss()
        term.setup(_ctx(3, 3, classes=3))
        term.prepare([_pass(data[shard], labels[shard])])
        torch.save(term.class_means, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    "fork" not in torch.multiprocessing.get_all_start_methods() or not torch.distributed.is_available(),
    reason="needs the fork start method and torch.distributed",
)
def test_class_means_are_all_reduced_over_a_real_gloo_group() -> None:
    data, labels = _ddp_data()
    expected = torch.stack([data[labels == k].mean(0) for k in range(3)])
    local0 = torch.stack([data[:4][labels[:4] == k].mean(0) for k in range(3)])
    assert not torch.allclose(local0, expected)  # one shard alone gives other means
    with pytest.raises(ValueError, match=r"class\(es\) 0 "):  # and the other lacks class 0
        class_means(*class_sums([_pass(data[4:], labels[4:])], NDLoss().teacher_tap, 3, 3, "cpu"))
    with tempfile.TemporaryDirectory() as out:
        # fork, not spawn: a spawned child re-imports this module (lightning, timm) and takes tens of seconds
        torch.multiprocessing.start_processes(
            _ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork"
        )
        for rank in range(2):
            torch.testing.assert_close(torch.load(os.path.join(out, f"rank{rank}.pt")), expected, **TOL)


# --------------------------------------------------------------------------------------------- errors, dtype, state
def test_errors_name_the_term_taps_and_shapes() -> None:
    term = NDLoss()
    with pytest.raises(RuntimeError, match="setup"):
        term(_batch(term, torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1])))
    term.setup(_ctx(2, 2))
    with pytest.raises(RuntimeError, match="class means were not computed"):
        term(_batch(term, torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1])))
    term.prepare([_pass(torch.eye(2), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="no labels"):
        term(_batch(term, torch.zeros(2, 2), torch.zeros(2, 2), None))
    with pytest.raises(ValueError, match="soft or mixed"):
        term(_batch(term, torch.zeros(2, 2), torch.zeros(2, 2), torch.full((2, 2), 0.5)))
    maps = NDLoss(student_layer="layer3", teacher_layer="layer3")
    ctx = SetupContext(
        ModelOutputs(torch.zeros(2, 2), {maps.student_tap: torch.zeros(2, 8, 4, 4)}),
        ModelOutputs(torch.zeros(2, 2), {maps.teacher_tap: torch.zeros(2, 8, 4, 4)}),
        nn.Identity(),
        nn.Identity(),
        2,
    )
    with pytest.raises(ValueError, match=r"nd: student 'layer3' \(2, 8, 4, 4\).*embedding"):
        maps.setup(ctx)
    with pytest.raises(ShapeMismatchError, match=r"\[8\].*\[16\]"):
        NDLoss(connector="none").setup(_ctx(8, 16))
    with pytest.raises(ValueError, match="connector must be"):
        NDLoss(connector="conv")
    with pytest.raises(ValueError, match="must all be"):
        nd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4))


def test_gradients_reach_the_student_and_the_projector_never_the_teacher() -> None:
    term = _prepared(torch.randn(3, 16, generator=gen(12)), s_width=8)
    assert isinstance(term.connector, nn.Linear) and term.connector.in_features == 8
    s = torch.randn(6, 8, generator=gen(13), requires_grad=True)
    t = torch.randn(6, 16, generator=gen(14), requires_grad=True)
    loss = term(_batch(term, s, t, torch.tensor([0, 1, 2, 0, 1, 2])))
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert term.connector.weight.grad is not None and term.connector.weight.grad.abs().sum() > 0
    assert t.grad is None and term.class_means.grad is None
    assert [n for n, _ in term.named_parameters()] == ["connector.weight", "connector.bias"]
    # all-zero embeddings stay finite
    z = torch.zeros(2, 16, requires_grad=True)
    out = nd_loss(z, torch.zeros(2, 16), torch.zeros(2, 16))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


def test_bf16_inputs_give_float32() -> None:
    centres = torch.randn(3, 8, generator=gen(15))
    term = _prepared(centres)
    s, t = torch.randn(5, 8, generator=gen(16)).bfloat16(), torch.randn(5, 8, generator=gen(17)).bfloat16()
    y = torch.tensor([0, 2, 1, 1, 0])
    out = term(_batch(term, s, t, y))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, nd_loss(s.float(), t.float(), centres[y]), **TOL)


def test_state_dict_round_trip_restores_means_and_projector() -> None:
    term = _prepared(torch.randn(3, 16, generator=gen(18)), s_width=8)
    state = term.state_dict()
    assert set(state) == {"class_means", "prepared", "connector.weight", "connector.bias"}
    fresh = NDLoss()
    fresh.setup(_ctx(8, 16, classes=3))
    fresh.load_state_dict(state)
    s, t, y = torch.randn(4, 8, generator=gen(19)), torch.randn(4, 16, generator=gen(20)), torch.tensor([2, 0, 1, 0])
    torch.testing.assert_close(fresh(_batch(fresh, s, t, y)), term(_batch(term, s, t, y)))
    assert bool(fresh.prepared)


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "nd.yaml"))
    values = yaml["terms"]["nd"]
    assert sorted(values) == sorted(p for p in inspect.signature(NDLoss.__init__).parameters if p != "self")
    assert yaml["task_weight"] == 1.0
    term = build_terms(compose(["loss=nd"]).loss.terms)["nd"]
    assert isinstance(term, NDLoss) and term.needs_prepare
    assert term.weight == values["weight"] == 1.0
    assert str(term.student_tap) == values["student_layer"] == EMB and str(term.teacher_tap) == values["teacher_layer"]
    assert term.connector_kind == values["connector"] == "auto"
    assert isinstance(create_loss("nd"), NDLoss)
    # KD++ = CE + KD + ND
    assert sorted(build_terms(compose(["loss=[kd,nd]"]).loss.terms)) == ["kd", "nd"]


def test_timm_resnet_pair_through_lightning() -> None:
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet34", num_classes=10)
    module = lightning_kd.DistillationModule(student, teacher, loss=["kd", "nd"], task_weight=1.0)
    n = 10  # one batch holding every class once
    x, y = torch.randn(n, 3, 32, 32), torch.arange(n) % 10
    trainer = fast_trainer(max_steps=1)
    trainer.fit(module, DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=10))
    metrics = trainer.callback_metrics
    assert "train/nd" in metrics and "train/kd" in metrics
    assert math.isfinite(float(metrics["train/nd"])) and 0 < float(metrics["train/nd"]) <= 2
    term = module.engine.terms["nd"]
    assert bool(term.prepared)
    teacher.eval()
    with torch.no_grad():
        emb = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
    torch.testing.assert_close(
        term.class_means, torch.stack([emb[y == k].mean(0) for k in range(10)]), atol=1e-4, rtol=1e-4
    )
    assert "engine.terms.nd.class_means" in module.state_dict()
