"""Correlation congruence (:mod:`lightning_kd.losses.cc`): hand-worked values, the Taylor series of the Gaussian RBF,
invariances, torchdistill parity (and where it differs), the difference to RepDistiller's formula, errors, gradients,
dtype, checkpointing, the YAML config and a real timm pair through Lightning (CPU)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import fit_pair, gen
from omegaconf import OmegaConf
from torch import nn
from torchdistill.losses.mid_level import CCKDLoss as TDCCKDLoss
from torchdistill.models.wrapper import Linear4CCKD

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.cc import CCLoss, cc_loss, correlation_matrix, taylor_gaussian_kernel

TOL = {"atol": 1e-5, "rtol": 1e-5}


def batch(term: CCLoss, s: torch.Tensor, t: torch.Tensor) -> DistillBatch:
    b = len(s)
    return DistillBatch(
        ModelOutputs(torch.zeros(b, 3), {term.student_tap: s}), ModelOutputs(torch.zeros(b, 3), {term.teacher_tap: t})
    )


def set_up(term: CCLoss, s: torch.Tensor, t: torch.Tensor) -> CCLoss:
    """Run ``term.setup`` with probe outputs of the shapes of ``s`` and ``t``."""
    term.setup(
        SetupContext(
            student=ModelOutputs(torch.zeros(len(s), 3), {term.student_tap: torch.zeros_like(s)}),
            teacher=ModelOutputs(torch.zeros(len(t), 3), {term.teacher_tap: torch.zeros_like(t)}),
            student_model=nn.Identity(),
            teacher_model=nn.Identity(),
            num_classes=3,
        )
    )
    return term


def taylor_k(c: float, gamma: float = 0.4, order: int = 2) -> float:
    """The truncated series of exp(-γ‖x − y‖²) for unit vectors with cosine c, written out with ``math``."""
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p for p in range(order + 1))


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_three_samples() -> None:
    # student rows e1, 2·e2, (3, 3): unit vectors e1, e2, (1, 1)/√2 -> cosines c01 = 0, c02 = c12 = 1/√2
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # teacher rows 2·e1, (1, 1, 0), e3 -> cosines c01 = 1/√2, c02 = c12 = 0
    t = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = 1 / math.sqrt(2)
    # the diagonals agree (cosine 1); the 6 off-diagonal entries all differ by |k(1/√2) − k(0)|
    expected = 6 * (taylor_k(r) - taylor_k(0.0)) ** 2 / 9
    assert taylor_k(0.0) == pytest.approx(math.exp(-0.8))  # e^{-2γ}
    assert taylor_k(r) == pytest.approx(math.exp(-0.8) * (1 + 0.8 * r + 0.32 * 0.5))
    assert expected > 1e-3
    assert float(cc_loss(s, t)) == pytest.approx(expected, rel=1e-5)
    term = CCLoss(embed_dim=None)
    assert float(term(batch(term, s, t))) == pytest.approx(expected, rel=1e-5)
    # P = 1 and γ = 1
    expected_p1 = 6 * (taylor_k(r, 1.0, 1) - taylor_k(0.0, 1.0, 1)) ** 2 / 9
    assert float(cc_loss(s, t, gamma=1.0, order=1)) == pytest.approx(expected_p1, rel=1e-5)
    # bilinear kernel on unit vectors: the cosines themselves
    assert float(cc_loss(s, t, kernel="bilinear")) == pytest.approx(6 * r**2 / 9, rel=1e-5)
    # without normalisation the raw inner products enter the series: student Gram [[1,0,3],[0,4,6],[3,6,18]]
    gs = [[1.0, 0.0, 3.0], [0.0, 4.0, 6.0], [3.0, 6.0, 18.0]]
    gt = [[4.0, 2.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
    raw = sum((taylor_k(a) - taylor_k(b)) ** 2 for ra, rb in zip(gs, gt) for a, b in zip(ra, rb)) / 9
    assert float(cc_loss(s, t, normalize=False)) == pytest.approx(raw, rel=1e-5)


def test_taylor_series_converges_to_the_gaussian_rbf_on_unit_vectors() -> None:
    x = nn.functional.normalize(torch.randn(6, 5, generator=gen(1), dtype=torch.float64), dim=1)
    gamma = 0.4
    exact = torch.exp(-gamma * torch.cdist(x, x).pow(2))
    torch.testing.assert_close(taylor_gaussian_kernel(x, gamma, order=25), exact, atol=1e-10, rtol=0)
    # order 2 is an approximation (error of order (2γ)³/3! · e^{-2γ})
    err = (taylor_gaussian_kernel(x, gamma, order=2) - exact).abs().max()
    assert 1e-4 < float(err) < 0.1
    # the kernel values of unit vectors lie in (0, 1]; the diagonal is Σ_p e^{-2γ}(2γ)^p/p! (= 0.952 for P = 2)
    k = correlation_matrix(x.float())
    assert float(k.min()) > 0 and float(k.max()) <= 1
    torch.testing.assert_close(k.diagonal(), torch.full((6,), taylor_k(1.0)), **TOL)


# --------------------------------------------------------------------------------------------------- invariances
def test_zero_for_congruent_features_and_invariances() -> None:
    x = torch.randn(8, 16, generator=gen(2))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(3), dtype=torch.float64))
    scales = torch.rand(8, 1, generator=gen(4)) * 5 + 0.1
    for s in (x, 3.0 * x, scales * x, x @ q.float()):  # same cosines between samples
        assert float(cc_loss(s, x)) < 1e-10
    # a wider teacher isometric to x (embedded in 32-d then rotated) gives zero too
    q32, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen(5), dtype=torch.float64))
    assert float(cc_loss(x, torch.cat([x, torch.zeros(8, 16)], 1) @ q32.float())) < 1e-10
    # ... an anisotropic rescaling of the features changes the cosines
    assert float(cc_loss(x * torch.linspace(0.1, 3.0, 16), x)) > 1e-5
    # without normalisation the per-sample scale matters
    assert float(cc_loss(scales * x, x, normalize=False)) > 1e-2
    # unrelated features: bounded by 1 (kernel values of unit vectors lie in (0, 1])
    value = float(cc_loss(torch.randn(8, 16, generator=gen(6)), x))
    assert 1e-4 < value < 1.0


def _repdistiller_cc(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """HobbitLong/RepDistiller distiller_zoo/CC.py ``Correlation.forward`` (b84f547), rewritten: with
    δ = |e_S − e_T| per sample, the mean over consecutive samples i of Σ_d δ_i,d · δ_{i+1},d."""
    delta = (f_s - f_t).abs()
    return torch.stack([(delta[i] * delta[i + 1]).sum() for i in range(len(delta) - 1)]).mean()


def test_differs_from_repdistillers_formula() -> None:
    e_t = torch.randn(8, 16, generator=gen(7))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(8), dtype=torch.float64))
    e_s = e_t @ q.float()  # same correlations between samples, different coordinates
    assert float(cc_loss(e_s, e_t)) < 1e-10
    assert float(_repdistiller_cc(e_s, e_t)) > 1.0  # instance-level: it compares coordinates
    assert float(_repdistiller_cc(e_t, e_t)) == 0.0  # both vanish on identical embeddings
    # and on unrelated embeddings the two are simply different quantities
    other = torch.randn(8, 16, generator=gen(9))
    assert abs(float(cc_loss(other, e_t)) - float(_repdistiller_cc(other, e_t))) > 1e-2


# ----------------------------------------------------------------------------------------------- torchdistill parity
def _linear4cckd(dim_in: int, dim_out: int, embedding: nn.Module) -> Linear4CCKD:
    wrapper = Linear4CCKD(
        input_module={"path": "avgpool", "io": "output"},
        linear_kwargs={"in_features": dim_in, "out_features": dim_out, "bias": True},
        device="cpu",
        device_ids=None,
        distributed=False,
        teacher_model=nn.Identity(),
    )
    wrapper.linear.load_state_dict(embedding.state_dict())
    return wrapper


@pytest.mark.parametrize("kernel", ["gaussian", "bilinear"])
def test_matches_torchdistill_without_normalisation(kernel: str) -> None:
    b = 6
    s = torch.randn(b, 12, generator=gen(10)) * 0.3
    t = torch.randn(b, 20, generator=gen(11)) * 0.3
    term = set_up(CCLoss(embed_dim=8, kernel=kernel, normalize=False), s, t)
    # torchdistill's Linear4CCKD wrappers carrying our embedding weights
    td_s, td_t = _linear4cckd(12, 8, term.embed_s), _linear4cckd(20, 8, term.embed_t)
    config = {"type": kernel, "gamma": 0.4, "max_p": 2}
    td = TDCCKDLoss(
        student_linear_path="linear", teacher_linear_path="linear", kernel_config=config, reduction="batchmean"
    )
    s_td = s.clone().requires_grad_(True)
    e_s, e_t = td_s.linear(s_td.flatten(1)), td_t.linear(t.flatten(1))
    ref = td({"linear": {"output": e_s}}, {"linear": {"output": e_t}})
    ref.backward()

    s_ours = s.clone().requires_grad_(True)
    ours = term(batch(term, s_ours, t))
    ours.backward()
    # same matrices ...
    mat = td.compute_cc_mat_by_gaussian_rbf if kernel == "gaussian" else td.compute_cc_mat_by_bilinear_pool
    torch.testing.assert_close(correlation_matrix(e_s.detach(), kernel, normalize=False), mat(e_s.detach()), **TOL)
    # ... torchdistill reduces with the un-squared norm: ‖Δ‖_F / B², ours is ‖Δ‖²_F / B² = B² · torchdistill²
    torch.testing.assert_close(ours, b**2 * ref.detach() ** 2, **TOL)
    torch.testing.assert_close(s_ours.grad, 2 * b**2 * ref.detach() * s_td.grad, **TOL)
    assert abs(float(ours.detach()) - float(ref.detach())) > 1e-3


def test_normalisation_is_where_we_differ_from_torchdistill() -> None:
    # torchdistill expands the series on raw embeddings: values far outside the Gaussian RBF's (0, 1]
    e = torch.randn(6, 8, generator=gen(12)) * 3
    td = TDCCKDLoss("linear", "linear", {"type": "gaussian", "gamma": 0.4, "max_p": 2}, "batchmean")
    raw = td.compute_cc_mat_by_gaussian_rbf(e)
    assert float(raw.max()) > 10
    ours = correlation_matrix(e)
    assert float(ours.max()) <= 1 and not torch.allclose(ours, raw)
    torch.testing.assert_close(ours, td.compute_cc_mat_by_gaussian_rbf(nn.functional.normalize(e, dim=1)), **TOL)


# ----------------------------------------------------------------------------------------------- errors
def test_invalid_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="kernel"):
        CCLoss(kernel="polynomial")
    with pytest.raises(ValueError, match="gamma"):
        CCLoss(gamma=0)
    with pytest.raises(ValueError, match="order"):
        CCLoss(order=-1)
    with pytest.raises(ValueError, match="order"):
        CCLoss(order=1.5)
    with pytest.raises(ValueError, match="embed_dim"):
        CCLoss(embed_dim=0)
    term = CCLoss(student_layer="fc:input", teacher_layer="head")
    with pytest.raises(ValueError) as err:
        set_up(term, torch.zeros(4, 8), torch.zeros(4))
    for piece in ("cc", "teacher", "head", "(4,)", "[B, D]"):
        assert piece in str(err.value), str(err.value)
    with pytest.raises(RuntimeError, match="setup"):
        CCLoss()(batch(CCLoss(), torch.randn(4, 8), torch.randn(4, 8)))
    with pytest.raises(ValueError, match="at least 2"):
        cc_loss(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="same number of samples"):
        cc_loss(torch.randn(4, 8), torch.randn(3, 8))


# ----------------------------------------------------------------------------------------------- gradients and dtype
def test_gradients_reach_the_student_and_both_embeddings_never_the_teacher() -> None:
    s = torch.randn(6, 8, generator=gen(13)).requires_grad_(True)
    t = torch.randn(6, 2, 2, 2, generator=gen(14)).requires_grad_(True)  # maps are flattened per sample
    term = set_up(CCLoss(embed_dim=4), s, t)
    assert sorted(n for n, _ in term.named_parameters()) == [
        "embed_s.bias",
        "embed_s.weight",
        "embed_t.bias",
        "embed_t.weight",
    ]
    out = term(batch(term, s, t))
    assert out.dtype == torch.float32 and out.shape == ()
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for name, p in term.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert t.grad is None
    # a fixed teacher target: only the student's embedding is trainable
    fixed = set_up(CCLoss(embed_dim=4, embed_teacher=False), s, t)
    assert fixed.embed_t is None and sorted(n for n, _ in fixed.named_parameters()) == [
        "embed_s.bias",
        "embed_s.weight",
    ]
    assert torch.isfinite(fixed(batch(fixed, s, t)))
    assert list(set_up(CCLoss(embed_dim=None), s, t).parameters()) == []


def test_bf16_inputs_give_a_float32_loss() -> None:
    s, t = torch.randn(8, 16, generator=gen(15)), torch.randn(8, 32, generator=gen(16))
    s16, t16 = s.bfloat16(), t.bfloat16()
    out = cc_loss(s16, t16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cc_loss(s16.float(), t16.float()), **TOL)
    # the term under bf16 autocast: embeddings run in bf16, the kernels in float32
    term = set_up(CCLoss(embed_dim=8), s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = term(batch(term, s, t))
    ref = term(batch(term, s, t))
    assert auto.dtype == torch.float32 and float(ref) > 1e-4
    torch.testing.assert_close(auto, ref, rtol=0.05, atol=1e-4)


def test_embeddings_are_checkpointed() -> None:
    s, t = torch.randn(6, 8, generator=gen(17)), torch.randn(6, 10, generator=gen(18))
    torch.manual_seed(0)
    term = set_up(CCLoss(embed_dim=4), s, t)
    state = term.state_dict()
    assert sorted(state) == ["embed_s.bias", "embed_s.weight", "embed_t.bias", "embed_t.weight"]
    torch.manual_seed(1)
    fresh = set_up(CCLoss(embed_dim=4), s, t)
    assert abs(float(fresh(batch(fresh, s, t))) - float(term(batch(term, s, t)))) > 1e-6
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(batch(fresh, s, t)), term(batch(term, s, t)), atol=0, rtol=0)
    set_up(fresh, s, t)  # a second setup keeps the restored embeddings
    torch.testing.assert_close(fresh.embed_s.weight, term.embed_s.weight, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "cc.yaml"))
    values = yaml["terms"]["cc"]
    assert sorted(values) == sorted(p for p in inspect.signature(CCLoss.__init__).parameters if p != "self")
    defaults = {k: p.default for k, p in inspect.signature(CCLoss.__init__).parameters.items() if k != "self"}
    assert values == defaults
    term = build_terms(compose(["loss=cc"]).loss.terms)["cc"]
    assert isinstance(term, CCLoss)
    assert term.weight == values["weight"] == 100.0
    assert term.gamma == values["gamma"] == 0.4 and term.order == values["order"] == 2
    assert term.embed_dim == values["embed_dim"] == 128 and term.embed_teacher is True
    assert term.kernel == "gaussian" and term.normalize is True
    assert str(term.student_tap) == values["student_layer"] == "embedding"
    assert str(term.teacher_tap) == values["teacher_layer"] == "embedding"
    assert isinstance(create_loss("cc"), CCLoss)


def test_timm_resnet_pair_through_lightning() -> None:
    module, trainer = fit_pair("cc")
    value = trainer.callback_metrics["train/cc"]
    assert math.isfinite(float(value)) and float(value) > 0
    term = module.engine.terms["cc"]
    assert term.embed_s.in_features == 512 and term.embed_t.in_features == 512 and term.embed_s.out_features == 128
    # both embeddings are optimised with the student
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in term.parameters()} <= optimised
