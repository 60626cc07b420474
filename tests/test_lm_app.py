"""The Hydra app for language models, ``python -m lightning_kd.run task=lm``: composition (the task's choices, and
command-line choices winning over them), refusals (image losses, other strategies, image-only groups, timm names),
the pieces of :mod:`lightning_kd.lm.app` (perplexity, teacher store, special-token ids), and one end-to-end run in a
subprocess followed by a second that reuses the stored teacher."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fast_trainer
from lightning.pytorch.callbacks import Callback
from lm_helpers import tiny_lm, tiny_tokenizer, token_loader
from omegaconf import OmegaConf
from torch import nn

from lightning_kd.callback import DistillCallback
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.lm.app import LMTeacherStore, build_lm, evaluate_lm, use_tokenizer_ids
from lightning_kd.lm.models import vocab_size_of
from lightning_kd.lm.module import CausalLMModule, LMDistillationModule
from lightning_kd.run import task_runner


# --------------------------------------------------------------------------------------------------------------------
# Composition and refusals (no training)
# --------------------------------------------------------------------------------------------------------------------
def test_task_lm_defaults_and_command_line_choices_win() -> None:
    cfg = compose(["task=lm"])
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.teacher, choices.data, choices.loss) == ("lm_tiny", "lm_small", "text", "fkl")
    assert cfg.task == "lm" and cfg.baseline is True and cfg.scheduler == "cosine"
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and "momentum" not in cfg.optimizer
    assert cfg.data._target_ == "lightning_kd.lm.data.TextDataModule" and cfg.data.paths is None
    assert cfg.model.kwargs.n_layer < cfg.teacher.kwargs.n_layer  # the student is the smaller model
    # choices and values given on the command line win over the task's overrides
    cfg = compose(["task=lm", "loss=jsd", "model=lm_small", "teacher=lm_tiny", "optimizer.lr=0.01", "baseline=false"])
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.teacher, choices.loss) == ("lm_small", "lm_tiny", "jsd")
    assert list(build_terms(cfg.loss.terms)) == ["jsd"] and cfg.loss.task == "lm"
    assert cfg.loss == OmegaConf.load(CONF_DIR / "loss" / "jsd.yaml")  # the YAML, as test_lm_loss_configs reads it
    assert cfg.optimizer.lr == 0.01 and cfg.baseline is False


def test_image_task_is_unchanged_by_the_task_group() -> None:
    cfg = compose()
    assert cfg.task == "classification" and cfg.hydra.runtime.choices.task == "classification"
    assert OmegaConf.to_container(cfg.optimizer) == {
        "_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4,
        "nesterov": True,
    }  # fmt: skip
    # an image loss passes the image task's check; the same config with task=lm is refused, naming the LM losses
    task_runner(cfg)
    lm = cfg.copy()
    lm.task = "lm"
    with pytest.raises(ValueError, match=r"loss=kd is a classification loss .* task=lm losses \(.*fkl"):
        task_runner(lm)


def _lm_cfg(**changes):
    cfg = compose(["task=lm"])
    OmegaConf.set_struct(cfg, False)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_task_lm_refuses_other_strategies_image_groups_and_timm_names() -> None:
    cfg = _lm_cfg(**{"strategy.name": "mutual"})
    with pytest.raises(ValueError, match=r"strategy=mutual is not available with task=lm"):
        task_runner(cfg)
    cfg.strategy.name = "distill"
    cfg.augment = {"_target_": "x"}
    with pytest.raises(ValueError, match=r"augment= applies to images"):
        task_runner(cfg)
    cfg.augment = None
    task_runner(cfg)  # accepted
    node = OmegaConf.create({"name": "resnet18", "pretrained": False, "checkpoint": None, "kwargs": {}})
    with pytest.raises(ValueError, match=r"unknown language model 'resnet18'.*model=lm_tiny"):
        build_lm(node, 300)


# --------------------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------------------
class UniformLM(nn.Module):
    """Logits 0 everywhere: every next token has probability 1/V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))  # evaluate_lm reads the device from a parameter

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab) + 0 * self.anchor


class Loaders:
    def __init__(self, vocab: int) -> None:
        self.loader = token_loader(n_batches=2, vocab_size=vocab)

    def test_dataloader(self):
        return self.loader

    val_dataloader = test_dataloader


