"""Token-level divergences (lightning_kd.lm.divergences and the fkl/rkl/symkl/jsd/tvd/skewkl/skewrkl terms):
hand-worked values, properties, masking, chunking, closed-form gradients against autograd, parity with TRL's
``generalized_jsd_loss`` and with DistiLLM's loss formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.lm.divergences import (
    DIVERGENCES,
    ChunkedStats,
    dense_token_divergence,
    next_token_mask,
    next_token_targets,
    position_mask,
    token_divergence,
)
from lightning_kd.losses import DistillBatch, ModelOutputs, create_loss

#: every divergence with non-trivial parameters
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("symmetric_kl", {"reverse_weight": 0.3}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.1}),
    ("total_variation", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
]
IDS = [f"{name}{''.join(f'-{k}={v}' for k, v in p.items())}" for name, p in CASES]


def logits_pair(b: int = 2, t: int = 6, v: int = 13, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(b, t, v, generator=g)).to(dtype), (2 * torch.randn(b, t, v, generator=g)).to(dtype)


def labels_for(b: int = 2, t: int = 6, v: int = 13, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return labels


# ======================================================================================= 1. hand-worked values
P, Q = [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]  # teacher, student at one position


def one_position(divergence: str, **params: float) -> float:
    s = torch.tensor(Q).log().view(1, 1, 3)
    t = torch.tensor(P).log().view(1, 1, 3)
    return float(token_divergence(s, t, None, divergence, **params))


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def test_hand_worked_values_at_one_position() -> None:
    fkl, rkl = kl(P, Q), kl(Q, P)
    assert fkl == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(0.6) + 0.2 * math.log(2 / 3))
    assert one_position("forward_kl") == pytest.approx(fkl, abs=1e-6)
    assert one_position("reverse_kl") == pytest.approx(rkl, abs=1e-6)
    assert one_position("symmetric_kl", reverse_weight=0.5) == pytest.approx(0.5 * fkl + 0.5 * rkl, abs=1e-6)
    assert one_position("total_variation") == pytest.approx(0.5 * (0.3 + 0.2 + 0.1), abs=1e-6)
    m = [0.35, 0.4, 0.25]  # ½p + ½q
    assert one_position("generalized_jsd", beta=0.5) == pytest.approx(0.5 * kl(P, m) + 0.5 * kl(Q, m), abs=1e-6)
    m = [0.2 * p + 0.8 * q for p, q in zip(P, Q)]  # β = 0.2: m = βp + (1 − β)q
    assert one_position("generalized_jsd", beta=0.2) == pytest.approx(0.2 * kl(P, m) + 0.8 * kl(Q, m), abs=1e-6)
    m = [0.1 * p + 0.9 * q for p, q in zip(P, Q)]  # skew KL, α = 0.1
    assert one_position("skew_forward_kl", alpha=0.1) == pytest.approx(kl(P, m), abs=1e-6)
    m = [0.9 * p + 0.1 * q for p, q in zip(P, Q)]  # skew reverse KL, α = 0.1
    assert one_position("skew_reverse_kl", alpha=0.1) == pytest.approx(kl(Q, m), abs=1e-6)


def test_temperature_divides_both_logits() -> None:
    s, t = torch.tensor(Q).log().view(1, 1, 3), torch.tensor(P).log().view(1, 1, 3)
    p2 = torch.softmax(t.flatten() / 2, -1).tolist()
    q2 = torch.softmax(s.flatten() / 2, -1).tolist()
    assert float(token_divergence(s, t, temperature=2.0)) == pytest.approx(kl(p2, q2), abs=1e-6)


# ======================================================================================= 2. properties
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_zero_for_identical_distributions_and_positive_otherwise(name: str, params: dict) -> None:
    s, t = logits_pair()
    assert float(token_divergence(s, s.clone(), None, name, **params)) == pytest.approx(0.0, abs=1e-6)
    assert float(token_divergence(s, t, None, name, **params)) > 1e-3


def test_beta_and_alpha_extremes_reduce_to_the_named_kls() -> None:
    s, t = logits_pair()
    mask = next_token_mask(labels_for())
    fkl = token_divergence(s, t, mask, "forward_kl")
    rkl = token_divergence(s, t, mask, "reverse_kl")
    assert torch.equal(token_divergence(s, t, mask, "generalized_jsd", beta=0.0), fkl)
    assert torch.equal(token_divergence(s, t, mask, "generalized_jsd", beta=1.0), rkl)
    assert torch.allclose(token_divergence(s, t, mask, "skew_forward_kl", alpha=0.0), fkl, atol=1e-6)
    assert torch.allclose(token_divergence(s, t, mask, "skew_reverse_kl", alpha=0.0), rkl, atol=1e-6)
    assert torch.allclose(token_divergence(s, t, mask, "symmetric_kl", reverse_weight=0.0), fkl, atol=1e-6)
    assert torch.allclose(token_divergence(s, t, mask, "symmetric_kl", reverse_weight=1.0), rkl, atol=1e-6)


def test_jsd_is_symmetric_at_half_and_bounded_by_log2() -> None:
    s, t = logits_pair(seed=3)
    a = token_divergence(s, t, None, "generalized_jsd", beta=0.5)
    b = token_divergence(t, s, None, "generalized_jsd", beta=0.5)
    assert torch.allclose(a, b, atol=1e-6) and float(a) <= math.log(2)
    assert 0 <= float(token_divergence(s, t, None, "total_variation")) <= 1


# ======================================================================================= 3. masking and positions
def test_masking_ignores_minus_100_positions() -> None:
    s, t = logits_pair()
    labels = labels_for()
    mask = next_token_mask(labels)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = torch.randn_like(s2[~mask]) * 10  # change only the ignored positions
    t2[~mask] = 0.0
    a = s.clone().requires_grad_()
    a2 = s2.clone().requires_grad_()
    va, va2 = token_divergence(a, t, mask, "reverse_kl"), token_divergence(a2, t2, mask, "reverse_kl")
    assert torch.allclose(va, va2)
    (va + va2).backward()
    assert a.grad[~mask].abs().max() == 0 and a.grad[mask].abs().max() > 0
    # the mean is over the scored positions only
    rows = [dense_token_divergence(s[i : i + 1, j : j + 1], t[i : i + 1, j : j + 1], None, "reverse_kl")
            for i, j in mask.nonzero().tolist()]  # fmt: skip
    assert torch.allclose(va, torch.stack(rows).mean(), atol=1e-6)


def test_next_token_shift_convention() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert next_token_mask(labels).tolist() == [[False, True, True, False, False]]
    assert next_token_targets(labels).tolist() == [[-100, 5, 6, -100, -100]]
    assert next_token_mask(labels, shift=False).tolist() == [[False, False, True, True, False]]
    logits = torch.zeros(1, 5, 3)
    attention = torch.tensor([[1, 1, 1, 0, 0]])
    assert position_mask(None, logits, attention_mask=attention).tolist() == [[True, True, False, False, False]]
    assert position_mask(None, logits).tolist() == [[True, True, True, True, False]]
    with pytest.raises(ValueError, match="labels of shape"):
        position_mask(torch.zeros(1, 4, dtype=torch.long), logits)


def test_no_scored_position_gives_zero_and_zero_gradient() -> None:
    s, t = logits_pair()
    a = s.clone().requires_grad_()
    value = token_divergence(a, t, torch.zeros(2, 6, dtype=torch.bool), "forward_kl")
    value.backward()
    assert float(value.detach()) == 0.0 and a.grad.abs().max() == 0


# ======================================================================================= 4. chunks and gradients
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_equals_unchunked_and_gradient_equals_autograd(name: str, params: dict, temperature: float) -> None:
    s, t = logits_pair(dtype=torch.float64)
    mask = next_token_mask(labels_for())
    ref = s.clone().requires_grad_()
    dense = dense_token_divergence(ref, t, mask, name, temperature=temperature, **params)
    dense.backward()
    for chunk in (1, 3, None):
        ours = s.clone().requires_grad_()
        value = token_divergence(ours, t, mask, name, temperature=temperature, chunk_size=chunk, **params)
        value.backward()
        assert abs(float(value) - float(dense)) < 1e-6, (chunk, float(value), float(dense))
        assert torch.allclose(ours.grad, ref.grad, atol=1e-7), (chunk, (ours.grad - ref.grad).abs().max())


def test_every_registered_divergence_is_covered() -> None:
    assert {name for name, _ in CASES} == set(DIVERGENCES)


def test_infinite_logits_contribute_nothing() -> None:
    """Padded vocabulary entries (-inf in both models) leave the value and the other gradients unchanged."""
    s, t = logits_pair(v=10)
    pad = torch.full((2, 6, 3), -torch.inf)
    a, b = s.clone().requires_grad_(), torch.cat([s, pad], -1).requires_grad_()
    for name, params in CASES:
        v1 = token_divergence(a, t, None, name, **params)
        v2 = token_divergence(b, torch.cat([t, pad], -1), None, name, **params)
        assert torch.allclose(v1, v2, atol=1e-6), name
        g1, g2 = torch.autograd.grad(v1, a)[0], torch.autograd.grad(v2, b)[0]
        assert torch.allclose(g1, g2[..., :10], atol=1e-7) and g2[..., 10:].abs().max() == 0, name


def test_bf16_logits_give_a_float32_loss_close_to_float32() -> None:
    s, t = logits_pair(dtype=torch.bfloat16)
    a = s.clone().requires_grad_()
    value = token_divergence(a, t, None, "generalized_jsd", beta=0.5)
    value.backward()
    ref = token_divergence(s.float().requires_grad_(), t.float(), None, "generalized_jsd", beta=0.5)
    assert value.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    assert torch.allclose(value, ref, atol=1e-6)


def test_normalizer_and_stats() -> None:
    s, t = logits_pair()
    mask = next_token_mask(labels_for())
    stats = ChunkedStats(rows=torch.empty(0))
    mean = token_divergence(s, t, mask, "forward_kl", stats=stats)
    total = token_divergence(s, t, mask, "forward_kl", normalizer=1.0)
    assert stats.count == int(mask.sum()) and stats.rows.shape == (stats.count,)
    assert torch.allclose(total, mean * stats.count, atol=1e-5)
    assert stats.total == pytest.approx(float(total), rel=1e-6)


def test_bad_inputs_raise_clear_errors() -> None:
    s, t = logits_pair()
    with pytest.raises(ValueError, match="differ.*uld"):
        token_divergence(s, t[..., :-1])
    with pytest.raises(ValueError, match="detach"):
        token_divergence(s, t.clone().requires_grad_())
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(s, t, temperature=0)
    with pytest.raises(KeyError, match="unknown token divergence.*forward_kl"):
        token_divergence(s, t, None, "fwd")
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
        token_divergence(s, t, None, "generalized_jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\)"):
        token_divergence(s, t, None, "skew_forward_kl", alpha=1.0)
    with pytest.raises(ValueError, match="mask"):
        token_divergence(s, t, torch.ones(2, 5, dtype=torch.bool))


# ======================================================================================= 5. peers
def trl_generalized_jsd():
    pytest.importorskip("trl")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:  # older TRL releases
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 0.9, 2.0])
def test_parity_with_trl_generalized_jsd_loss(beta: float, temperature: float) -> None:
    """TRL scores logits and labels that are already aligned (GKDTrainer shifts them before the call); ours takes
    Hugging Face labels and shifts: value and gradient agree."""
    trl_loss = trl_generalized_jsd()
    s, t = logits_pair(b=3, t=7, v=17, seed=int(beta * 10 + temperature * 100))
    labels = labels_for(3, 7, 17)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = token_divergence(a, t, next_token_mask(labels), "generalized_jsd", beta=beta, temperature=temperature)
    theirs = trl_loss(b[:, :-1], t[:, :-1], labels=labels[:, 1:], beta=beta, temperature=temperature)
    assert torch.allclose(ours, theirs, atol=1e-6), (float(ours), float(theirs))
    ours.backward()
    theirs.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def distillm_losses(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """DistiLLM's token losses (Ko et al., ICML 2024; jongwooko/distillm, distillm/losses.py) restated: masked means
    of the per-token sums, forward forms written as cross-entropies -Σ p log(·)."""
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    m = mask.float()

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x * m).sum() / m.sum()

    skew_f = torch.log(alpha * p + (1 - alpha) * q)
    skew_r = torch.log((1 - alpha) * p + alpha * q)
    return {
        "forward_kl": mean(-(p * log_q).sum(-1)),
        "reverse_kl": mean((q * log_q).sum(-1) - (q * log_p).sum(-1)),
        "skew_forward_kl": mean(-(p * skew_f).sum(-1)),
        "skew_reverse_kl": mean((q * log_q).sum(-1) - (q * skew_r).sum(-1)),
        "total_variation": mean(0.5 * (p - q).abs().sum(-1)),
        "teacher_entropy": mean(-(p * log_p).sum(-1)),
    }


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_parity_with_distillm_formulas(alpha: float) -> None:
    """DistiLLM's forward forms are cross-entropies: they equal ours plus the teacher's entropy (a constant), with
    the same gradient; the reverse forms and TVD are equal."""
    s, t = logits_pair(seed=11)
    mask = next_token_mask(labels_for())
    theirs = distillm_losses(s, t, mask, alpha)
    ent = theirs["teacher_entropy"]
    for name, params, offset in [
        ("forward_kl", {}, ent),
        ("reverse_kl", {}, 0),
        ("skew_forward_kl", {"alpha": alpha}, ent),
        ("skew_reverse_kl", {"alpha": alpha}, 0),
        ("total_variation", {}, 0),
    ]:
        a = s.clone().requires_grad_()
        b = s.clone().requires_grad_()
        ours = token_divergence(a, t, mask, name, **params)
        ref = distillm_losses(b, t, mask, alpha)[name]
        assert torch.allclose(ours + offset, ref, atol=1e-5), (name, float(ours + offset), float(ref))
        ours.backward()
        ref.backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


# ======================================================================================= 6. the loss terms
def lm_batch(labels: torch.Tensor, s: torch.Tensor, t: torch.Tensor, attention=None) -> DistillBatch:
    inputs = {"input_ids": torch.zeros(s.shape[:-1], dtype=torch.long)}
    if attention is not None:
        inputs["attention_mask"] = attention
    return DistillBatch(ModelOutputs(s), ModelOutputs(t), labels, inputs=inputs)


@pytest.mark.parametrize(
    ("name", "divergence", "params"),
    [("fkl", "forward_kl", {}), ("rkl", "reverse_kl", {}), ("symkl", "symmetric_kl", {"reverse_weight": 0.5}),
     ("jsd", "generalized_jsd", {"beta": 0.5}), ("tvd", "total_variation", {}),
     ("skewkl", "skew_forward_kl", {"alpha": 0.1}), ("skewrkl", "skew_reverse_kl", {"alpha": 0.1})],
)  # fmt: skip
def test_terms_shift_hugging_face_labels(name: str, divergence: str, params: dict) -> None:
    s, t = logits_pair()
    labels = labels_for()
    term = create_loss(name, temperature=1.5)
    expected = token_divergence(s, t, next_token_mask(labels), divergence, temperature=1.5, **params)
    assert torch.allclose(term(lm_batch(labels, s, t)), expected)
    aligned = create_loss(name, temperature=1.5, shift_labels=False)
    assert torch.allclose(
        aligned(lm_batch(labels, s, t)),
        token_divergence(s, t, labels != -100, divergence, temperature=1.5, **params),
    )


def test_term_without_labels_uses_the_attention_mask() -> None:
    s, t = logits_pair()
    attention = torch.ones(2, 6, dtype=torch.long)
    attention[1, 4:] = 0
    term = create_loss("fkl")
    value = term(lm_batch(None, s, t, attention))  # type: ignore[arg-type]
    assert torch.allclose(value, token_divergence(s, t, position_mask(None, s, attention_mask=attention)))


def test_term_refuses_image_logits() -> None:
    with pytest.raises(ValueError, match=r"language-model logits.*loss=kd"):
        create_loss("jsd")(DistillBatch(ModelOutputs(torch.randn(4, 10)), ModelOutputs(torch.randn(4, 10))))


def test_second_backward_through_the_same_loss_is_refused() -> None:
    """The gradient buffer is handed to autograd on the first backward (no copy); a retained second backward would
    silently reuse a consumed buffer, so it raises instead."""
    s, t = logits_pair()
    a = s.clone().requires_grad_()
    value = token_divergence(a, t)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        value.backward()
