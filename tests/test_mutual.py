"""Online / mutual distillation (:mod:`lightning_kd.strategies.mutual`): DML, CTCD, BD-KD, with ECE. CPU, tiny nets.

What makes it mutual distillation: every network trains, each term sees its peers' DETACHED logits (no gradient
crosses between networks), the loss is CE + w_i · mean over peers of the terms (hand-computed for K = 2 and K = 3),
per-network metrics (accuracy, ECE against an independent computation) and export of any network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_APP, GapNet, SmallCNN, fast_trainer, make_loader, tiny
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd.config import compose
from lightning_kd.engine import ClassCountMismatchError
from lightning_kd.losses import LossTerm
from lightning_kd.models import load_model_file, save_model_file
from lightning_kd.strategies.mutual import MutualDistillationModule, run_app


def _pair(**kwargs) -> MutualDistillationModule:
    return MutualDistillationModule({"a": SmallCNN(seed=0), "b": SmallCNN(seed=1)}, **kwargs)


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, idx = next(iter(make_loader(n=n, batch=n, seed=seed)))
    return x, y, idx


# ---------------------------------------------------------------------------------------------------- hand-worked loss
def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _hand_losses(logits: dict, y: torch.Tensor, tau: float, task_weight: float, weights: dict) -> dict:
    """L_i = task_weight·CE_i + w_i · (1/(K−1)) Σ_{j≠i} τ²·KL(p_j‖p_i), written out with sums only."""
    out = {}
    for i, zi in logits.items():
        ce = -_log_softmax(zi)[torch.arange(len(y)), y].mean()
        kls = []
        for j, zj in logits.items():
            if j == i:
                continue
            log_pj, log_pi = _log_softmax(zj / tau), _log_softmax(zi / tau)
            kls.append(tau**2 * (log_pj.exp() * (log_pj - log_pi)).sum(-1).mean())
        out[i] = (task_weight * ce + weights[i] * sum(kls) / len(kls), ce, sum(kls) / len(kls))
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_dml_loss_equals_hand_computation(k: int) -> None:
    nets = {f"n{i}": SmallCNN(seed=i) for i in range(k)}
    weights = {"n0": 1.0, "n1": 0.5, "n2": 2.0}
    weights = {n: weights[n] for n in nets}
    module = MutualDistillationModule(nets, loss={"kd": {"temperature": 2.0}}, task_weight=0.7, distill_weights=weights)
    x, y, idx = _batch()
    losses, logs = module.network_losses((x, y, idx))
    with torch.no_grad():
        logits = {n: net(x) for n, net in nets.items()}
    hand = _hand_losses(logits, y, 2.0, 0.7, weights)
    for n in nets:
        total, ce, kd = hand[n]
        # float32 module vs float64 hand computation
        assert losses[n].item() == pytest.approx(total.item(), rel=1e-5)
        assert logs[f"train/{n}/ce"].item() == pytest.approx(ce.item(), rel=1e-5)
        assert logs[f"train/{n}/kd"].item() == pytest.approx(kd.item(), rel=1e-4)  # mean over peers, unweighted
        assert kd.item() > 1e-4  # the peers really disagree, so the distillation part is tested
    if k == 3:  # per-peer agreement, and the mean of them
        peers = [logs[f"train/n0/agreement/{p}"] for p in ("n1", "n2")]
        assert logs["train/n0/agreement"].item() == pytest.approx(sum(peers).item() / 2)
    else:
        assert "train/n0/agreement/n1" not in logs and "train/n0/agreement" in logs


def test_ctcd_asymmetric_weights() -> None:
    """CTCD: L_large = CE + α·KL(p_small‖p_large), L_small = CE + β·KL(p_large‖p_small), different architectures."""
    nets = {"large": SmallCNN(seed=0), "small": GapNet(channels=4, classes=10, seed=1)}
    module = MutualDistillationModule(
        nets, loss={"kd": {"temperature": 1.0}}, distill_weights={"large": 0.3, "small": 2}
    )
    x, y, idx = _batch()
    losses, _ = module.network_losses((x, y, idx))
    with torch.no_grad():
        logits = {n: net(x) for n, net in nets.items()}
    hand = _hand_losses(logits, y, 1.0, 1.0, {"large": 0.3, "small": 2.0})
    assert losses["large"].item() == pytest.approx(hand["large"][0].item(), rel=1e-5)
    assert losses["small"].item() == pytest.approx(hand["small"][0].item(), rel=1e-5)


# ---------------------------------------------------------------------------------------- detached peers, gradients
class Spy(LossTerm):
    """A logit term that records what it was given (kd-like value so it has a gradient)."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, batch):
        self.seen.append((batch.student.logits, batch.teacher.logits))
        return (batch.student.logits.float().log_softmax(-1) * -batch.teacher.logits.float().softmax(-1)).sum(-1).mean()


