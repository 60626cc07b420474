"""CRD (:mod:`lightning_kd.losses.crd`) and the shared memory banks (:mod:`lightning_kd.losses.memory`):
hand-worked NCE values on a tiny bank, the bank update, negative sampling, torchdistill parity (loss, gradients, Z,
bank update), gradient routing, bf16, errors, checkpoint round trip, a 2-process gloo DDP bank update, the YAML and
a timm pair through Lightning (CPU)."""

from __future__ import annotations

import copy
import inspect
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from conftest import fast_trainer, gen, random_data, total
from omegaconf import OmegaConf
from torch import nn
from torchdistill.losses.mid_level import CRDLoss as TDCRDLoss

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.crd import CRDLoss, nce_loss
from lightning_kd.losses.memory import ContrastMemory, momentum_update

TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_term(s_dim: int = 6, t_dim: int = 10, n: int = 40, seed: int = 0, **kwargs) -> CRDLoss:
    """A CRD term set up for ``[B, s_dim]`` / ``[B, t_dim]`` features and a training set of ``n`` samples."""
    kwargs.setdefault("nce_k", 7)
    kwargs.setdefault("feat_dim", 8)
    term = CRDLoss(**kwargs)
    torch.manual_seed(seed)
    term.setup(ctx_for(term, (2, s_dim), (2, t_dim), n))
    return term


def ctx_for(term, s_shape: tuple[int, ...], t_shape: tuple[int, ...], n: int | None) -> SetupContext:
    return SetupContext(
        student=ModelOutputs(torch.zeros(s_shape[0], 3), {term.student_tap: torch.zeros(s_shape)}),
        teacher=ModelOutputs(torch.zeros(t_shape[0], 3), {term.teacher_tap: torch.zeros(t_shape)}),
        student_model=nn.Identity(),
        teacher_model=nn.Identity(),
        num_classes=3,
        num_samples=n,
    )


def batch_for(term, s: torch.Tensor, t: torch.Tensor, indices, targets=None) -> DistillBatch:
    b = len(s)
    return DistillBatch(
        ModelOutputs(torch.zeros(b, 3), {term.student_tap: s}),
        ModelOutputs(torch.zeros(b, 3), {term.teacher_tap: t}),
        targets=targets,
        indices=indices,
    )


def identity_heads(term) -> None:
    """Heads = identity linear maps (no bias): the embeddings are the L2-normalised features."""
    with torch.no_grad():
        for head in (term.embed_s, term.embed_t):
            head.linear.weight.copy_(torch.eye(head.linear.weight.shape[0], head.linear.weight.shape[1]))
            head.linear.bias.zero_()


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_nce_on_a_tiny_bank() -> None:
    """N = 4 samples, d = 2, K = 2, τ = 0.5: the two NCE losses, Z from the first batch, kept for the second."""
    n, k, tau, eps = 4, 2, 0.5, 1e-7
    term = make_term(s_dim=2, t_dim=2, n=n, nce_k=k, feat_dim=2, nce_t=tau, negatives="instance")
    identity_heads(term)
    angles = [0.0, 0.7, 2.0, -1.2]
    bank_t = [[math.cos(a), math.sin(a)] for a in angles]
    bank_s = [[math.cos(a + 0.3), math.sin(a + 0.3)] for a in angles]
    term.memory.teacher_bank.copy_(torch.tensor(bank_t))
    term.memory.student_bank.copy_(torch.tensor(bank_s))
    f_s = [[2.0, 1.0], [-1.0, 3.0]]  # embeddings = unit(f_s)
    f_t = [[0.0, 1.0], [1.0, -1.0]]
    idx = [[0, 2, 3], [1, 0, 2]]  # column 0 = the sample itself

    def losses(bank_anchor: list[list[float]], anchors: list[list[float]], z: float | None):
        scores = [[math.exp(dot(bank_anchor[j], unit(a)) / tau) for j in row] for row, a in zip(idx, anchors)]
        if z is None:
            z = n * sum(map(sum, scores)) / (len(scores) * (k + 1))
        noise = k / n
        loss = 0.0
        for row in scores:
            p = [x / z for x in row]
            loss += math.log(p[0] / (p[0] + noise + eps)) + sum(math.log(noise / (q + noise + eps)) for q in p[1:])
        return -loss / len(scores), z

    expected_s, z_s = losses(bank_t, f_s, None)  # student anchor against the teacher bank
    expected_t, z_t = losses(bank_s, f_t, None)  # teacher anchor against the student bank
    parts = term.contrast(torch.tensor(f_s), torch.tensor(f_t), torch.tensor([0, 1]), contrast_idx=torch.tensor(idx))
    assert set(parts) == {"student_anchor", "teacher_anchor"}
    assert parts["student_anchor"].item() == pytest.approx(expected_s, rel=1e-5)
    assert parts["teacher_anchor"].item() == pytest.approx(expected_t, rel=1e-5)
    torch.testing.assert_close(term.normalizers, torch.tensor([z_s, z_t]), **TOL)
    # the bank rows 0 and 1 moved half-way to the new embeddings and were renormalised
    for row, old, new in ((0, bank_s[0], f_s[0]), (1, bank_s[1], f_s[1])):
        mixed = [0.5 * a + 0.5 * b for a, b in zip(old, unit(new))]
        torch.testing.assert_close(term.memory.student_bank[row], torch.tensor(unit(mixed)), **TOL)
    torch.testing.assert_close(term.memory.student_bank[2:], torch.tensor(bank_s[2:]), **TOL)
    # second batch: Z is not re-estimated
    bank_t = term.memory.teacher_bank.tolist()
    expected_s2, _ = losses(bank_t, f_s, z_s)
    parts2 = term.contrast(torch.tensor(f_s), torch.tensor(f_t), torch.tensor([0, 1]), contrast_idx=torch.tensor(idx))
    assert parts2["student_anchor"].item() == pytest.approx(expected_s2, rel=1e-5)
    torch.testing.assert_close(term.normalizers, torch.tensor([z_s, z_t]), **TOL)


