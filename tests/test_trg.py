"""Token-level relationship graph (:mod:`lightning_kd.losses.trg`): a hand-worked graph, zero at identical features,
invariances, token sampling, gradients, bf16, errors, the YAML config, state_dict round trip and real timm pairs (a
ResNet pair and a ViT student with a CNN teacher) through Lightning (CPU).

torchdistill has no TRG (nor LSP), so there is no parity test; the hand-worked case is computed in plain Python."""

from __future__ import annotations

import inspect
import math

import pytest
import timm
import torch
from conftest import fast_trainer, gen, random_data, total
from omegaconf import OmegaConf
from torch import nn

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.connectors import ShapeMismatchError
from lightning_kd.losses.trg import (
    TRGLoss,
    contextual_loss,
    linear_temperature,
    local_preserving_loss,
    sample_token_indices,
    to_tokens,
    token_infonce_loss,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")


class _Prefixed(nn.Module):
    """Stands in for a timm ViT in SetupContext: only its ``num_prefix_tokens`` is read."""

    num_prefix_tokens = 1


def _ctx(term: TRGLoss, s: torch.Tensor, t: torch.Tensor, s_model=None, t_model=None) -> SetupContext:
    return SetupContext(
        student=ModelOutputs(torch.zeros(len(s), 3), {term.student_tap: s}),
        teacher=ModelOutputs(torch.zeros(len(t), 3), {term.teacher_tap: t}),
        student_model=s_model or nn.Identity(),
        teacher_model=t_model or nn.Identity(),
        num_classes=3,
    )


def _batch(term: TRGLoss, s: torch.Tensor, t: torch.Tensor, step: int = 0, max_steps: int = -1) -> DistillBatch:
    return DistillBatch(
        ModelOutputs(torch.zeros(len(s), 3), {term.student_tap: s}),
        ModelOutputs(torch.zeros(len(t), 3), {term.teacher_tap: t}),
        step=step,
        max_steps=max_steps,
    )


def _term(s: torch.Tensor, t: torch.Tensor, **kwargs) -> TRGLoss:
    term = TRGLoss(student_layer="s", teacher_layer="t", **kwargs)
    term.setup(_ctx(term, s, t))
    return term


# --------------------------------------------------------------------------------------------------- hand-worked
def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _sqdist(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b))


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# 2 images × 2 positions (maps [B, C, 1, 2]); node order: image 0 pos 0, image 0 pos 1, image 1 pos 0, image 1 pos 1
T_NODES = [[1.0, 1.0], [2.0, 1.0], [1.0, 3.0], [4.0, 1.5]]
S_NODES = [[0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 2.0]]
W = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]  # the connector 3 -> 2 set by hand


def _as_map(nodes: list[list[float]]) -> torch.Tensor:
    x = torch.tensor(nodes).view(2, 2, -1)  # [B, pos, C]
    return x.permute(0, 2, 1).unsqueeze(2).contiguous()  # [B, C, 1, 2]


def _hand_local(k: int, sigma: float) -> float:
    total_kl = 0.0
    for i in range(4):
        others = sorted((_sqdist(T_NODES[i], T_NODES[j]), j) for j in range(4) if j != i)
        nbrs = [j for _, j in others[:k]]
        p_t = _softmax([math.exp(-_sqdist(T_NODES[i], T_NODES[j]) / (2 * sigma)) for j in nbrs])
        p_s = _softmax([math.exp(-_sqdist(S_NODES[i], S_NODES[j]) / (2 * sigma)) for j in nbrs])
        total_kl += sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    return total_kl / 4


def _hand_context() -> float:
    err = 0.0
    for b in range(2):
        for nodes_pair in [(0, 1)]:
            idx = [2 * b + nodes_pair[0], 2 * b + nodes_pair[1]]
            for i in idx:
                row_t = _softmax([sum(x * y for x, y in zip(T_NODES[i], T_NODES[j])) / math.sqrt(2) for j in idx])
                row_s = _softmax([sum(x * y for x, y in zip(S_NODES[i], S_NODES[j])) / math.sqrt(3) for j in idx])
                err += sum((a - c) ** 2 for a, c in zip(row_s, row_t))
    return err / 8


