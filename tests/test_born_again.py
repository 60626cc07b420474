"""Born-again generations (:mod:`lightning_kd.strategies.born_again`), CPU, tiny models, 2 steps per generation:
generation k's teacher is generation k−1's saved file, every generation starts from a fresh initialisation, the files
load with ``weights_only=True``, the BAN ensemble is the mean of the saved models' softmax outputs, a rerun reuses the
finished generations, and one in-process run of the Hydra app (``strategy=born_again``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_APP, SmallCNN, fast_trainer, make_loader
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch import nn

from lightning_kd.callback import DistillCallback
from lightning_kd.models import load_model_file, save_model_file
from lightning_kd.strategies.born_again import (
    BornAgain,
    objective_loss,
    predict_probabilities,
    run_app,
)

SIZE, CLASSES = 8, 10


class Data(L.LightningDataModule):
    """32 training and 24 test samples of learnable synthetic images, ``(x, y, index)`` batches."""

    def train_dataloader(self):
        return make_loader(n=32, size=SIZE, batch=16, seed=0)

    def test_dataloader(self):
        return make_loader(n=24, size=SIZE, batch=8, seed=0)


def net() -> nn.Module:
    """A tiny CNN that draws its initial weights from the global RNG (as timm models do)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES)
    )


class Spy(Callback):
    """Records the network's weights at the start and at the end of a generation's fit."""

    def __init__(self, generation: int, record: dict) -> None:
        self.generation, self.record = generation, record

    def on_fit_start(self, trainer, pl_module) -> None:
        self.record.setdefault("start", {})[self.generation] = _state(pl_module.model)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.record.setdefault("end", {})[self.generation] = _state(pl_module.model)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def chain(out_dir: Path, log: dict, generations: int = 2, **kwargs) -> BornAgain:
    """A BornAgain over :func:`net` whose Trainer factory records every generation's callbacks in ``log``."""

    def make_trainer(k: int, callbacks: list) -> L.Trainer:
        log.setdefault("trained", []).append(k)
        log.setdefault("callbacks", {})[k] = callbacks
        return fast_trainer(max_steps=2, callbacks=callbacks)

    kwargs.setdefault("callbacks", lambda k: [Spy(k, log)])
    return BornAgain(net, out_dir, generations, make_trainer=make_trainer, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ban") / "chain"
    log: dict = {}
    ban = chain(out, log, metadata={"arch": "net"})
    result = ban.fit(Data())
    return ban, result, log


# ----------------------------------------------------------------------------------------------------- the generations
def test_each_teacher_is_the_previous_generations_checkpoint(trained) -> None:
    ban, _result, log = trained
    assert log["trained"] == [0, 1, 2]
    assert not any(isinstance(c, DistillCallback) for c in log["callbacks"][0])  # generation 0: labels only
    for k in (1, 2):
        (distill,) = [c for c in log["callbacks"][k] if isinstance(c, DistillCallback)]
        teacher = distill.engine.teacher
        saved = torch.load(ban.path(k - 1), map_location="cpu", weights_only=True)["state_dict"]
        assert _equal(_state(teacher), saved)  # the teacher the callback used is the file ...
        assert _equal(saved, log["end"][k - 1])  # ... which holds generation k-1 as it finished training
        assert not any(p.requires_grad for p in teacher.parameters())
        assert distill.task_weight == 0.0 and list(distill.engine.terms) == ["kd"]
        assert distill.engine.terms["kd"].temperature == 1.0  # the paper's BAN: plain softmax outputs


def test_each_generation_is_freshly_initialised(trained) -> None:
    ban, result, log = trained
    for k in (1, 2):
        start = log["start"][k]
        assert not _equal(start, log["end"][k - 1])  # differs from its teacher at start
        assert not _equal(start, log["start"][k - 1])  # and from the previous generation's initialisation
        assert not _equal(start, log["end"][k])  # and it trained
    hashes = [g["init_sha256"] for g in json.loads(ban.record_path.read_text())["generations"]]
    assert len(set(hashes)) == 3
    assert [g.seed for g in result.generations] == [0, 1, 2]


def test_checkpoints_exist_and_load_with_weights_only(trained) -> None:
    ban, result, log = trained
    data = Data()
    assert result.checkpoints == [ban.out_dir / f"gen{k}.pt" for k in range(3)]
    for k, path in enumerate(result.checkpoints):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = payload["lightning_kd"]
        assert meta["generation"] == k and meta["arch"] == "net" and meta["test_acc"] == result.generation_acc[k]
        assert meta["teacher"] == (f"gen{k - 1}.pt" if k else None)
        model = ban.load(k)
        assert _equal(_state(model), log["end"][k])
        probs, y = predict_probabilities(model, data.test_dataloader())
        assert (probs.argmax(-1) == y).float().mean().item() == pytest.approx(result.generation_acc[k])


def test_result_and_record(trained) -> None:
    ban, result, _log = trained
    assert result.teacher_acc == result.generation_acc[0] and result.student_acc == result.generation_acc[2]
    assert result.ensemble_members == [1, 2]  # the paper's BANE: the born-again students
    assert not any(g.reused for g in result.generations)
    record = json.loads(ban.record_path.read_text())
    assert [g["acc"] for g in record["generations"]] == result.generation_acc
    assert [g["checkpoint"] for g in record["generations"]] == ["gen0.pt", "gen1.pt", "gen2.pt"]
    assert record["ensemble"] == {"members": [1, 2], "acc": result.ensemble_acc, "agreement": result.agreement}
    assert not list(ban.out_dir.glob("*.tmp"))


def test_ensemble_is_the_mean_of_the_saved_models_softmax(trained) -> None:
    ban, result, _log = trained
    loader = Data().test_dataloader()
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    probs = {}
    for k in range(3):
        model = net()
        model.load_state_dict(torch.load(ban.path(k), weights_only=True)["state_dict"])
        probs[k] = F.softmax(model.eval()(x), -1)
    mean = (probs[1] + probs[2]) / 2
    assert result.ensemble_acc == pytest.approx((mean.argmax(-1) == y).float().mean().item())
    agreement = (probs[2].argmax(-1) == probs[1].argmax(-1)).float().mean().item()
    assert result.agreement == pytest.approx(agreement)


def test_ensemble_averages_probabilities_of_the_chosen_members(tmp_path: Path) -> None:
    # crafted generations: linear models on one-hot inputs, so sample i's logits are column i of the weight; all
    # labels are 0. P(class 1) per sample: gen0 [.9 .1 .9 .9], gen1 [.6 .6 .3 .3], gen2 [.3 .45 .6 .6]
    # -> accuracies .25 / .5 / .5; mean of gens 1-2 [.45 .525 .45 .45] -> .75; mean of gens 0-2 -> .25
    p1 = {0: [0.9, 0.1, 0.9, 0.9], 1: [0.6, 0.6, 0.3, 0.3], 2: [0.3, 0.45, 0.6, 0.6]}

    def linear() -> nn.Module:
        return nn.Linear(4, 2, bias=False)

    for k, p in p1.items():
        model = linear()
        with torch.no_grad():
            model.weight.zero_()
            model.weight[1] = torch.tensor(p).logit()
        save_model_file(model, tmp_path / f"gen{k}.pt", {})
    loader = [(torch.eye(4), torch.zeros(4, dtype=torch.long))]
    ban = BornAgain(linear, tmp_path, 2)
    assert ban.evaluate_ensemble(loader) == (pytest.approx(0.75), 0.0)
    assert ban.evaluate_ensemble(loader, members=[0, 1, 2])[0] == pytest.approx(0.25)
    assert BornAgain(linear, tmp_path, 2, ensemble_teacher=True).evaluate_ensemble(loader)[0] == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------------------- resume
def test_rerun_reuses_finished_generations_and_resumes_the_rest(trained, tmp_path: Path) -> None:
    ban, result, _ = trained
    out = tmp_path / "copy"
    shutil.copytree(ban.out_dir, out)  # the record holds file names, not absolute paths: the directory can move
    log: dict = {}
    again = chain(out, log, metadata={"arch": "net"}).fit(Data())
    assert "trained" not in log  # nothing retrained
    assert [g.reused for g in again.generations] == [True, True, True]
    assert again.generation_acc == result.generation_acc and again.ensemble_acc == result.ensemble_acc

    # a crash during generation 2: its file may exist but generations.json does not list it -> only it is retrained,
    # from generation 1's file
    record = json.loads((out / "generations.json").read_text())
    record["generations"] = record["generations"][:2]
    (out / "generations.json").write_text(json.dumps(record))
    gen1 = torch.load(out / "gen1.pt", weights_only=True)["state_dict"]
    resumed = chain(out, log, metadata={"arch": "net"}).fit(Data())
    assert log["trained"] == [2]
    assert [g.reused for g in resumed.generations] == [True, True, False]
    (distill,) = [c for c in log["callbacks"][2] if isinstance(c, DistillCallback)]
    assert _equal(_state(distill.engine.teacher), gen1)
    assert resumed.generation_acc[:2] == result.generation_acc[:2]

    # more generations extend a finished chain
    log.clear()
    longer = chain(out, log, generations=3, metadata={"arch": "net"}).fit(Data())
    assert log["trained"] == [3] and longer.ensemble_members == [1, 2, 3]


def test_a_directory_of_another_plan_is_refused(trained, tmp_path: Path) -> None:
    ban, _, _ = trained
    shutil.copytree(ban.out_dir, tmp_path / "copy")
    with pytest.raises(ValueError, match=r"another plan \(differs in: loss\)"):
        chain(tmp_path / "copy", {}, loss="dkpp", metadata={"arch": "net"}).fit(Data())


# ------------------------------------------------------------------------------------------------------------- errors
def test_a_factory_that_seeds_itself_is_reported(tmp_path: Path) -> None:
    def seeded() -> nn.Module:
        return SmallCNN(classes=CLASSES, seed=0)  # calls torch.manual_seed(0): the same start every generation

    def make_trainer(k, callbacks):
        return fast_trainer(max_steps=1, callbacks=callbacks)

    ban = BornAgain(seeded, tmp_path, 1, make_trainer=make_trainer, ensemble=False)
    with pytest.warns(UserWarning, match=r"generation 1 starts from the same weights as generation\(s\) \[0\]"):
        result = ban.fit(Data())
    assert result.ensemble_acc is None and result.agreement is None and result.ensemble_members == []


def test_make_trainer_must_pass_the_callbacks_on(tmp_path: Path) -> None:
    ban = BornAgain(net, tmp_path, 1, make_trainer=lambda k, cbs: fast_trainer(), callbacks=lambda k: [Callback()])
    with pytest.raises(ValueError, match=r"make_trainer\(0, callbacks\) returned a Trainer without the callbacks"):
        ban.fit(Data())


def test_trainer_arguments_as_a_dict(tmp_path: Path) -> None:
    kwargs = {"max_steps": 1, "accelerator": "cpu", "logger": False, "enable_progress_bar": False}
    result = BornAgain(net, tmp_path, 1, make_trainer=kwargs, loss="cwtm").fit(Data())
    assert len(result.generations) == 2 and (tmp_path / "gen1").is_dir()  # default_root_dir = <out_dir>/gen<k>


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"generations": 0}, ValueError, "generations must be an integer >= 1"),
        ({"task_weight": -1.0}, ValueError, "born_again: task_weight must be a finite number >= 0"),
        ({"loss": "no_such_loss"}, KeyError, "unknown loss 'no_such_loss'"),
        ({"loss": []}, ValueError, "at least one distillation term"),
        ({"metadata": {"x": object()}}, TypeError, "metadata must be JSON-able"),
        ({"make_trainer": {"callbacks": []}}, ValueError, "callbacks=lambda generation"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        BornAgain(net, tmp_path, **{"generations": 2, **kwargs})


# ------------------------------------------------------------------------------------------------------ the Hydra app
def test_objectives_of_the_strategy_yaml() -> None:
    from lightning_kd.config import compose

    cfg = compose(["strategy=born_again", "loss=dkd"])
    assert cfg.strategy.generations == 3 and cfg.strategy.objective == "kd" and cfg.strategy.ensemble
    assert objective_loss(cfg.strategy, cfg.loss) == ({"kd": {"temperature": 1.0}}, 0.0)
    for objective, spec in [("cwtm", {"cwtm": {}}), ("dkpp", {"dkpp": {"temperature": 1.0, "seed": 3}})]:
        cfg.strategy.objective = objective
        assert objective_loss(cfg.strategy, cfg.loss, seed=3) == (spec, 0.0)
    cfg.strategy.objective = "loss"  # the terms and task weight of loss=
    spec, task_weight = objective_loss(cfg.strategy, cfg.loss)
    assert list(spec) == ["dkd"] and task_weight == cfg.loss.task_weight == 1.0
    cfg.strategy.task_weight = 0.5
    assert objective_loss(cfg.strategy, cfg.loss)[1] == 0.5
    cfg.strategy.objective = "bogus"
    with pytest.raises(ValueError, match="strategy.objective must be one of kd, cwtm, dkpp, loss"):
        objective_loss(cfg.strategy, cfg.loss)
    for key, value, match in [
        ("stage", "student", "use stage=all"),
        ("ckpt_path", "last.ckpt", "resumes by generation"),
        ("model.pretrained", True, "fresh random initialisation"),
    ]:
        bad = cfg.copy()
        OmegaConf.update(bad, key, value)
        with pytest.raises(ValueError, match=match):
            run_app(bad, None, Path("unused"))  # refused before anything is built or trained


def test_app_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_kd.config import compose
    from lightning_kd.run import train

    monkeypatch.chdir(tmp_path)
    cfg = compose(
        [
            "strategy=born_again",
            "strategy.generations=2",
            "strategy.objective=dkpp",
            "model=test_resnet",
            *TINY_APP,
        ]
    )
    res = train(cfg)
    assert res["strategy"] == "born_again" and res["loss"] == "dkpp" and res["objective"] == "dkpp"
    assert len(res["generation_acc"]) == 3 and res["ensemble_members"] == [1, 2]
    assert res["teacher_acc"] == res["generation_acc"][0] and res["student_acc"] == res["generation_acc"][2]
    assert [row[0] for row in res["rows"]] == [
        "generation 0 accuracy",
        "generation 1 accuracy",
        "generation 2 accuracy",
        "BAN ensemble accuracy (generations 1,2)",
    ]
    assert 0 <= res["ensemble_acc"] <= 1 and 0 <= res["agreement"] <= 1
    assert json.loads((tmp_path / "results.json").read_text())["generation_acc"] == res["generation_acc"]
    for k in range(3):
        path = tmp_path / "generations" / f"gen{k}.pt"
        assert res["checkpoints"][k] == str(path)
        _model, meta = load_model_file(path)  # a timm model: loadable by name from its metadata
        assert meta["model"] == "test_resnet" and meta["num_classes"] == 10 and meta["generation"] == k
    header = lambda k: (tmp_path / f"gen{k}" / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/dkpp" not in header(0) and "train/ce" in header(0)
    assert "train/dkpp" in header(1) and "train/dkpp" in header(2)
    assert res["logs"] == str(tmp_path / "gen2" / "logs" / "metrics.csv")

    again = train(cfg)  # the same run directory: every generation is reused, nothing is trained
    assert again["reused_generations"] == [0, 1, 2] and again["generation_acc"] == res["generation_acc"]
    assert again["rows"][0][0] == "generation 0 accuracy (reused)" and again["ensemble_acc"] == res["ensemble_acc"]