def test_nce_loss_by_hand() -> None:
    # P_pos = 0.5, P_neg = [0.1, 0.2], K/N = 2/4
    probs = torch.tensor([[0.5, 0.1, 0.2]])
    expected = -(math.log(0.5 / 1.0) + math.log(0.5 / 0.6) + math.log(0.5 / 0.7))
    assert float(nce_loss(probs, 4, eps=0.0)) == pytest.approx(expected, rel=1e-6)
    # the loss falls as the positive's score rises and as the negatives' scores fall
    assert float(nce_loss(torch.tensor([[2.0, 0.1, 0.2]]), 4)) < expected
    assert float(nce_loss(torch.tensor([[0.5, 0.01, 0.02]]), 4)) < expected


def test_bank_update_math() -> None:
    old = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    new = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    out = momentum_update(old, new, 0.5)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(out[0], torch.tensor([r, r]), **TOL)
    torch.testing.assert_close(out[1], torch.tensor([0.0, 1.0]), **TOL)  # 0.5·[0, 2] + 0.5·[0, -1] = [0, 0.5]
    out = momentum_update(old[:1], new[:1], 0.9)
    torch.testing.assert_close(out[0], torch.tensor(unit([0.9, 0.1])), **TOL)
    # through the memory: only the given rows change
    memory = ContrastMemory(5, 2, 2, 0.5, "instance")
    before = memory.student_bank.clone()
    memory.update(torch.tensor([3]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([2]))
    expected = momentum_update(before[3:4], torch.tensor([[0.0, 1.0]]), 0.5)
    torch.testing.assert_close(memory.student_bank[3:4], expected, **TOL)
    torch.testing.assert_close(memory.student_bank[[0, 1, 2, 4]], before[[0, 1, 2, 4]])
    assert memory.labels.tolist() == [-1, -1, -1, 2, -1]


# --------------------------------------------------------------------------------------------------- sampling
def test_sampling_excludes_the_positive_and_known_same_class_rows() -> None:
    torch.manual_seed(1)
    n = 24
    memory = ContrastMemory(n, 4, 23, 0.5, "other_class")
    memory.labels.copy_(torch.arange(n) % 4)
    memory.labels[20:] = -1  # not seen yet: may be drawn whatever their class
    indices = torch.tensor([0, 5, 10, 15])
    targets = memory.labels[indices]
    seen = set()
    for _ in range(20):
        idx = memory.draw(indices, targets)
        assert idx.shape == (4, 24) and idx[:, 0].tolist() == indices.tolist()
        neg = idx[:, 1:]
        assert not (neg == indices[:, None]).any()
        lab = memory.labels[neg]
        assert not ((lab == targets[:, None]) & (lab >= 0)).any()
        seen |= set(neg[0].tolist())
    # anchor 0 (class 0) reaches every other-class row and the unseen rows 20..23, nothing else
    assert seen == {i for i in range(20) if i % 4 != 0} | {20, 21, 22, 23}


def test_instance_sampling_is_uniform_over_the_other_samples() -> None:
    torch.manual_seed(2)
    memory = ContrastMemory(6, 4, 5, 0.5, "instance")
    idx = memory.draw(torch.tensor([2] * 400), None)
    neg = idx[:, 1:].flatten()
    assert not (neg == 2).any()
    counts = torch.bincount(neg, minlength=6).tolist()
    assert counts[2] == 0
    assert all(abs(c - 400) < 90 for i, c in enumerate(counts) if i != 2)  # 2000 draws over 5 rows, sd ≈ 18


def test_sampling_stream_is_restored_from_the_state_dict() -> None:
    torch.manual_seed(3)
    a = ContrastMemory(30, 4, 10, 0.5, "instance")
    a.draw(torch.arange(4))
    state = copy.deepcopy(a.state_dict())
    torch.manual_seed(99)
    b = ContrastMemory(30, 4, 10, 0.5, "instance")
    assert not torch.equal(b.draw(torch.arange(4)), a.draw(torch.arange(4)))  # different seed: different draws
    a.load_state_dict(state)
    b.load_state_dict(state)
    torch.testing.assert_close(a.draw(torch.arange(4)), b.draw(torch.arange(4)))
    assert int(a.sample_count) == 2


def test_nce_k_is_capped_on_small_datasets() -> None:
    term = CRDLoss()
    with pytest.warns(UserWarning, match="nce_k=16384.*10 samples; using 9"):
        term.setup(ctx_for(term, (2, 6), (2, 8), 10))
    assert term.memory.num_negatives == 9
    assert term.memory.student_bank.shape == (10, 128)


# ----------------------------------------------------------------------------------------------- torchdistill parity
def test_matches_torchdistill_loss_gradients_z_and_bank_update() -> None:
    n, b, k = 50, 6, 9
    term = make_term(s_dim=10, t_dim=12, n=n, nce_k=k, feat_dim=8, seed=4)
    td = TDCRDLoss("s", "empty", "t", input_size=8, output_size=n, num_negative_samples=k, num_samples=n)
    td.memory_v1.copy_(term.memory.student_bank)  # memory_v1 = the student bank, memory_v2 = the teacher bank
    td.memory_v2.copy_(term.memory.teacher_bank)
    g = gen(5)
    for step in range(2):  # the second step uses the Z estimated on the first
        f_s = torch.randn(b, 10, generator=g)
        f_t = torch.randn(b, 12, generator=g)
        indices = torch.randperm(n, generator=g)[:b]
        targets = torch.randint(0, 3, (b,), generator=g)
        contrast_idx = term.memory.draw(indices, targets)

        f_s_ours = f_s.clone().requires_grad_(True)
        ours = total(term.contrast(f_s_ours, f_t, indices, targets, contrast_idx=contrast_idx))
        ours.backward()
        f_s_td = f_s.clone().requires_grad_(True)
        # torchdistill reads the normalised embeddings from its wrappers' outputs: computed here by our heads
        s_emb, t_emb = term.embed_s(f_s_td), term.embed_t(f_t)
        supp = {"pos_idx": indices, "contrast_idx": contrast_idx}
        ref = td({"s": {"output": s_emb}, "empty": {"input": supp}}, {"t": {"output": t_emb}})
        ref.backward()
        assert ref.shape == (1,)  # RepDistiller/torchdistill return a 1-element tensor; ours is a scalar
        torch.testing.assert_close(ours, ref[0], **TOL)
        torch.testing.assert_close(f_s_ours.grad, f_s_td.grad, **TOL)
        torch.testing.assert_close(term.normalizers, td.params[2:4].detach(), **TOL)
        torch.testing.assert_close(term.memory.student_bank, td.memory_v1, **TOL)
        torch.testing.assert_close(term.memory.teacher_bank, td.memory_v2, **TOL)
        term.zero_grad()
    assert step == 1 and ours.item() > 0
    # torchdistill's own negative sampler cannot run (it reads a missing `self.prob`): negatives must be injected
    with pytest.raises(AttributeError, match="prob"):
        td({"s": {"output": s_emb}, "empty": {"input": {"pos_idx": indices}}}, {"t": {"output": t_emb}})


# ----------------------------------------------------------------------------------------------- gradients and dtype
def test_gradients_reach_student_and_heads_never_the_teacher() -> None:
    term = make_term(s_dim=6, t_dim=10, n=30, seed=6)
    f_s = torch.randn(5, 6, generator=gen(7), requires_grad=True)
    f_t = torch.randn(5, 10, generator=gen(8), requires_grad=True)
    parts = term(batch_for(term, f_s, f_t, torch.arange(5), torch.arange(5) % 3))
    total(parts).backward()
    assert f_t.grad is None
    assert f_s.grad is not None and torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() > 0
    for p in term.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in term.buffers())
    # the teacher-anchor direction (against the detached student bank) trains the teacher head only
    term.zero_grad()
    f_s.grad = None
    parts = term(batch_for(term, f_s, f_t, torch.arange(5), torch.arange(5) % 3))
    parts["teacher_anchor"].backward()
    assert f_s.grad is None and term.embed_s.linear.weight.grad is None
    assert term.embed_t.linear.weight.grad.abs().sum() > 0