def test_each_network_learns_from_its_peers_detached_outputs() -> None:
    spy = Spy()
    nets = {"a": SmallCNN(seed=0), "b": SmallCNN(seed=1)}
    module = MutualDistillationModule(nets, loss=spy)
    x, y, idx = _batch()
    losses, _ = module.network_losses((x, y, idx))
    (s_a, t_a), (s_b, t_b) = spy.seen
    assert s_a.requires_grad and s_b.requires_grad
    assert not t_a.requires_grad and not t_b.requires_grad  # sg(z_peer)
    torch.testing.assert_close(t_a, s_b.detach())  # a's teacher is b's output of this step, and vice versa
    torch.testing.assert_close(t_b, s_a.detach())
    # the loss of network a gives no gradient to network b (and reaches a)
    losses["a"].backward()
    assert all(p.grad is None for p in nets["b"].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["a"].parameters())


def test_both_networks_train_and_export_returns_the_trained_weights(tmp_path: Path) -> None:
    module = _pair(loss={"kd": {"temperature": 1.0}})
    before = {n: [p.detach().clone() for p in module.networks[n].parameters()] for n in module.names}
    opt_ids: set[int] = set()

    class Check(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            opt_ids.update(id(p) for g in trainer.optimizers[0].param_groups for p in g["params"])

    trainer = fast_trainer(max_steps=2, callbacks=[Check()])
    trainer.fit(module, make_loader())
    assert opt_ids == {id(p) for p in module.parameters()}  # one optimizer holds every network
    for n in module.names:
        after = list(module.networks[n].parameters())
        assert all(not torch.equal(a, b) for a, b in zip(before[n], after)), f"network {n} did not train"
    metrics = trainer.callback_metrics
    assert {"train/a/ce", "train/a/kd", "train/b/ce", "train/b/kd", "train/a/agreement", "train/loss"} <= set(metrics)
    exported = module.export("b")
    assert exported is module.networks["b"]
    path = save_model_file(exported, tmp_path / "b.pt", {"model": "SmallCNN", "num_classes": 10})
    fresh = SmallCNN(seed=5)
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), exported.state_dict().values()))
    with pytest.raises(KeyError, match="no network named 'c'"):
        module.export("c")


def test_forward_in_training_mode_runs_every_network_for_batchnorm_passes() -> None:
    """A BatchNorm-recompute pass through ``module(x)`` (update_bn, averaging=wakd) must reach every network."""
    module = MutualDistillationModule({"a": tiny("test_resnet", seed=0), "b": tiny("test_resnet", seed=1)})
    x = _batch(n=4)[0]
    norms = {n: next(m for m in module.networks[n].modules() if isinstance(m, torch.nn.BatchNorm2d)) for n in "ab"}
    module.train()
    torch.testing.assert_close(module(x), module.networks["a"](x), msg="the primary's logits")
    for n in "ab":
        norms[n].reset_running_stats()
    with torch.no_grad():
        module(x)
    assert all(int(norms[n].num_batches_tracked) == 1 for n in "ab")
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x, "b"), module.networks["b"](x))
        module(x)
    assert int(norms["b"].num_batches_tracked) == 1  # eval mode: nothing updated, only the primary runs


# ------------------------------------------------------------------------------------------------------------- ECE
class Lookup(torch.nn.Module):
    """Returns preset logits for the sample whose index is the input (a [B, 1] float tensor)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def _ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Σ_b |B_b|/n · |acc(B_b) − conf(B_b)| over equal-width confidence bins, in plain Python."""
    conf, pred = probs.max(-1)
    n, total = len(labels), 0.0
    for b in range(bins):
        members = [i for i in range(n) if b / bins < conf[i].item() <= (b + 1) / bins]
        if members:
            acc = sum(float(pred[i] == labels[i]) for i in members) / len(members)
            avg = sum(conf[i].item() for i in members) / len(members)
            total += len(members) / n * abs(acc - avg)
    return total


def test_ece_logged_per_network_equals_an_independent_computation() -> None:
    g = torch.Generator().manual_seed(0)
    n, classes = 12, 4
    labels = torch.arange(n) % classes
    tables = {"a": torch.randn(n, classes, generator=g) * 2, "b": torch.randn(n, classes, generator=g) * 0.5}
    tables["a"][torch.arange(6), labels[:6]] += 3.0  # a confident and mostly right on the first half
    module = MutualDistillationModule({k: Lookup(v) for k, v in tables.items()}, num_classes=classes)
    loader = DataLoader(TensorDataset(torch.arange(n).float()[:, None], labels), batch_size=6)
    result = fast_trainer().validate(module, loader, verbose=False)[0]
    for name, table in tables.items():
        probs = table.softmax(-1)
        expected = _ece(probs, labels)
        per_batch = (_ece(probs[:6], labels[:6]) + _ece(probs[6:], labels[6:])) / 2
        assert abs(expected - per_batch) > 1e-3  # so a per-batch average would fail this test
        assert result[f"val/{name}/ece"] == pytest.approx(expected, abs=1e-5)
        acc = (probs.argmax(-1) == labels).float().mean().item()
        assert result[f"val/{name}/acc"] == pytest.approx(acc, abs=1e-6)
    agree = (tables["a"].argmax(-1) == tables["b"].argmax(-1)).float().mean().item()
    assert result["val/a/agreement/b"] == pytest.approx(agree, abs=1e-6)


