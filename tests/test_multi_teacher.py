"""Tests of several teachers (:mod:`lightning_kd.strategies.multi_teacher`), CPU: the ensemble's prediction against
members run on their own, class-count checks, averaging through the unchanged engine (``loss="kd"``), per-teacher
losses, per-teacher agreement and diagnostics in the logs, member taps, and one run of the Hydra app with two
teachers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import TINY_APP, GapNet, SmallCNN, UserModule, fast_trainer, make_loader, tiny
from omegaconf import OmegaConf

from lightning_kd import DistillCallback
from lightning_kd.engine import ClassCountMismatchError, DistillEngine, agreement
from lightning_kd.losses import DistillBatch, ModelOutputs
from lightning_kd.losses.kd import kd_loss
from lightning_kd.models import save_model_file
from lightning_kd.strategies.multi_teacher import (
    PerTeacher,
    TeacherEnsemble,
    combine_logits,
    loss_spec,
    obtain_teachers,
)

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _pair() -> dict[str, torch.nn.Module]:
    return {"a": SmallCNN(seed=1).eval(), "b": SmallCNN(seed=2).eval()}


def test_ensemble_output_is_the_average_of_independent_members() -> None:
    members = _pair()
    with torch.no_grad():
        za, zb = members["a"](X), members["b"](X)
        out = TeacherEnsemble(members)(X)
        probs = TeacherEnsemble(members, combine="mean_probs")(X).logits
        weighted = TeacherEnsemble(members, weights=[3, 1])(X).logits
    torch.testing.assert_close(out.members["a"], za)
    torch.testing.assert_close(out.members["b"], zb)
    torch.testing.assert_close(out.logits, (za + zb) / 2)
    torch.testing.assert_close(probs.softmax(-1), (za.softmax(-1) + zb.softmax(-1)) / 2)
    torch.testing.assert_close(probs.exp().sum(-1), torch.ones(4))  # log of a probability: already normalised
    torch.testing.assert_close(weighted, 0.75 * za + 0.25 * zb)


def test_member_names_from_timm_architectures() -> None:
    ensemble = TeacherEnsemble([tiny("resnet18", 10), tiny("resnet18", 10, seed=1), tiny("resnet10t", 10)])
    assert list(ensemble.members) == ["resnet18", "resnet18_2", "resnet10t"]
    assert list(TeacherEnsemble({"resnet18.a1_in1k": SmallCNN()}).members) == ["resnet18_a1_in1k"]


def test_mismatched_class_counts_name_each_teacher() -> None:
    with pytest.raises(ClassCountMismatchError, match="resnet18: 10, resnet10t: 5"):
        TeacherEnsemble({"resnet18": tiny("resnet18", 10), "resnet10t": tiny("resnet10t", 5)})
    ensemble = TeacherEnsemble({"gap": GapNet(classes=5), "cnn": SmallCNN(classes=10)})  # no num_classes attribute
    with pytest.raises(ClassCountMismatchError, match="gap: 5, cnn: 10"):
        ensemble(X)
    with pytest.raises(ValueError, match="weights"):
        TeacherEnsemble(_pair(), weights=[1.0])
    with pytest.raises(ValueError, match="combine"):
        TeacherEnsemble(_pair(), combine="vote")


def test_averaging_is_plain_kd_on_the_ensemble_with_agreement_per_member() -> None:
    members = _pair()
    student = SmallCNN(seed=0)
    engine = DistillEngine("kd", TeacherEnsemble(members))
    engine.setup(student, X[:2], student)
    teacher = engine.run_teacher(X)
    with torch.no_grad():
        za, zb = members["a"](X), members["b"](X)
    assert set(teacher.members) == {"a", "b"}
    with engine.student_capture():
        logits = student(X)
    batch = DistillBatch(engine.student_outputs(logits), teacher)
    total, logs = engine(batch)
    assert total.item() == pytest.approx(kd_loss(logits, (za + zb) / 2, 4.0).item(), rel=1e-5)
    assert logs["train/agreement/a"] == agreement(logits, za)
    assert logs["train/agreement/b"] == agreement(logits, zb)


def test_per_teacher_agreement_and_diagnostics_reach_the_logs() -> None:
    callback = DistillCallback(TeacherEnsemble(_pair()), loss={"router": {"top_k": 1}})
    trainer = fast_trainer(max_steps=2, callbacks=[callback])
    trainer.fit(UserModule(), make_loader())
    logged = trainer.logged_metrics
    for key in ("train/agreement/a", "train/agreement/b", "train/router/routed/a", "train/router/routed/b"):
        assert key in logged and 0.0 <= float(logged[key]) <= 1.0, key
    assert float(logged["train/router/routed/a"] + logged["train/router/routed/b"]) == pytest.approx(1.0)


def test_per_teacher_kd_is_kd_to_the_mean_tempered_distribution() -> None:
    g = torch.Generator().manual_seed(3)
    za, zb = 2 * torch.randn(5, 6, generator=g), 2 * torch.randn(5, 6, generator=g)
    s1 = torch.randn(5, 6, generator=g).requires_grad_(True)
    s2 = s1.detach().clone().requires_grad_(True)
    term = PerTeacher({"kd": {"temperature": 4.0, "weight": 0.7}})
    assert term.weight == 0.7
    teacher = ModelOutputs((za + zb) / 2, members={"a": za, "b": zb})
    value = term(DistillBatch(ModelOutputs(s1), teacher))
    assert value.item() == pytest.approx(((kd_loss(s1, za, 4.0) + kd_loss(s1, zb, 4.0)) / 2).item(), rel=1e-6)
    assert set(term.diagnostics) == {"a", "b"}
    value.backward()
    mean_tempered = (torch.softmax(za / 4, -1) + torch.softmax(zb / 4, -1)) / 2
    kd_loss(s2, 4.0 * mean_tempered.log(), 4.0).backward()  # softmax(τ·log p̄ / τ) = p̄
    torch.testing.assert_close(s1.grad, s2.grad)
    summed = PerTeacher("kd", reduction="sum")(DistillBatch(ModelOutputs(s1), teacher))
    assert summed.item() == pytest.approx(2 * value.item(), rel=1e-6)


def test_taps_address_a_members_layers() -> None:
    members = {"a": SmallCNN(seed=1), "b": GapNet(channels=4, classes=10, seed=2)}
    student = SmallCNN(seed=0)
    loss = {"fitnet": {"student_layers": "features.3", "teacher_layers": "members.a.features.3"}}
    engine = DistillEngine(loss, TeacherEnsemble(members))
    engine.setup(student, X[:2], student)
    spec = engine.terms["fitnet"].teacher_taps[0]
    assert engine.run_teacher(X)[spec].shape == members["a"].features(X).shape


def test_combined_logits_are_float32_under_autocast() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.randn(2, 3).to(torch.bfloat16)
        assert combine_logits([z, z], "mean_probs").dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------------
# The Hydra app (one compose for the module: composing is slow)
# --------------------------------------------------------------------------------------------------------------------
APP = [
    "strategy=multi_teacher",
    *TINY_APP,
    "model=resnet10t",
    "teacher_epochs=1",
]


@pytest.fixture(scope="module")
def app_cfg():
    from lightning_kd.config import compose

    return compose(APP)


def _with(cfg, **updates):
    cfg = copy.deepcopy(cfg)
    for key, value in updates.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_app_distils_two_teachers_through_the_router(app_cfg, tmp_path, monkeypatch) -> None:
    from lightning_kd.run import train

    monkeypatch.chdir(tmp_path)
    weights = save_model_file(
        tiny("resnet18", 10, seed=1), tmp_path / "r18.pt", {"model": "resnet18", "num_classes": 10}
    )
    cfg = _with(
        app_cfg,
        **{
            "strategy.teachers": ["resnet10t", "resnet18"],
            "strategy.checkpoints": [None, str(weights)],  # one trained and stored now, one loaded
            "strategy.combine": "router",
        },
    )
    res = train(cfg)
    assert res["strategy"] == "multi_teacher" and res["combine"] == "router" and res["loss"] == "router"
    assert res["teacher"] == "resnet10t+resnet18"
    assert "resnet10t: teacher store (trained now)" in res["teacher_source"]
    assert f"resnet18: checkpoint {weights}" in res["teacher_source"]
    assert set(res["teacher_accs"]) == set(res["member_agreement"]) == {"resnet10t", "resnet18"}
    rows = dict(map(tuple, res["rows"]))
    assert {"teacher resnet10t accuracy", "teacher resnet18 accuracy", "agreement with resnet18"} <= set(rows)
    assert math.isfinite(res["student_acc"]) and 0 <= res["agreement"] <= 1
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/router/kd", "train/router/balance", "train/agreement/resnet10t", "train/router/routed/resnet18"):
        assert key in header, key
    assert json.loads((tmp_path / "results.json").read_text())["student_acc"] == res["student_acc"]


def test_combine_selects_the_terms_and_bad_settings_fail_clearly(app_cfg, tmp_path) -> None:
    terms, task_weight = loss_spec(_with(app_cfg, **{"strategy.combine": "partition"}))
    assert list(terms) == ["partition"] and task_weight == 0.0
    terms, task_weight = loss_spec(_with(app_cfg, **{"strategy.per_teacher": "sum"}))
    assert isinstance(terms["kd"], PerTeacher) and terms["kd"].reduction == "sum" and task_weight == 0.1
    cfg = _with(app_cfg, **{"strategy.combine": "router", "strategy.router.terms.router.top_k": 2})
    assert loss_spec(cfg)[0]["router"]["top_k"] == 2
    with pytest.raises(ValueError, match="strategy.combine must be one of"):
        loss_spec(_with(app_cfg, **{"strategy.combine": "vote"}))
    with pytest.raises(ValueError, match="one path"):
        obtain_teachers(_with(app_cfg, **{"strategy.checkpoints": ["a.pt"]}), None, tmp_path)
    with pytest.raises(ValueError, match="non-empty list"):
        obtain_teachers(_with(app_cfg, **{"strategy.teachers": []}), None, tmp_path)