def test_evaluate_lm_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    vocab = 50
    scores = evaluate_lm(UniformLM(vocab), Loaders(vocab), teacher=UniformLM(vocab))
    assert scores["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert scores["ppl"] == pytest.approx(vocab, rel=1e-5)
    assert scores["agreement"] == 1.0  # identical predictions (argmax ties break alike)
    # a GPT-2: the mean over label tokens of -log q(label[t+1] | logit at t), computed here by hand
    model = tiny_lm(vocab).eval()
    nll, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in Loaders(vocab).val_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for b, t in (batch["labels"][:, 1:] != -100).nonzero().tolist():
                label = int(batch["labels"][b, t + 1])
                nll -= float(logits[b, t].log_softmax(-1)[label])
                correct += int(logits[b, t].argmax()) == label
                count += 1
    scores = evaluate_lm(model, Loaders(vocab), "val")
    assert scores["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert scores["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert scores["acc"] == pytest.approx(correct / count)


def test_lm_teacher_store_round_trip_flat_names_and_corrupt_files(tmp_path: Path) -> None:
    store = LMTeacherStore(tmp_path)
    model = tiny_lm(60, seed=3)
    key = {"seed": 0, "epochs": 1}
    assert store.load("org/model", key) is None
    path = store.save(model, "org/model", key, {"vocab_size": 60})
    assert path.parent == tmp_path / "teachers" and path.name.startswith("org_model-")  # a hub name, flattened
    loaded, meta = store.load("org/model", key)
    ids = torch.randint(0, 60, (2, 7))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert meta["name"] == "org/model" and json.loads(meta["key"]) == key
    assert store.load("org/model", {"seed": 1, "epochs": 1}) is None  # another key: not reused
    path.write_bytes(b"not a checkpoint")
    assert store.load("org/model", key) is None  # corrupt: retrained and replaced


def test_use_tokenizer_ids_fits_the_special_tokens_into_the_vocabulary() -> None:
    tokenizer = tiny_tokenizer(300)
    model = tiny_lm(len(tokenizer))
    assert model.generation_config.eos_token_id >= vocab_size_of(model)  # GPT-2's 50256: outside a small vocabulary
    use_tokenizer_ids(model, tokenizer)
    for config in (model.config, model.generation_config):
        assert config.eos_token_id == tokenizer.eos_token_id and config.pad_token_id == tokenizer.pad_token_id
        assert config.bos_token_id == tokenizer.bos_token_id


class FirstLoss(Callback):
    """Records the loss of the first training step (what training_step returned, after any callback's wrap)."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.loss is None:
            self.loss = outputs["loss"].detach()


def test_app_distillation_path_equals_lm_distillation_module() -> None:
    """What run_lm trains (a plain causal-LM module + DistillCallback) gives the loss LMDistillationModule gives:
    ``task_weight · CE + fkl`` on the same batch, models and weights."""
    vocab, terms = 64, {"fkl": {"temperature": 2.0}}
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    losses = []
    for use_callback in (True, False):
        student, teacher = tiny_lm(vocab, seed=0, **no_dropout), tiny_lm(vocab, n_layer=2, seed=1)
        record = FirstLoss()
        if use_callback:
            module = CausalLMModule(student)
            callbacks = [DistillCallback(teacher, loss=terms, task_weight=0.5), record]
        else:
            module, callbacks = LMDistillationModule(student, teacher, loss=terms, task_weight=0.5), [record]
        fast_trainer(max_steps=1, callbacks=callbacks, num_sanity_val_steps=0).fit(
            module, token_loader(n_batches=1, vocab_size=vocab)
        )
        losses.append(record.loss)
    torch.testing.assert_close(losses[0], losses[1])
    assert losses[0] > 0


# --------------------------------------------------------------------------------------------------------------------
# End to end (subprocess)
# --------------------------------------------------------------------------------------------------------------------
TINY_LM_APP = [
    "task=lm",
    "data.max_segments=40",
    "data.segment_chars=160",
    "data.max_length=48",
    "data.batch_size=8",
    "data.tokenizer.vocab_size=300",
    "model.kwargs.n_layer=1",
    "model.kwargs.n_embd=32",
    "teacher.kwargs.n_layer=2",
    "teacher.kwargs.n_embd=32",
    "trainer.max_epochs=1",
    "teacher_epochs=1",
    "progress_bar=none",
]


def run_app(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_kd.run", *overrides],
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_task_lm_end_to_end_then_reuses_the_stored_teacher(tmp_path: Path) -> None:
    cache = f"cache_dir={tmp_path / 'cache'}"
    first = tmp_path / "first"
    proc = run_app(*TINY_LM_APP, cache, f"hydra.run.dir={first}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((first / "results.json").read_text())
    assert results["task"] == "lm" and results["loss"] == "fkl" and "trained now" in results["teacher_source"]
    for key in ("teacher_ppl", "student_ppl", "baseline_ppl", "student_val_ppl"):
        assert math.isfinite(results[key]) and results[key] > 1.0, (key, results[key])
    assert results["student_val_loss"] == pytest.approx(math.log(results["student_val_ppl"]), rel=1e-4)
    assert 0.0 <= results["student_val_acc"] <= 1.0 and 0.0 <= results["agreement"] <= 1.0
    assert any(source.startswith("scikit-learn==") for source in results["corpus"]["sources"])
    assert results["data"]["corpus"] == results["corpus"]["signature"]
    assert Path(results["checkpoint"]).is_file()
    assert "student perplexity (test)" in proc.stdout and "baseline perplexity (no KD, test)" in proc.stdout

    # the second run reuses the stored teacher and resumes the student's fit from the first run's last.ckpt for a
    # second epoch (ckpt_path=, as in the image app)
    second = tmp_path / "second"
    last = first / "checkpoints" / "last.ckpt"
    steps = torch.load(last, weights_only=True)["global_step"]
    resume = [f"ckpt_path={last}", "trainer.max_epochs=2", "baseline=false"]
    proc = run_app(*TINY_LM_APP, cache, *resume, f"hydra.run.dir={second}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((second / "results.json").read_text())
    assert "reused" in again["teacher_source"] and not (second / "teacher").exists()
    assert again["teacher_ppl"] == pytest.approx(results["teacher_ppl"], rel=1e-5)  # the same weights
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * steps > 0
    assert "baseline_ppl" not in again