# ------------------------------------------------------------------------------------------------ checkpoint / resume
def test_checkpoint_is_weights_only_and_resume_restores_every_network(tmp_path: Path) -> None:
    module = _pair(loss="bdkd", distill_weights={"a": 0.5})
    trainer = fast_trainer(max_steps=2)
    trainer.fit(module, make_loader())
    ckpt = tmp_path / "mutual.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["hyper_parameters"]["distill_weights"] == {"a": 0.5, "b": 1.0}
    assert any(k.startswith("model.a.") for k in state["state_dict"]) and any(
        k.startswith("model.b.") for k in state["state_dict"]
    )
    restored: dict[str, torch.Tensor] = {}

    class Capture(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            restored.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    fresh = MutualDistillationModule({"a": SmallCNN(seed=7), "b": SmallCNN(seed=8)}, loss="bdkd")
    resumed = fast_trainer(max_steps=3, max_epochs=5, callbacks=[Capture()])
    resumed.fit(fresh, make_loader(), ckpt_path=ckpt)
    assert resumed.global_step == 3
    assert restored.keys() == state["state_dict"].keys()
    assert all(torch.equal(restored[k], v) for k, v in state["state_dict"].items())


# -------------------------------------------------------------------------------------------------------- bad input
def test_bad_arguments_are_refused_with_the_fix() -> None:
    net = SmallCNN()
    with pytest.raises(ValueError, match="at least two networks"):
        MutualDistillationModule({"a": net})
    with pytest.raises(ValueError, match="same object"):
        MutualDistillationModule({"a": net, "b": net})
    with pytest.raises(ValueError, match="without '.'"):
        MutualDistillationModule({"a.b": net, "c": SmallCNN()})
    with pytest.raises(ValueError, match=r"distill_weights names \['c'\]"):
        _pair(distill_weights={"c": 1.0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        _pair(distill_weights={"a": -1.0})
    with pytest.raises(ValueError, match="reads layer taps"):
        _pair(loss="rkd")
    with pytest.raises(ValueError, match=r"peer_loss names \['z'\]"):
        _pair(peer_loss={"z": "kd"})
    with pytest.raises(ClassCountMismatchError, match="different numbers of classes"):
        fast_trainer(max_steps=1).fit(
            MutualDistillationModule({"a": GapNet(classes=5), "b": SmallCNN()}), make_loader()
        )


# ------------------------------------------------------------------------------------------------------- Hydra app
TINY = [
    *TINY_APP,
    "model=test_resnet",  # timm's tiny test network: the app's code paths at a fraction of resnet18's cost
    "teacher=test_resnet",
]


def test_strategy_configs_compose() -> None:
    cfg = compose(["strategy=ctcd", "model=resnet18", "teacher=resnet34"])
    assert cfg.strategy.name == "mutual" and cfg.strategy.export == "small"
    assert (cfg.strategy.peers.large.name, cfg.strategy.peers.small.name) == ("resnet34", "resnet18")
    assert dict(cfg.strategy.distill_weights) == {"large": 1.0, "small": 1.0}
    dml = compose(["strategy=mutual", "model=resnet18"])
    assert [p.name for p in dml.strategy.peers.values()] == ["resnet18", "resnet18"]
    assert dml.strategy.loss.terms.kd.temperature == 1.0


def test_app_refuses_stages_and_the_teacher_cache(tmp_path: Path) -> None:
    cfg = compose(["strategy=mutual", "stage=teacher", *TINY])
    with pytest.raises(ValueError, match="stage=teacher does not apply"):
        run_app(cfg, None, tmp_path)
    with open_dict(cfg):
        cfg.stage = "all"
        cfg.teacher_cache = {"_target_": "builtins.dict"}
    with pytest.raises(ValueError, match="drop teacher_cache="):
        run_app(cfg, None, tmp_path)


@pytest.mark.parametrize("strategy", ["mutual", "bdkd"])
def test_app_run_writes_results_and_the_exported_network(strategy: str, tmp_path, monkeypatch) -> None:
    from lightning_kd.run import train

    monkeypatch.chdir(tmp_path)
    res = train(compose([f"strategy={strategy}", *TINY]))
    names = ["student", "peer"] if strategy == "mutual" else ["student", "teacher"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["student_acc"] == res["student_acc"] == res["acc/student"]
    assert res["teacher_acc"] == res[f"acc/{names[1]}"]
    for n in names:
        assert 0 <= res[f"acc/{n}"] <= 1 and 0 <= res[f"ece/{n}"] <= 1 and math.isfinite(res[f"ece/{n}"])
    assert [r[0] for r in res["rows"]] == [f"network {n}: {m}" for n in names for m in ("accuracy", "ECE")]
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    term = "kd" if strategy == "mutual" else "bdkd"
    assert {f"train/{n}/{term}" for n in names} | {f"test/{n}/ece" for n in names} <= set(header)
    # the exported file is the trained student of the final checkpoint
    model, meta = load_model_file(tmp_path / "student.pt")
    assert meta["network"] == "student"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt[f"model.student.{k}"]), k