def _hand_global(tau: float) -> float:
    u = [[sum(w * x for w, x in zip(row, s)) for row in W] for s in S_NODES]
    loss = 0.0
    for i in range(4):
        logits = [_cos(u[i], T_NODES[j]) / tau for j in range(4)]
        loss += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return loss / 4


def test_hand_worked_four_token_graph() -> None:
    s, t = _as_map(S_NODES), _as_map(T_NODES)
    # the student's own 2-NN of node 0 ({2, 3}) differ from the teacher's ({1, 2}): the teacher's graph is used
    own = sorted((_sqdist(S_NODES[0], S_NODES[j]), j) for j in (1, 2, 3))
    assert {j for _, j in own[:2]} == {2, 3}
    term = _term(s, t, k=2, sigma=0.5, normalize=False, tokens_per_image=None, temperature_start=0.5)
    assert isinstance(term.connector, nn.Linear)
    with torch.no_grad():
        term.connector.weight.copy_(torch.tensor(W))
        term.connector.bias.zero_()
    parts = term(_batch(term, s, t, step=0, max_steps=10))
    assert set(parts) == {"context", "local", "global"}
    expected = {"local": _hand_local(2, 0.5), "context": _hand_context(), "global": _hand_global(0.5)}
    for name, value in expected.items():
        assert value > 1e-3, name
        assert float(parts[name]) == pytest.approx(value, rel=1e-5), name
    # weights multiply their parts; the temperature follows the linear schedule 0.5 -> 0.1
    term.context_weight, term.local_weight, term.global_weight = 2.0, 3.0, 0.5
    parts = term(_batch(term, s, t, step=5, max_steps=10))
    assert float(parts["context"]) == pytest.approx(2 * expected["context"], rel=1e-5)
    assert float(parts["local"]) == pytest.approx(3 * expected["local"], rel=1e-5)
    assert float(parts["global"]) == pytest.approx(0.5 * _hand_global(0.3), rel=1e-5)
    term.local_weight = 0.0
    assert set(term(_batch(term, s, t))) == {"context", "global"}


def test_local_loss_uses_the_teacher_neighbourhoods_and_kl_teacher_to_student() -> None:
    z_t, z_s = torch.tensor(T_NODES), torch.tensor(S_NODES)
    assert float(local_preserving_loss(z_s, z_t, k=2, sigma=0.5, normalize=False)) == pytest.approx(
        _hand_local(2, 0.5), rel=1e-5
    )
    # k is capped at n - 1: k = 10 equals k = 3 (every other node is a neighbour)
    torch.testing.assert_close(
        local_preserving_loss(z_s, z_t, k=10, sigma=0.5, normalize=False),
        local_preserving_loss(z_s, z_t, k=3, sigma=0.5, normalize=False),
    )
    assert float(local_preserving_loss(z_s, z_t, k=3, sigma=0.5, normalize=False)) == pytest.approx(
        _hand_local(3, 0.5), rel=1e-5
    )


