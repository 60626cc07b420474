"""Several DistillCallbacks on one LightningModule: two teachers, or a logit callback beside a feature callback.

They must coexist: distinct engine submodules (``_lkd_engine_<name>``) during fit and none after, distinct
``state_key``s, distinct log names (``train/<name>/...``), a checkpoint that holds each one's state, and a loss that is
the user's loss plus each callback's own term (so the gradient is the sum of the single-callback contributions).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import SmallCNN, UserModule, fast_trainer, make_loader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_kd import DistillCallback

FITNET = {"fitnet": {"student_layers": "net.features.2", "teacher_layers": "features.2"}}
CONNECTOR = "terms.fitnet.connector"


class Spy(Callback):
    """Records, at the first optimizer step, the student's gradients, the module's ``_lkd_`` children and the ids of
    the optimizer's parameters."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.engines: dict[str, torch.nn.Module] = {}
        self.optimized: set[int] = set()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.grads:
            return
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.net.named_parameters()}
        self.engines = {n: m for n, m in pl_module.named_children() if n.startswith("_lkd_")}
        self.optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}


def _fit(callbacks: list[Callback], *, lr: float = 0.0, steps: int = 1, **trainer_kwargs) -> tuple:
    """Fit a fresh UserModule (SmallCNN seed 0; lr 0 keeps the weights put so the first step's gradients compare)."""
    model = UserModule(lr=lr)
    spy = Spy()
    trainer = fast_trainer(max_steps=steps, callbacks=[*callbacks, spy], **trainer_kwargs)
    trainer.fit(model, make_loader())
    return model, trainer, spy


def _teacher_cb(seed: int, name: str | None, loss=None, **kwargs) -> DistillCallback:
    loss = {"kd": {"weight": 4.0}} if loss is None else loss
    return DistillCallback(teacher=SmallCNN(seed=seed), loss=loss, name=name, **kwargs)


def _assert_restored(model: L.LightningModule) -> None:
    assert "training_step" not in model.__dict__
    assert not [n for n, _ in model.named_modules() if n.startswith("_lkd_")]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def _contribution(run: Spy, base: Spy) -> dict[str, torch.Tensor]:
    return {k: run.grads[k] - base.grads[k] for k in base.grads}


