"""Similarity-preserving KD (:mod:`lightning_kd.losses.sp`): hand-worked value, invariances of the method,
torchdistill comparison (its L1 row normalisation vs. the paper's L2), gradients, dtype and the YAML config (CPU)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import gen, layer_batch, total
from omegaconf import OmegaConf
from torchdistill.losses.mid_level import SPKDLoss

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import create_loss
from lightning_kd.losses.sp import SPLoss, similarity_matrix, sp_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_batch_of_two() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # G_S = [[1, 1], [1, 2]]
    t = torch.tensor([[1.0], [2.0]])  # width 1: G_T = [[1, 2], [2, 4]]
    gs = [[1 / math.sqrt(2), 1 / math.sqrt(2)], [1 / math.sqrt(5), 2 / math.sqrt(5)]]
    gt = [[1 / math.sqrt(5), 2 / math.sqrt(5)], [2 / math.sqrt(20), 4 / math.sqrt(20)]]
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(2) for j in range(2)) / 4
    assert expected > 1e-3
    torch.testing.assert_close(similarity_matrix(s), torch.tensor(gs), **TOL)
    assert float(sp_loss(s, t)) == pytest.approx(expected, rel=1e-5)
    term = SPLoss(student_layers=["layer4"], teacher_layers=["layer3"])
    parts = term(layer_batch(term, [s], [t]))
    assert set(parts) == {"layer4"}
    assert float(parts["layer4"]) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------- invariances
def test_zero_when_similarities_are_preserved() -> None:
    t = torch.randn(6, 8, 3, 3, generator=gen(1))
    for c in (0.01, 1.0, 250.0):
        assert float(sp_loss(c * t, t)) < 1e-10
    # F_S = F_T · R with R having orthonormal columns (72 -> 100 wide student): F_S F_Sᵀ = F_T F_Tᵀ
    r, _ = torch.linalg.qr(torch.randn(100, 72, generator=gen(2), dtype=torch.float64))
    s = (t.flatten(1).double() @ r.t()).float()
    assert s.shape == (6, 100)
    assert float(sp_loss(s, t)) < 1e-10
    # clearly positive otherwise
    assert float(sp_loss(torch.randn(6, 8, 3, 3, generator=gen(3)), t)) > 1e-3


def test_invariant_to_positive_scaling_of_either_input() -> None:
    s = torch.randn(5, 4, 4, 4, generator=gen(4))
    t = torch.randn(5, 16, 2, 2, generator=gen(5))
    ref = sp_loss(s, t)
    assert float(ref) > 1e-3
    for a, b in [(7.0, 1.0), (1.0, 0.01), (0.1, 30.0)]:
        torch.testing.assert_close(sp_loss(a * s, b * t), ref, **TOL)
    # a per-sample rescaling changes the similarities
    w = torch.linspace(0.2, 3.0, 5).view(5, 1, 1, 1)
    assert abs(float(sp_loss(s * w, t)) - float(ref)) > 1e-4


def test_different_widths_and_spatial_sizes() -> None:
    s, t = torch.randn(4, 8, 8, 8, generator=gen(6)), torch.randn(4, 64, 2, 2, generator=gen(7))
    out = sp_loss(s, t)
    assert out.shape == () and math.isfinite(float(out)) and float(out) > 0
    assert float(sp_loss(torch.randn(4, 10, generator=gen(8)), t)) > 0  # embedding vs feature map
    with pytest.raises(ValueError, match="batch size"):
        sp_loss(torch.zeros(3, 4), torch.zeros(4, 4))


# ----------------------------------------------------------------------------------------------- torchdistill
def test_torchdistill_with_l2_rows_matches_and_its_l1_output_differs() -> None:
    s, t = torch.randn(6, 8, 4, 4, generator=gen(10)), torch.randn(6, 32, 2, 2, generator=gen(11))
    td = SPKDLoss(student_output_path="layer4", teacher_output_path="layer4", reduction="batchmean")
    td_value = td({"layer4": {"output": s}}, {"layer4": {"output": t}})

    # torchdistill's computation, with the paper's L2 row normalisation instead of its normalize(G, 1) (p = 1)
    def l2(z: torch.Tensor) -> torch.Tensor:
        z = torch.flatten(z, 1)
        return F.normalize(torch.matmul(z, torch.t(z)), p=2, dim=1)

    td_l2 = torch.norm(l2(t) - l2(s)) ** 2 / 36
    # its own helper is the L1 one
    torch.testing.assert_close(td.matmul_and_normalize(s), F.normalize(s.flatten(1) @ s.flatten(1).t(), p=1, dim=1))

    term = SPLoss(student_layers=["layer4"], teacher_layers=["layer4"])
    ours = total(term(layer_batch(term, [s], [t])))
    torch.testing.assert_close(ours, td_l2, **TOL)
    assert abs(float(ours) - float(td_value)) > 1e-3 * max(float(ours), 1e-6)
    assert abs(float(ours) - float(td_value)) > 1e-4


def test_pairs_are_summed() -> None:
    s1, t1 = torch.randn(4, 3, 4, 4, generator=gen(12)), torch.randn(4, 6, 4, 4, generator=gen(13))
    s2, t2 = torch.randn(4, 5, generator=gen(14)), torch.randn(4, 7, 2, 2, generator=gen(15))
    term = SPLoss(student_layers=["a", "b"], teacher_layers=["c", "d"])
    parts = term(layer_batch(term, [s1, s2], [t1, t2]))
    assert set(parts) == {"a", "b"}
    torch.testing.assert_close(total(parts), sp_loss(s1, t1) + sp_loss(s2, t2), **TOL)
    with pytest.raises(ValueError, match="equal length"):
        SPLoss(student_layers=["a", "b"], teacher_layers=["c"])


# ----------------------------------------------------------------------------------------------- gradients, dtype
def test_gradients_reach_student_only() -> None:
    s = torch.randn(4, 6, 3, 3, generator=gen(20)).requires_grad_()
    t = torch.randn(4, 12, 3, 3, generator=gen(21)).requires_grad_()
    term = SPLoss(student_layers=["a"], teacher_layers=["b"])
    out = total(term(layer_batch(term, [s], [t])))
    assert out.dtype == torch.float32
    out.backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_bfloat16_inputs_give_float32() -> None:
    s = torch.randn(4, 4, 4, 4, generator=gen(22)).bfloat16()
    t = torch.randn(4, 8, 2, 2, generator=gen(23)).bfloat16()
    out = sp_loss(s, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sp_loss(s.float(), t.float()), **TOL)


# ----------------------------------------------------------------------------------------------- config
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "sp.yaml"))
    values = yaml["terms"]["sp"]
    assert sorted(values) == sorted(p for p in inspect.signature(SPLoss.__init__).parameters if p != "self")
    cfg = compose(["loss=sp"])
    term = build_terms(cfg.loss.terms)["sp"]
    assert isinstance(term, SPLoss)
    assert term.weight == values["weight"] == 3000.0
    assert [str(s) for s in term.student_taps] == values["student_layers"] == ["stage:-1"]
    assert [str(t) for t in term.teacher_taps] == values["teacher_layers"] == ["stage:-1"]
    default = create_loss("sp")
    assert isinstance(default, SPLoss) and default.weight == 3000.0
    assert [str(s) for s in default.student_taps] == ["stage:-1"]