def test_to_tokens_positions_patches_and_prefix() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    tokens = to_tokens(x)
    assert tuple(tokens.shape) == (2, 16, 3)
    torch.testing.assert_close(tokens[1, 6], x[1, :, 1, 2])  # row-major positions
    patches = to_tokens(x, patch_size=2)
    assert tuple(patches.shape) == (2, 4, 12)
    torch.testing.assert_close(patches[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # top-right patch, (c, kh, kw) order
    seq = torch.randn(2, 5, 7, generator=gen(0))
    torch.testing.assert_close(to_tokens(seq, prefix=1), seq[:, 1:])


# --------------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("shape", [(4, 6, 4, 4), (4, 9, 6)])
def test_zero_at_identical_features_even_with_sampling(shape: tuple[int, ...]) -> None:
    f = torch.randn(*shape, generator=gen(1))
    term = _term(f, f, connector="none", tokens_per_image=3)
    parts = term(_batch(term, f, f.clone(), step=7))
    assert float(parts["local"]) < 1e-7 and float(parts["context"]) < 1e-9
    # the global InfoNCE is not zero at identical features, but lower than against shuffled teacher tokens
    other = term(_batch(term, f, f[torch.randperm(len(f), generator=gen(2))].flip(1), step=7))
    assert float(parts["global"]) < float(other["global"])
    assert float(other["local"]) > 1e-4 and float(other["context"]) > 1e-5


def test_invariances() -> None:
    s = torch.randn(4, 5, 3, 3, generator=gen(3))
    t = torch.randn(4, 8, 3, 3, generator=gen(4))
    term = _term(s, t, tokens_per_image=None)
    ref = term(_batch(term, s, t))
    assert all(float(v) > 1e-4 for v in ref.values())

    def same(a: dict, b: dict, names=("context", "local", "global")) -> None:
        for n in names:
            torch.testing.assert_close(a[n], b[n], **TOL)

    # relabelling the graph: permuting the images, or the positions jointly in both models
    perm = torch.tensor([2, 0, 3, 1])
    same(term(_batch(term, s[perm], t[perm])), ref)
    pos = torch.randperm(9, generator=gen(5))
    s_p = s.flatten(2)[:, :, pos].view_as(s)
    t_p = t.flatten(2)[:, :, pos].view_as(t)
    same(term(_batch(term, s_p, t_p)), ref)
    # a positive per-token rescaling: the graph (normalised tokens) does not change; nor do the teacher's cosines
    scale = torch.rand(4, 1, 3, 3, generator=gen(6)) * 5 + 0.1
    same(term(_batch(term, s, t * scale)), ref, names=("local", "global"))
    scaled = term(_batch(term, s * scale, t))
    same(scaled, ref, names=("local",))
    assert abs(float(scaled["context"]) - float(ref["context"])) > 1e-5  # the context softmax(FFᵀ/√D) is not
    assert abs(float(scaled["global"]) - float(ref["global"])) > 1e-5  # the student goes through W·x + b first
    # an orthogonal map of either feature space keeps distances and Gram matrices: local and context unchanged
    q_s = torch.linalg.qr(torch.randn(5, 5, generator=gen(7)))[0]
    q_t = torch.linalg.qr(torch.randn(8, 8, generator=gen(8)))[0]
    rotated = term(_batch(term, torch.einsum("dc,bchw->bdhw", q_s, s), torch.einsum("dc,bchw->bdhw", q_t, t)))
    same(rotated, ref, names=("local", "context"))


def test_token_sampling_is_seeded_shared_and_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    idx = sample_token_indices(3, 10, 4, g)
    assert tuple(idx.shape) == (3, 4)
    assert all(len(set(row.tolist())) == 4 for row in idx)  # distinct positions per image
    assert not torch.equal(idx[0], idx[1]) or not torch.equal(idx[1], idx[2])  # drawn per image
    torch.testing.assert_close(sample_token_indices(2, 5, None, g), torch.arange(5).expand(2, 5))
    torch.testing.assert_close(sample_token_indices(2, 5, 9, g), torch.arange(5).expand(2, 5))

    s = torch.randn(4, 6, 5, 5, generator=gen(9))
    t = torch.randn(4, 12, 5, 5, generator=gen(10))
    term = _term(s, t, tokens_per_image=4)
    assert torch.equal(term.sample(4, 25, 3), term.sample(4, 25, 3))
    assert not torch.equal(term.sample(4, 25, 3), term.sample(4, 25, 4))
    other_seed = _term(s, t, tokens_per_image=4, seed=1)
    assert not torch.equal(term.sample(4, 25, 3), other_seed.sample(4, 25, 3))
    a, b = term(_batch(term, s, t, step=3)), term(_batch(term, s, t, step=3))
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    assert float(term(_batch(term, s, t, step=4))["local"]) != float(a["local"])
    # enough tokens per image: no sampling, same as null
    full = _term(s, t, tokens_per_image=None)
    full.connector.load_state_dict(term.connector.state_dict())
    many = _term(s, t, tokens_per_image=100)
    many.connector.load_state_dict(term.connector.state_dict())
    x, y = full(_batch(full, s, t, step=3)), many(_batch(many, s, t, step=3))
    for name in x:
        torch.testing.assert_close(x[name], y[name])


def test_temperature_schedule() -> None:
    assert linear_temperature(0.5, 0.1, 0, 100) == 0.5
    assert linear_temperature(0.5, 0.1, 50, 100) == pytest.approx(0.3)
    assert linear_temperature(0.5, 0.1, 100, 100) == pytest.approx(0.1)
    assert linear_temperature(0.5, 0.1, 500, 100) == pytest.approx(0.1)
    assert linear_temperature(0.5, 0.1, 7, -1) == 0.1  # unknown length: the final temperature
    u, v = torch.randn(6, 4, generator=gen(11)), torch.randn(6, 4, generator=gen(12))
    sims = nn.functional.normalize(u, dim=1) @ nn.functional.normalize(v, dim=1).t()
    by_hand = -(sims.diag() / 0.2 - torch.logsumexp(sims / 0.2, dim=1)).mean()
    torch.testing.assert_close(token_infonce_loss(u, v, 0.2), by_hand, **TOL)


def test_contextual_loss_matches_an_explicit_loop() -> None:
    f_s, f_t = torch.randn(3, 4, 5, generator=gen(13)), torch.randn(3, 4, 7, generator=gen(14))
    err = []
    for b in range(3):
        cs_s = torch.softmax(f_s[b] @ f_s[b].t() / math.sqrt(5), dim=1)
        cs_t = torch.softmax(f_t[b] @ f_t[b].t() / math.sqrt(7), dim=1)
        err.append(((cs_s - cs_t) ** 2).mean())
    torch.testing.assert_close(contextual_loss(f_s, f_t), torch.stack(err).mean(), **TOL)


# ----------------------------------------------------------------------------------------------- gradients, dtypes
def test_gradients_reach_student_and_connector_never_the_teacher() -> None:
    s = torch.randn(3, 4, 3, 3, generator=gen(15)).requires_grad_()
    t = torch.randn(3, 8, 3, 3, generator=gen(16))
    term = _term(s.detach(), t, tokens_per_image=5)
    out = total(term(_batch(term, s, t)))
    assert out.dtype == torch.float32
    out.backward()
    assert t.grad is None and not t.requires_grad
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for p in term.connector.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # each part alone reaches the student; only the global part reaches the connector
    for name in ("context", "local", "global"):
        s.grad = None
        term.zero_grad()
        term(_batch(term, s, t))[name].backward()
        assert s.grad.abs().sum() > 0, name
        assert (term.connector.weight.grad is not None) == (name == "global"), name


def test_teacher_side_gets_no_gradient_even_if_it_requires_grad() -> None:
    s = torch.randn(2, 4, 2, 2, generator=gen(17)).requires_grad_()
    t = torch.randn(2, 4, 2, 2, generator=gen(18)).requires_grad_()
    term = _term(s.detach(), t.detach(), connector="none")
    total(term(_batch(term, s, t))).backward()
    assert t.grad is None and s.grad is not None


def test_bf16_inputs_give_a_float32_loss() -> None:
    s = torch.randn(4, 6, 3, 3, generator=gen(19))
    t = torch.randn(4, 10, 3, 3, generator=gen(20))
    term = _term(s, t)
    low = term(_batch(term, s.bfloat16(), t.bfloat16()))
    ref = term(_batch(term, s.bfloat16().float(), t.bfloat16().float()))
    for name in ref:
        assert low[name].dtype == torch.float32
        torch.testing.assert_close(low[name], ref[name], **TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = term(_batch(term, s, t))
    for name in ref:
        assert auto[name].dtype == torch.float32
        torch.testing.assert_close(auto[name], term(_batch(term, s, t))[name], atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------------- errors
def test_token_count_mismatch_names_taps_shapes_and_fix() -> None:
    term = TRGLoss(student_layer="layer3", teacher_layer="layer4")
    with pytest.raises(ValueError) as err:
        term.setup(_ctx(term, torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 2, 2)))
    for piece in ("layer3", "layer4", "(2, 8, 4, 4)", "(2, 16, 2, 2)", "16 tokens", "4", "equal resolution"):
        assert piece in str(err.value), str(err.value)
    # patch_size applies to both maps: 4x4 -> 2x2 patches but 2x2 -> 1x1
    patched = TRGLoss(student_layer="a", teacher_layer="b", patch_size=2)
    with pytest.raises(ValueError, match="gives 4 tokens per image and teacher tap 'b' .* gives 1"):
        patched.setup(_ctx(patched, torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 2, 2)))
    # at run time (e.g. another input size) the token grids are checked again
    ok = _term(torch.zeros(2, 8, 2, 2), torch.zeros(2, 16, 2, 2))
    with pytest.raises(ValueError, match="same token grid"):
        ok(_batch(ok, torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 2, 2)))


def test_bad_shapes_and_arguments() -> None:
    term = TRGLoss(student_layer="embedding", teacher_layer="embedding")
    with pytest.raises(ValueError, match=r"feature map \[B, C, H, W\].*not an embedding"):
        term.setup(_ctx(term, torch.zeros(2, 8), torch.zeros(2, 8)))
    term = TRGLoss(student_layer="a", teacher_layer="b", patch_size=3)
    with pytest.raises(ValueError, match="not divisible into 3×3 patches"):
        term.setup(_ctx(term, torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 4, 4)))
    with pytest.raises(ValueError, match="only applies to feature maps"):
        term = TRGLoss(student_layer="a", teacher_layer="b", patch_size=2)
        term.setup(_ctx(term, torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)))
    with pytest.raises(ShapeMismatchError, match="connector"):
        _term(torch.zeros(2, 8, 2, 2), torch.zeros(2, 16, 2, 2), connector="none")
    for kwargs, match in [
        ({"k": 0}, "k must"),
        ({"patch_size": 0}, "patch_size must"),
        ({"tokens_per_image": 0}, "tokens_per_image must"),
        ({"sigma": 0.0}, "sigma must"),
        ({"temperature_end": 0.0}, "temperature_end"),
        ({"temperature_start": -1.0}, "temperature_start"),
        ({"local_weight": -1.0}, "local_weight must"),
        ({"connector": "conv"}, "connector must"),
    ]:
        with pytest.raises(ValueError, match=match):
            TRGLoss(**kwargs)
    with pytest.raises(RuntimeError, match="setup"):
        fresh = TRGLoss(student_layer="s", teacher_layer="t")
        fresh(_batch(fresh, torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)))
    with pytest.warns(UserWarning, match="one token per image"):
        single = _term(torch.zeros(2, 4, 1, 1), torch.zeros(2, 4, 1, 1))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        single(_batch(single, torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1)))
    # one token per image still gives an (instance-level) graph over the batch; the context part is 0
    parts = single(
        _batch(single, torch.randn(4, 4, 1, 1, generator=gen(21)), torch.randn(4, 4, 1, 1, generator=gen(22)))
    )
    assert float(parts["context"]) == 0.0 and float(parts["local"]) > 0 and float(parts["global"]) > 0