def test_bf16_inputs_give_a_float32_loss() -> None:
    term = make_term(s_dim=6, t_dim=10, n=30, seed=9)
    twin = copy.deepcopy(term)
    f_s = torch.randn(4, 6, generator=gen(10)).bfloat16()
    f_t = torch.randn(4, 10, generator=gen(11)).bfloat16()
    idx = term.memory.draw(torch.arange(4), torch.arange(4))
    out = term.contrast(f_s, f_t, torch.arange(4), torch.arange(4), contrast_idx=idx)
    ref = twin.contrast(f_s.float(), f_t.float(), torch.arange(4), torch.arange(4), contrast_idx=idx)
    for name in ref:
        assert out[name].dtype == torch.float32
        torch.testing.assert_close(out[name], ref[name], **TOL)
    assert term.memory.student_bank.dtype == torch.float32
    torch.testing.assert_close(term.memory.student_bank, twin.memory.student_bank, **TOL)


# ----------------------------------------------------------------------------------------------- errors
def test_missing_or_bad_indices_raise() -> None:
    term = make_term(n=20)
    s, t = torch.randn(3, 6), torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"crd: the batch carries no sample indices.*IndexedDataset"):
        term(batch_for(term, s, t, None, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"crd: sample indices must lie in \[0, 20\).*max 20"):
        term(batch_for(term, s, t, torch.tensor([0, 1, 20]), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="other_class' needs integer class targets.*negatives: instance"):
        term(batch_for(term, s, t, torch.tensor([0, 1, 2]), None))
    with pytest.raises(ValueError, match="needs integer class targets"):
        term(batch_for(term, s, t, torch.tensor([0, 1, 2]), torch.rand(3, 4)))  # soft targets (mixup)
    instance = make_term(n=20, negatives="instance")
    assert torch.isfinite(total(instance(batch_for(instance, s, t, torch.tensor([0, 1, 2]), None))))


def test_setup_and_argument_errors() -> None:
    term = CRDLoss()
    with pytest.raises(ValueError, match="crd: the memory banks need the training-set size"):
        term.setup(ctx_for(term, (2, 6), (2, 8), None))
    with pytest.raises(RuntimeError, match="setup"):
        term(batch_for(term, torch.randn(2, 6), torch.randn(2, 8), torch.arange(2), torch.arange(2)))
    with pytest.raises(ValueError, match="nce_m"):
        CRDLoss(nce_m=1.0)
    with pytest.raises(ValueError, match="temperature"):
        CRDLoss(nce_t=0.0)
    with pytest.raises(ValueError, match="negatives must be one of"):
        CRDLoss(negatives="hard")
    with pytest.raises(ValueError, match="nce_k"):
        CRDLoss(nce_k=0)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_restores_banks_z_and_sampling() -> None:
    term = make_term(s_dim=6, t_dim=10, n=30, seed=12)
    g = gen(13)
    for _ in range(2):
        term(
            batch_for(
                term,
                torch.randn(4, 6, generator=g),
                torch.randn(4, 10, generator=g),
                torch.randperm(30)[:4],
                torch.randint(0, 3, (4,), generator=g),
            )
        )
    state = copy.deepcopy(term.state_dict())
    assert {
        "normalizers",
        "memory.student_bank",
        "memory.teacher_bank",
        "memory.labels",
        "memory.sample_seed",
        "memory.sample_count",
        "embed_s.linear.weight",
        "embed_t.linear.bias",
    } <= set(state)
    fresh = make_term(s_dim=6, t_dim=10, n=30, seed=77)
    fresh.load_state_dict(state)
    for name, value in state.items():
        torch.testing.assert_close(fresh.state_dict()[name], value, atol=0, rtol=0)
    s, t, idx, y = torch.randn(4, 6, generator=g), torch.randn(4, 10, generator=g), torch.arange(4), torch.arange(4)
    a, b = term(batch_for(term, s, t, idx, y)), fresh(batch_for(fresh, s, t, idx, y))  # negatives drawn, not given
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
    torch.testing.assert_close(term.memory.student_bank, fresh.memory.student_bank, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- DDP (2 × gloo, CPU)
_DDP_WORKER = r"""
import sys, types
root, init_file, out_dir, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# import lightning_kd.losses.memory without running the package __init__ files (they import lightning, timm, every
# loss): the worker then only pays for importing torch
for name, sub in (("lightning_kd", "lightning_kd"), ("lightning_kd.losses", "lightning_kd/losses")):
    package = types.ModuleType(name)
    package.__path__ = [f"{root}/{sub}"]
    sys.modules[name] = package
import torch
import torch.distributed as dist
from lightning_kd.losses.memory import ContrastMemory, all_gather_cat

dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
try:
    torch.manual_seed(0)  # identical initial banks on both ranks
    memory = ContrastMemory(10, 2, 3, 0.5, "other_class")
    # uneven local batches: rank 0 holds samples 0, 1, 2; rank 1 holds sample 7
    indices = torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([7])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) if rank == 0 else torch.tensor([[-1.0, 0.0]])
    targets = torch.tensor([0, 1, 0]) if rank == 0 else torch.tensor([1])
    memory.update(indices, student, -student, targets)
    gathered = all_gather_cat(indices)[0]
    draws = memory.draw(torch.tensor([3, 4]), torch.tensor([0, 1]))
    torch.save(
        {"student": memory.student_bank, "teacher": memory.teacher_bank, "labels": memory.labels,
         "gathered": gathered, "draws": draws},
        f"{out_dir}/rank{rank}.pt",
    )
finally:
    dist.destroy_process_group()
"""


def test_ddp_bank_update_gathers_all_ranks(tmp_path) -> None:
    """Two real gloo ranks (CPU subprocesses): both banks hold the samples of both ranks after one update."""
    root = str(Path(lightning_kd.__file__).resolve().parent.parent)
    args = [root, str(tmp_path / "init"), str(tmp_path)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _DDP_WORKER, *args, str(rank)], stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(0)
    reference = ContrastMemory(10, 2, 3, 0.5, "other_class")  # the same initial banks, updated with all 4 samples
    all_idx = torch.tensor([0, 1, 2, 7])
    all_s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    reference.update(all_idx, all_s, -all_s, torch.tensor([0, 1, 0, 1]))
    assert r0["gathered"].tolist() == r1["gathered"].tolist() == [0, 1, 2, 7]
    for r in (r0, r1):
        torch.testing.assert_close(r["student"], reference.student_bank, **TOL)
        torch.testing.assert_close(r["teacher"], reference.teacher_bank, **TOL)
        assert r["labels"].tolist() == [0, 1, 0, -1, -1, -1, -1, 1, -1, -1]
    assert not torch.equal(r0["draws"], r1["draws"])  # each rank draws its own negatives


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "crd.yaml"))
    values = yaml["terms"]["crd"]
    assert sorted(values) == sorted(p for p in inspect.signature(CRDLoss.__init__).parameters if p != "self")
    defaults = {k: p.default for k, p in inspect.signature(CRDLoss.__init__).parameters.items() if k != "self"}
    assert values == defaults
    assert yaml["task_weight"] == 1.0
    cfg = compose(["loss=crd"])
    term = build_terms(cfg.loss.terms)["crd"]
    assert isinstance(term, CRDLoss)
    assert (term.weight, term.feat_dim, term.nce_k, term.nce_t, term.nce_m) == (0.8, 128, 16384, 0.07, 0.5)
    assert term.negatives == "other_class"
    assert [str(term.student_tap), str(term.teacher_tap)] == ["embedding", "embedding"]
    assert isinstance(create_loss("crd"), CRDLoss)


def test_timm_resnet_pair_through_lightning() -> None:
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet18", num_classes=10)
    module = lightning_kd.DistillationModule(student, teacher, loss="crd")
    n = 16
    data = random_data(n=n, size=16)
    trainer = fast_trainer(max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/crd"])) and float(metrics["train/crd"]) > 0
    parts = sorted(k for k in metrics if k.startswith("train/crd/"))
    assert parts == ["train/crd/student_anchor", "train/crd/teacher_anchor"]
    term = module.engine.terms["crd"]
    assert term.memory.num_samples == n and term.memory.num_negatives == n - 1
    assert (term.normalizers > 0).all()
    assert (term.memory.labels[:8] == torch.arange(8) % 10).all() and (term.memory.labels[8:] == -1).all()
    assert int(term.memory.sample_count) == 2
    keys = module.state_dict().keys()
    assert "engine.terms.crd.memory.student_bank" in keys and "engine.terms.crd.embed_s.linear.weight" in keys
