"""The loss-term protocol serves the methods that follow, through both faces of the engine:
a pass of the teacher over the training data before fitting (class means, as ND/KD++ needs), dataset indices
(memory banks, output caches), state across steps driven by the global step (schedules), and the teacher's
classifier weights (SimKD, CAT-KD)."""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import fast_trainer, make_loader, tiny
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import DistillationModule, DistillCallback
from lightning_kd.config import CONF_DIR
from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, TeacherPass
from lightning_kd.taps import TapSpec, find_classifier

N, CLASSES = 32, 10


class ProtocolProbe(LossTerm):
    """A toy term that uses every part of the protocol and records what it saw."""

    needs_prepare = True

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.tap = TapSpec.parse("embedding")
        self.student_taps = [self.tap]
        self.teacher_taps = [self.tap]
        self.register_buffer("class_means", torch.zeros(0))
        self.register_buffer("seen", torch.zeros(N, dtype=torch.long))  # a per-sample memory, indexed by dataset index
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.prepared_samples = 0
        self.step_log: list[int] = []

    def setup(self, ctx: SetupContext) -> None:
        width = ctx.teacher[self.tap].shape[1]
        head = ctx.teacher_model.get_submodule(find_classifier(ctx.teacher_model))
        self.register_buffer("teacher_head", head.weight.detach().clone(), persistent=False)
        self.register_buffer("teacher_bias", head.bias.detach().clone(), persistent=False)
        self.connector = torch.nn.Linear(ctx.student[self.tap].shape[1], width)
        self.class_means = torch.zeros(ctx.num_classes, width)

    def prepare(self, passes: Iterable[TeacherPass]) -> None:
        sums, counts = torch.zeros_like(self.class_means), torch.zeros(len(self.class_means))
        for p in passes:
            emb = p.teacher[self.tap]
            sums.index_add_(0, p.targets, emb)
            counts += torch.bincount(p.targets, minlength=len(counts))
            self.prepared_samples += len(p.targets)
        self.class_means = sums / counts.clamp(min=1).unsqueeze(1)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        assert batch.indices is not None
        self.seen[batch.indices] += 1
        self.steps += 1
        self.step_log.append(batch.step)
        # the teacher's classifier applied to the teacher embedding gives the teacher's logits
        torch.testing.assert_close(
            batch.teacher[self.tap] @ self.teacher_head.t() + self.teacher_bias,
            batch.teacher.logits,
            rtol=1e-4,
            atol=1e-4,
        )
        target_means = self.class_means[batch.targets]
        return 1 - F.cosine_similarity(self.connector(batch.student[self.tap]), target_means).mean()


def _check(term: ProtocolProbe, epochs: int, batches_per_epoch: int) -> None:
    assert term.prepared_samples == N  # one pass over the training set, before fitting
    assert term.class_means.abs().sum() > 0
    assert torch.all(term.seen == epochs)  # every dataset index seen once per epoch
    assert term.step_log == list(range(epochs * batches_per_epoch))  # global step drives schedules
    assert int(term.steps) == epochs * batches_per_epoch


def test_protocol_through_the_module(tmp_path) -> None:
    term = ProtocolProbe()
    module = DistillationModule(tiny(), tiny(seed=1), loss={"probe": term})
    trainer = fast_trainer(
        max_epochs=2, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last")]
    )
    trainer.fit(module, make_loader(n=N))
    _check(term, epochs=2, batches_per_epoch=N // 8)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(state["engine.terms.probe.seen"], term.seen)  # state across steps is checkpointed
    assert "engine.terms.probe.class_means" in state and "engine.terms.probe.connector.weight" in state
    assert "engine.terms.probe.teacher_head" not in state  # a non-persistent copy, not the teacher


def test_protocol_through_the_callback() -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    term = ProtocolProbe()
    fast_trainer(max_epochs=2, callbacks=[DistillCallback(tiny(seed=1), loss={"probe": term})]).fit(
        Plain(), make_loader(n=N)
    )
    _check(term, epochs=2, batches_per_epoch=N // 8)


@pytest.mark.parametrize("loss", sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml")))
def test_every_loss_yaml_lists_every_argument(loss: str) -> None:
    import inspect

    from lightning_kd.config import compose
    from lightning_kd.losses import get_loss_class

    cfg = compose([f"loss={loss}"])
    assert "task_weight" in cfg.loss and cfg.loss.terms
    for name, kwargs in cfg.loss.terms.items():
        cls = get_loss_class(kwargs.get("name", name))
        params = {p for p in inspect.signature(cls.__init__).parameters if p != "self"}
        assert set(kwargs) - {"name"} == params, f"conf/loss/{loss}.yaml term {name!r}"