def test_prefix_tokens_of_a_vit_are_dropped() -> None:
    s = torch.randn(3, 5, 6, generator=gen(23))  # 1 class token + 2x2 patches
    t = torch.randn(3, 12, 2, 2, generator=gen(24))  # CNN map 2x2
    term = TRGLoss(student_layer="blocks.11", teacher_layer="layer3")
    term.setup(_ctx(term, s, t, s_model=_Prefixed()))
    parts = term(_batch(term, s, t))
    assert all(math.isfinite(float(v)) for v in parts.values())
    # the class token is not a node: changing it changes nothing
    s2 = s.clone()
    s2[:, 0] = 100.0
    for name, value in term(_batch(term, s2, t)).items():
        torch.testing.assert_close(value, parts[name])
    # found on a wrapped ViT too (e.g. a LightningModule holding it)
    wrapped = TRGLoss(student_layer="model.blocks.11", teacher_layer="layer3")
    wrapped.setup(_ctx(wrapped, s, t, s_model=nn.Sequential(nn.Identity(), _Prefixed())))
    assert wrapped._prefix == {"student": 1, "teacher": 0}
    keep = TRGLoss(student_layer="blocks.11", teacher_layer="layer3", drop_prefix_tokens=False)
    with pytest.raises(ValueError, match="5 tokens per image"):
        keep.setup(_ctx(keep, s, t, s_model=_Prefixed()))


