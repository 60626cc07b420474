"""DistillCallback under DDP: 2 CPU processes (gloo) forked by Lightning's ``ddp_fork`` strategy.

Each rank records what it sees during the fit (a callback after the DistillCallback) and writes it to a file; the test
checks, in the parent process: the teacher is never part of the DDP-wrapped module nor of the optimizer; the terms'
trainable parts (fitnet connector, CRD heads) exist before the wrap, are in the DDP module and in the optimizer, and
move; all parameters and buffers are identical on both ranks after the steps (gradients of the connectors are
all-reduced); CRD's memory banks hold both ranks' samples on every rank (the update all-gathers).
"""

from __future__ import annotations

import importlib
import multiprocessing
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import SmallCNN, UserModule, make_loader
from lightning.pytorch.callbacks import Callback
from torch import distributed as dist

from lightning_kd import DistillCallback

FITNET = {"fitnet": {"student_layers": "net.features.2", "teacher_layers": "features.2"}}
LOSS = ["kd", FITNET, {"crd": {"nce_k": 4, "feat_dim": 8}}]
N, BATCH, STEPS, WORLD = 32, 4, 4, 2  # each rank: 16 samples in 4 batches, so the 4 steps see every sample once


def _ids(params) -> set[int]:
    return {id(p) for p in params}


class Recorder(Callback):
    """Runs on every rank; writes ``rank<r>.pt`` with what the test asserts on."""

    def __init__(self, out: Path, distill: DistillCallback) -> None:
        self.out = out
        self.distill = distill
        self.facts: dict = {}
        self.seen: list[int] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after strategy.setup: the model is wrapped and the optimizers exist
        engine = self.distill.engine
        assert engine is not None
        wrapped = trainer.strategy.model
        teacher = engine.teacher
        wrapped_ids = _ids(wrapped.parameters())
        opt_ids = _ids(p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"])
        trainable = [p for p in engine.parameters() if p.requires_grad]
        connector = engine.terms["fitnet"].connector
        self.facts.update(
            rank=trainer.global_rank,
            world=trainer.world_size,
            is_ddp=isinstance(wrapped, torch.nn.parallel.DistributedDataParallel),
            teacher_params_in_ddp=bool(_ids(teacher.parameters()) & wrapped_ids),
            teacher_module_in_ddp=any(m is teacher for m in wrapped.modules()),
            teacher_params_in_optimizer=bool(_ids(teacher.parameters()) & opt_ids),
            teacher_trainable=any(p.requires_grad for p in teacher.parameters()),
            teacher_on_rank_device=all(p.device == pl_module.device for p in teacher.parameters()),
            n_trainable_term_params=len(trainable),
            term_params_in_ddp=_ids(trainable) <= wrapped_ids,
            term_params_in_optimizer=_ids(trainable) <= opt_ids,
            connector_start=torch.cat([p.detach().flatten().clone() for p in connector.parameters()]),
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.extend(int(i) for i in batch[2])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self.distill.engine
        assert engine is not None
        memory = engine.terms["crd"].memory
        connector = engine.terms["fitnet"].connector
        state = pl_module.state_dict()  # student + _lkd_engine.* (params and buffers: banks, labels, Z, counters)
        flat = torch.cat([v.detach().double().flatten() for v in state.values()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        self.facts.update(
            state_keys=sorted(state),
            all_ranks_state=torch.stack(gathered),
            connector_end=torch.cat([p.detach().flatten().clone() for p in connector.parameters()]),
            labels=memory.labels.clone(),
            seen=self.seen,
            steps=trainer.global_step,
        )
        torch.save(self.facts, self.out / f"rank{trainer.global_rank}.pt")


def _fork_available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods() and dist.is_available() and dist.is_gloo_available()


@pytest.mark.slow
@pytest.mark.skipif(not _fork_available(), reason="needs the 'fork' start method and torch.distributed with gloo")
def test_two_process_ddp_fit(tmp_path: Path) -> None:
    L.seed_everything(0)
    distill = DistillCallback(teacher=SmallCNN(seed=1), loss=LOSS)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp_fork",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[distill, Recorder(tmp_path, distill)],
    )
    trainer.fit(UserModule(SmallCNN(seed=0)), make_loader(n=N, batch=BATCH))

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, facts in enumerate(ranks):
        assert facts["rank"] == r and facts["world"] == WORLD and facts["is_ddp"]
        assert facts["steps"] == STEPS
        # the teacher: frozen, on the rank's device, never wrapped, never optimised
        assert not facts["teacher_params_in_ddp"] and not facts["teacher_module_in_ddp"]
        assert not facts["teacher_params_in_optimizer"] and not facts["teacher_trainable"]
        assert facts["teacher_on_rank_device"]
        # connector + CRD heads: built before the wrap, so in the DDP module and in the optimizer
        assert facts["n_trainable_term_params"] == 6  # fitnet conv (w, b) + crd embed_s, embed_t (w, b)
        assert facts["term_params_in_ddp"] and facts["term_params_in_optimizer"]
        assert not torch.equal(facts["connector_end"], facts["connector_start"]), "the connector did not train"
        assert any(k.startswith("_lkd_engine.terms.crd.memory.") for k in facts["state_keys"])
        # every rank sees the full set of parameters and buffers, identical across ranks
        states = facts["all_ranks_state"]
        assert states.shape[0] == WORLD
        torch.testing.assert_close(states[1], states[0], rtol=0, atol=0)

    # the ranks trained on disjoint halves of the data ...
    seen0, seen1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert not seen0 & seen1 and seen0 | seen1 == set(range(N))
    # ... yet each rank's CRD banks know the labels of every sample: the update gathers all ranks' samples
    for facts in ranks:
        assert bool((facts["labels"] >= 0).all()), facts["labels"]
        torch.testing.assert_close(facts["labels"], torch.arange(N) % 10)


@pytest.mark.parametrize(
    ("module", "gathers"),
    [("rkd", "not gathered"), ("sinkd", "nothing is gathered"), ("crd", "all-gathered")],
)
def test_batch_statistics_terms_document_ddp(module: str, gathers: str) -> None:
    """Terms whose statistics span the batch say in their docs whether they gather across ranks."""
    doc = importlib.import_module(f"lightning_kd.losses.{module}").__doc__ or ""
    assert "Under DDP" in doc
    assert gathers in " ".join(doc.split())
