"""Both faces of the engine on causal LMs: LMDistillationModule (the module wrapper) and DistillCallback dropped into
a user's own LM LightningModule; hidden-state taps by module path; checkpoints without the teacher that load with
weights_only=True and resume; perplexity; LoRA students."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lm_helpers import tiny_lm, token_batch, token_loader

from lightning_kd import DistillCallback
from lightning_kd.lm.divergences import next_token_mask, token_divergence
from lightning_kd.lm.module import CausalLMModule, LMDistillationModule, next_token_nll

V = 50


def trainer(**kw) -> L.Trainer:
    defaults = {
        "max_steps": 2, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 1, "log_every_n_steps": 1,
    }  # fmt: skip
    return L.Trainer(**{**defaults, **kw})


def test_module_face_trains_logs_and_keeps_the_teacher_frozen() -> None:
    student, teacher = tiny_lm(V, seed=0), tiny_lm(V, n_layer=2, n_embd=48, seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = LMDistillationModule(student, teacher, loss={"jsd": {"beta": 0.5, "temperature": 0.9}}, task_weight=0.5)
    t = trainer()
    t.fit(module, token_loader(2), token_loader(2))  # one epoch of 2 steps, then validation
    logged = t.callback_metrics
    assert {"train/jsd", "train/ce", "train/loss", "train/agreement", "val/ppl", "val/loss", "val/agreement"} <= set(
        logged
    )
    assert math.isclose(float(logged["val/ppl"]), math.exp(float(logged["val/loss"])), rel_tol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(k.startswith("engine.teacher") or "teacher" in k for k in module.state_dict())


def test_module_loss_is_task_plus_weighted_term() -> None:
    student, teacher = tiny_lm(V, seed=0), tiny_lm(V, seed=1)
    module = LMDistillationModule(student, teacher, loss={"rkl": {"weight": 0.7, "temperature": 2.0}}, task_weight=0.3)
    batch = token_batch()
    module.engine.setup(student, {"input_ids": batch["input_ids"][:2]}, student)
    module.trainer = None  # type: ignore[assignment] - a bare step outside a Trainer
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    loss = module.training_step(batch, 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits.detach()
    labels = batch["labels"]
    ce = next_token_nll(s_logits, labels) / next_token_mask(labels).sum()
    kd = token_divergence(s_logits, t_logits, next_token_mask(labels), "reverse_kl", temperature=2.0)
    assert torch.allclose(loss, 0.3 * ce + 0.7 * kd, atol=1e-6)


def test_hidden_state_taps_by_module_path_feed_feature_terms() -> None:
    """FitNet on transformer blocks of different widths: the taps capture [B, T, H] hidden states and a linear
    connector maps the student's to the teacher's."""
    student, teacher = tiny_lm(V, n_embd=32, seed=0), tiny_lm(V, n_layer=2, n_embd=48, seed=1)
    loss = {"fkl": {}, "fitnet": {"student_layers": "transformer.h.0", "teacher_layers": "transformer.h.1"}}
    module = LMDistillationModule(student, teacher, loss=loss, task_weight=1.0)
    t = trainer()
    t.fit(module, token_loader())
    assert {"train/fkl", "train/fitnet"} <= set(t.callback_metrics)
    connector = module.engine.terms["fitnet"].connector
    weights = [p for p in connector.parameters() if p.dim() == 2]
    assert weights and weights[0].shape == (48, 32)  # student width 32 -> teacher width 48


def test_misspelt_hidden_state_path_lists_close_matches() -> None:
    module = LMDistillationModule(
        tiny_lm(V),
        tiny_lm(V),
        loss={"fitnet": {"student_layers": "transformer.h0", "teacher_layers": "transformer.h.0"}},
    )
    with pytest.raises(LookupError, match=r"transformer\.h\.0"):
        trainer().fit(module, token_loader())


def test_vocabulary_mismatch_is_refused_with_the_fix() -> None:
    module = LMDistillationModule(tiny_lm(V), tiny_lm(V + 3), loss="fkl")
    with pytest.raises(ValueError, match=r"same vocabulary.*uld"):
        trainer().fit(module, token_loader())


class UserLM(L.LightningModule):
    """A user's own LM module: the model computes its loss from the labels."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_lm(V, seed=0)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        self.log("train/user_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_callback_face_on_a_users_lm_module() -> None:
    """The callback taps the LM head's logits, runs the teacher on the batch's keyword inputs and returns
    task_weight · user loss + weight · term; Hugging Face's own shifted CE is the user's loss."""
    user, teacher = UserLM(), tiny_lm(V, n_layer=2, seed=1)
    callback = DistillCallback(teacher, loss={"jsd": {"weight": 0.8, "beta": 0.3}}, task_weight=0.5)
    seen = {}
    original = callback._distill_step

    def spy(pl_module, step, *args, **kw):
        seen["loss"] = original(pl_module, step, *args, **kw)
        return seen["loss"]

    callback._distill_step = spy  # type: ignore[method-assign]
    t = trainer(max_steps=1, callbacks=[callback])
    user_before = {k: v.clone() for k, v in user.state_dict().items()}
    batch = token_batch(seed=0)
    t.fit(user, torch.utils.data.DataLoader([batch], batch_size=None))
    assert {"train/jsd", "train/user_loss", "train/agreement"} <= set(t.callback_metrics)
    # recompute the first step's loss from the weights before the update
    fresh = UserLM()
    fresh.load_state_dict(user_before)
    out = fresh(batch["input_ids"], batch["attention_mask"], batch["labels"])
    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    jsd = token_divergence(out.logits, t_logits, next_token_mask(batch["labels"]), "generalized_jsd", beta=0.3)
    assert torch.allclose(seen["loss"], 0.5 * out.loss + 0.8 * jsd, atol=1e-5)