# ----------------------------------------------------------------------------------------------- state and config
def test_state_dict_round_trip() -> None:
    s = torch.randn(4, 6, 3, 3, generator=gen(25))
    t = torch.randn(4, 10, 3, 3, generator=gen(26))
    torch.manual_seed(1)
    first = _term(s, t)
    assert set(first.state_dict()) == {"connector.weight", "connector.bias"}
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    torch.manual_seed(2)
    fresh = _term(s, t)
    before = fresh(_batch(fresh, s, t, step=3))
    fresh.load_state_dict(saved)
    expected, got = first(_batch(first, s, t, step=3)), fresh(_batch(fresh, s, t, step=3))
    assert float(before["global"]) != pytest.approx(float(expected["global"]))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    # a second setup (e.g. after a restore) keeps the connector
    connector = fresh.connector
    fresh.setup(_ctx(fresh, s, t))
    assert fresh.connector is connector


def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "trg.yaml"))
    values = yaml["terms"]["trg"]
    params = inspect.signature(TRGLoss.__init__).parameters
    assert sorted(values) == sorted(p for p in params if p != "self")
    for name, value in values.items():
        assert params[name].default == value, name
    cfg = compose(["loss=trg"])
    term = build_terms(cfg.loss.terms)["trg"]
    assert isinstance(term, TRGLoss)
    assert str(term.student_tap) == values["student_layer"] and str(term.teacher_tap) == values["teacher_layer"]
    assert (term.context_weight, term.local_weight, term.global_weight) == (
        values["context_weight"],
        values["local_weight"],
        values["global_weight"],
    )
    assert (term.k, term.sigma, term.tokens_per_image, term.patch_size, term.seed) == (
        values["k"],
        values["sigma"],
        values["tokens_per_image"],
        values["patch_size"],
        values["seed"],
    )
    assert (term.temperature_start, term.temperature_end) == (values["temperature_start"], values["temperature_end"])
    assert term.normalize is values["normalize"] and term.drop_prefix_tokens is values["drop_prefix_tokens"]
    assert term.connector_kind == values["connector"] and term.weight == values["weight"]
    assert isinstance(create_loss("trg"), TRGLoss)