def _assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for k, value in expected.items():
        torch.testing.assert_close(actual[k], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def single_runs() -> dict[str, tuple]:
    """The user's module alone, and with each teacher alone (named t1 / t2)."""
    return {
        "plain": _fit([]),
        "t1": _fit([_teacher_cb(1, "t1")]),
        "t2": _fit([_teacher_cb(2, "t2")]),
    }


# --------------------------------------------------------------------------------------------------------------------
# (a) two teachers
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["t1_first", "t2_first"])
def test_two_teachers_log_apart_and_their_gradients_add(single_runs, order: str) -> None:
    cbs = [_teacher_cb(1, "t1"), _teacher_cb(2, "t2")]
    model, trainer, spy = _fit(cbs if order == "t1_first" else cbs[::-1])
    metrics = trainer.callback_metrics

    # each callback logs under its own name; no unnamed key collects one of them
    for key in ("train/t1/kd", "train/t2/kd", "train/t1/distill", "train/t2/distill"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert "train/kd" not in metrics and "train/distill" not in metrics
    # each value is that callback's own (the same as when it runs alone), not the other's
    for name in ("t1", "t2"):
        alone = single_runs[name][1].callback_metrics
        torch.testing.assert_close(metrics[f"train/{name}/kd"], alone[f"train/{name}/kd"])
        torch.testing.assert_close(metrics[f"train/{name}/distill"], alone[f"train/{name}/distill"])
    assert not torch.isclose(metrics["train/t1/kd"], metrics["train/t2/kd"])

    # both engines attached as distinct submodules during fit, removed after
    assert spy.engines == {"_lkd_engine_t1": cbs[0].engine, "_lkd_engine_t2": cbs[1].engine}
    assert cbs[0].engine is not cbs[1].engine
    assert cbs[0].state_key != cbs[1].state_key
    _assert_restored(model)

    # loss = CE + 4·kd1 + 4·kd2: the gradient is the user's plus each teacher's single-callback contribution
    plain, one, two = (single_runs[k][2] for k in ("plain", "t1", "t2"))
    d1, d2 = _contribution(one, plain), _contribution(two, plain)
    assert all(d1[k].abs().max() > 1e-4 for k in d1) and all(d2[k].abs().max() > 1e-4 for k in d2)
    assert not torch.allclose(d1["fc.weight"], d2["fc.weight"], atol=1e-5)
    _assert_grads_close(spy.grads, {k: plain.grads[k] + d1[k] + d2[k] for k in plain.grads})


@pytest.mark.parametrize(
    "order",
    [
        "weighted_first",
        "weighted_last",
    ],
)
def test_task_weight_scales_only_the_users_loss(single_runs, order: str) -> None:
    """t1 with task_weight 0.5, t2 with the default 1: loss = 0.5·CE + 4·kd1 + 4·kd2 whatever the callbacks' order
    (one callback's task_weight applies to the user's loss, never to the other callback's term)."""
    cbs = [_teacher_cb(1, "t1", task_weight=0.5), _teacher_cb(2, "t2")]
    _, _, spy = _fit(cbs if order == "weighted_first" else cbs[::-1])
    plain, one, two = (single_runs[k][2] for k in ("plain", "t1", "t2"))
    d1, d2 = _contribution(one, plain), _contribution(two, plain)
    _assert_grads_close(spy.grads, {k: 0.5 * plain.grads[k] + d1[k] + d2[k] for k in plain.grads})


# --------------------------------------------------------------------------------------------------------------------
# (b) a logit callback and a feature callback
# --------------------------------------------------------------------------------------------------------------------
def _logit_and_feature() -> list[DistillCallback]:
    return [
        DistillCallback(teacher=SmallCNN(seed=1), loss="kd", name="logit"),
        DistillCallback(teacher=SmallCNN(seed=2), loss=FITNET, name="feat"),
    ]


def test_logit_and_feature_callbacks_coexist(tmp_path) -> None:
    logit, feat = cbs = _logit_and_feature()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    model, trainer, spy = _fit([*cbs, ckpt_cb], lr=0.05, steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    metrics = trainer.callback_metrics
    for key in ("train/logit/kd", "train/logit/distill", "train/feat/fitnet", "train/feat/distill", "user/ce"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert "train/feat/kd" not in metrics and "train/logit/fitnet" not in metrics  # each term logged once, by its own
    assert list(logit.engine.terms) == ["kd"] and list(feat.engine.terms) == ["fitnet"]

    # distinct engines on the module during fit; the connector is trained by the user's optimizer
    assert spy.engines == {"_lkd_engine_logit": logit.engine, "_lkd_engine_feat": feat.engine}
    connector = list(feat.engine.terms["fitnet"].connector.parameters())
    assert connector and {id(p) for p in connector} <= spy.optimized
    assert logit.state_key != feat.state_key
    _assert_restored(model)

    # the checkpoint written during fit holds both callbacks' entries and the feature callback's connector
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert {logit.state_key, feat.state_key} <= set(ckpt["callbacks"])
    saved = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("_lkd_")}
    assert saved and all(k.startswith("_lkd_engine_feat.") for k in saved)  # kd has no state; nothing unnamed
    for k, v in feat.engine.terms["fitnet"].connector.state_dict().items():
        torch.testing.assert_close(saved[f"_lkd_engine_feat.{CONNECTOR}.{k}"], v)


class ConnectorsAtStart(Callback):
    """The restored connectors' weights at on_train_start (after the checkpoint was loaded)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items() if k.startswith("_lkd_")}


def test_two_feature_callbacks_checkpoint_and_resume_each_their_own(tmp_path) -> None:
    """Two fitnet callbacks (same layers, same connector shapes): each one's connector is saved under its own name
    and restored into its own engine on resume, not swapped and not merged."""

    def cbs() -> list[DistillCallback]:
        return [DistillCallback(teacher=SmallCNN(seed=s), loss=FITNET, name=f"f{s}") for s in (1, 2)]

    first = cbs()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    _fit([*first, ckpt_cb], lr=0.05, steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("_lkd_")}
    assert {k.split(".")[0] for k in saved} == {"_lkd_engine_f1", "_lkd_engine_f2"}
    assert {first[0].state_key, first[1].state_key} <= set(ckpt["callbacks"])
    w1, w2 = (saved[f"_lkd_engine_f{s}.{CONNECTOR}.weight"] for s in (1, 2))
    assert not torch.allclose(w1, w2)

    second, probe = cbs(), ConnectorsAtStart()
    model = UserModule(lr=0.05)
    trainer = fast_trainer(max_steps=3, callbacks=[*second, probe], default_root_dir=tmp_path)
    trainer.fit(model, make_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert probe.state.keys() == saved.keys()
    for k, v in saved.items():
        torch.testing.assert_close(probe.state[k], v)
    assert trainer.global_step == 3
    _assert_restored(model)


# --------------------------------------------------------------------------------------------------------------------
# two callbacks without names
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "losses",
    [
        pytest.param(("kd", "kd"), id="kd+kd"),
        pytest.param(("kd", FITNET), id="kd+fitnet"),
        pytest.param((FITNET, "kd"), id="fitnet+kd"),
    ],
)
def test_unnamed_callbacks_fail_clearly_or_stay_apart(losses) -> None:
    """Two DistillCallbacks without ``name``: either a clear error that asks for names, or they stay apart
    (two engines on the module, two state keys, each callback's distill term logged under its own key)."""
    cbs = [DistillCallback(teacher=SmallCNN(seed=s), loss=loss) for s, loss in zip((1, 2), losses)]
    try:
        _, trainer, spy = _fit(cbs)
    except (RuntimeError, ValueError) as err:
        message = str(err)
        assert "name" in message or "state_key" in message, f"unclear error: {message}"
        assert "not in your optimizer" not in message, f"misleading error: {message}"
        return
    assert len(spy.engines) == 2 and set(map(id, spy.engines.values())) == {id(cb.engine) for cb in cbs}
    assert cbs[0].state_key != cbs[1].state_key
    assert len([k for k in trainer.callback_metrics if k.endswith("distill")]) == 2