def test_checkpoint_without_teacher_loads_weights_only_and_resumes(tmp_path) -> None:
    student, teacher = tiny_lm(V, seed=0), tiny_lm(V, n_layer=2, seed=1)
    module = LMDistillationModule(student, teacher, loss="fkl")
    t = trainer(max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(module, token_loader())
    path = tmp_path / "two.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert any(k.startswith("model.") for k in ckpt["state_dict"])
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])
    resumed = LMDistillationModule(tiny_lm(V, seed=5), teacher, loss="fkl")
    t2 = trainer(max_steps=3)
    t2.fit(resumed, token_loader(), ckpt_path=path)
    assert t2.global_step == 3


def test_perplexity_is_exp_of_the_token_weighted_mean_nll() -> None:
    model = tiny_lm(V, seed=3)
    module = CausalLMModule(model)
    loader = token_loader(3)
    result = trainer(limit_val_batches=1.0).validate(module, loader, verbose=False)[0]
    nll = tokens = 0.0
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll += float(next_token_nll(logits, batch["labels"]))
            tokens += int(next_token_mask(batch["labels"]).sum())
    assert result["val/loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["val/ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_lora_student_trains_only_its_adapters() -> None:
    from lightning_kd.lm.models import create_causal_lm

    torch.manual_seed(0)
    student = create_causal_lm("gpt2", V, n_layer=1, n_embd=32, n_head=2, lora={"r": 4, "target_modules": ["c_attn"]})
    base = {k: v.clone() for k, v in student.named_parameters() if not v.requires_grad}
    adapters = {k: v.clone() for k, v in student.named_parameters() if v.requires_grad}
    assert adapters and all("lora" in k for k in adapters)
    module = LMDistillationModule(
        student, tiny_lm(V, seed=1), loss="fkl", optimizer=lambda p: torch.optim.AdamW(p, 1e-2)
    )
    trainer().fit(module, token_loader())
    now = dict(student.named_parameters())
    assert all(torch.equal(now[k], v) for k, v in base.items())
    assert any(not torch.equal(now[k], v) for k, v in adapters.items())