# ----------------------------------------------------------------------------------------------- Lightning
def _fit(student: nn.Module, teacher: nn.Module, loss) -> dict:
    module = lightning_kd.DistillationModule(student, teacher, loss=loss)
    data = random_data(n=8, size=32)
    trainer = fast_trainer(max_steps=1)
    trainer.fit(module, data)
    return trainer.callback_metrics


def _check_metrics(metrics: dict, parts: list[str]) -> None:
    assert "train/trg" in metrics and math.isfinite(float(metrics["train/trg"]))
    assert sorted(k for k in metrics if k.startswith("train/trg/")) == [f"train/trg/{p}" for p in parts]
    torch.testing.assert_close(sum(metrics[f"train/trg/{p}"] for p in parts), metrics["train/trg"], **TOL)


def test_timm_resnet_pair_through_lightning() -> None:
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet34", num_classes=10)
    # the defaults (stage:-1) are 1×1 at 32×32: a warned, instance-level graph
    with pytest.warns(UserWarning, match="one token per image"):
        metrics = _fit(student, teacher, "trg")
    _check_metrics(metrics, ["context", "global", "local"])
    assert float(metrics["train/trg/global"]) > 0


def test_vit_student_with_cnn_teacher_through_lightning() -> None:
    torch.manual_seed(0)
    # a 2-block ViT-Tiny at 32x32: 2x2 patches + a class token
    student = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10)
    teacher = timm.create_model("resnet18", num_classes=10)  # layer3 (stage:-2) is 2x2 at 32x32
    loss = {"trg": {"student_layer": "stage:-1", "teacher_layer": "stage:-2", "tokens_per_image": 3}}
    metrics = _fit(student, teacher, loss)
    _check_metrics(metrics, ["context", "global", "local"])
    assert all(float(metrics[f"train/trg/{p}"]) > 0 for p in ("context", "global", "local"))
