"""HARD (learned adversarial spatial-transformer augmentation): lightning_kd.strategies.hard."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_APP, GapNet, SmallCNN, UserModule, fast_trainer, make_loader, tiny

from lightning_kd.callback import DistillCallback
from lightning_kd.module import DistillationModule
from lightning_kd.strategies.hard import AffineAugmentor, HARDAugment, hard_objective


def test_objective_hand_worked() -> None:
    """2 classes, τ = 1: p_T(g(x)) = (3/4, 1/4), p_S(g(x)) = (1/2, 1/2), p_T(x) = (1/2, 1/2)."""
    t_aug = torch.tensor([[math.log(3.0), 0.0]])
    s_aug = torch.zeros(1, 2)
    t_clean = torch.zeros(1, 2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL((3/4, 1/4) ‖ (1/2, 1/2)) = 0.130812
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL((1/2, 1/2) ‖ (3/4, 1/4)) = 0.143841
    loss, dis, shift = hard_objective(t_aug, s_aug, t_clean, temperature=1.0, teacher_weight=2.0)
    assert dis.item() == pytest.approx(kl, abs=1e-6)
    assert shift.item() == pytest.approx(reverse, abs=1e-6)
    assert loss.item() == pytest.approx(-kl + 2.0 * reverse, abs=1e-6)
    # τ = 2 multiplies by τ² and softens: teacher logits (2·log 3, 0)/2 give the same (3/4, 1/4)
    loss2, dis2, _ = hard_objective(2 * t_aug, s_aug, 2 * t_aug, temperature=2.0, teacher_weight=1.0)
    assert dis2.item() == pytest.approx(4 * kl, abs=1e-5) and loss2.item() == pytest.approx(-4 * kl, abs=1e-5)


def test_identity_at_init_and_bounds() -> None:
    torch.manual_seed(0)
    aug = AffineAugmentor(3, noise_dim=4, max_rotation=20.0, max_scale=1.5, max_translation=0.1)
    x = torch.randn(5, 3, 16, 16)
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(5, 2, 3)
    torch.testing.assert_close(aug.theta(x), eye)
    torch.testing.assert_close(aug(x), x, atol=1e-5, rtol=0)
    with torch.no_grad():  # saturate every raw parameter, both signs
        for sign in (1.0, -1.0):
            aug.head.bias.fill_(sign * 50.0)
            theta = aug.theta(x)
            scale = theta[:, :, :2].det().sqrt()  # |A| = s² for a rotation-scale matrix
            angle = torch.atan2(theta[:, 1, 0], theta[:, 0, 0])
            assert (theta[:, :, 2].abs() <= 2 * 0.1 + 1e-6).all()
            assert (scale <= 1.5 + 1e-5).all() and (scale >= 1 / 1.5 - 1e-5).all()
            assert (angle.abs() <= math.radians(20.0) + 1e-5).all()
            assert theta[:, :, 2].abs().min() == pytest.approx(0.2, abs=1e-5)  # the bound is reached, not exceeded
    with pytest.raises(ValueError, match="max_scale"):
        AffineAugmentor(max_scale=0.5)
    with pytest.raises(ValueError, match="in_channels"):
        AffineAugmentor(1)(x)


def test_augmentor_step_ascends_disagreement_only_augmentor_moves() -> None:
    teacher, student = GapNet(classes=5, seed=1), GapNet(classes=5, seed=2)
    for p in teacher.parameters():
        p.requires_grad_(False)
    before_t = [p.clone() for p in teacher.parameters()]
    before_s = [p.clone() for p in student.parameters()]
    torch.manual_seed(3)
    cb = HARDAugment(lr=0.01, steps=3, teacher_weight=0.5, noise_dim=0)
    # smooth images (white noise makes the warp's loss landscape rough at the pixel scale)
    x = torch.nn.functional.interpolate(torch.randn(8, 3, 4, 4), size=16, mode="bicubic", align_corners=False)

    def objective() -> tuple[float, float]:
        with torch.no_grad():
            aug = cb.augmentor(x)
            loss, dis, _ = hard_objective(teacher(aug), student(aug), teacher(x), temperature=1.0, teacher_weight=0.5)
        return loss.item(), dis.item()

    phi0 = [p.clone() for p in cb.augmentor.parameters()]
    loss0, dis0 = objective()
    parts = cb.augmentor_step(x, teacher, student)
    loss1, dis1 = objective()
    assert parts["objective"].item() == pytest.approx(loss0, abs=1e-6)
    assert loss1 < loss0 - 1e-4  # descent on the augmentor's objective...
    assert dis1 > dis0  # ...which here raises the teacher-student disagreement
    assert any(not torch.equal(a, b) for a, b in zip(phi0, cb.augmentor.parameters()))
    # teacher and student: parameters unchanged, no gradient written, training mode kept
    assert all(p.grad is None for p in [*teacher.parameters(), *student.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(before_t, teacher.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_s, student.parameters()))
    assert student.training


def test_refuses_output_cache_and_missing_engine() -> None:
    module = DistillationModule(GapNet(classes=5), GapNet(classes=5, seed=1))
    module.engine.output_cache = object()  # any installed cache
    with pytest.raises(RuntimeError, match="teacher-output cache"):
        HARDAugment()._find_engine(SimpleNamespace(callbacks=[]), module)
    with pytest.raises(RuntimeError, match="exactly one distillation engine"):
        HARDAugment()._find_engine(SimpleNamespace(callbacks=[]), UserModule())
    with pytest.raises(ValueError, match="augmented_fraction"):
        HARDAugment(augmented_fraction=0.0)
    with pytest.raises(TypeError, match="list"):
        from lightning_kd.strategies.hard import _input_key

        _input_key((torch.zeros(1), torch.zeros(1)))


def test_fit_teacher_and_student_see_augmented_batch_and_state_round_trip() -> None:
    torch.manual_seed(0)
    teacher = SmallCNN(seed=1)
    module = UserModule(SmallCNN(seed=0))
    hard = HARDAugment(lr=0.05, augmented_fraction=0.5)
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    hooks = [
        teacher.register_forward_hook(lambda m, a, o: seen["teacher"].append(a[0].detach().clone())),
        module.net.register_forward_hook(lambda m, a, o: seen["student"].append(a[0].detach().clone())),
    ]
    # the augment callback comes before the DistillCallback (as in the app)
    cb = DistillCallback(teacher, loss="kd")
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[hard, cb])
    trainer.fit(module, make_loader(n=16, batch=8))
    for h in hooks:
        h.remove()
    for side in ("teacher", "student"):
        extended = [t for t in seen[side] if t.shape[0] == 12]  # 8 clean + ceil(0.5·8) augmented
        assert len(extended) == 2, (side, [t.shape[0] for t in seen[side]])
    # the last step: rows 8..11 are the augmented copies the callback appended, rows 0..7 the clean batch
    for side in ("teacher", "student"):
        last = [t for t in seen[side] if t.shape[0] == 12][-1]
        torch.testing.assert_close(last[8:], hard.last_augmented)
        assert not torch.allclose(last[8:], last[:4])  # warped after two augmentor steps
    logged = trainer.callback_metrics
    assert "train/hard/disagreement" in logged and "train/hard/teacher_shift" in logged
    # state_dict round trip through torch.save / torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(hard.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = HARDAugment(lr=0.05, augmented_fraction=0.5)
    other.load_state_dict(state)
    for a, b in zip(hard.augmentor.parameters(), other.augmentor.parameters()):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(hard.augmentor.parameters(), AffineAugmentor().parameters()))
    steps = [s["step"] for s in other.optimizer.state_dict()["state"].values()]
    assert steps and all(int(s) == 2 for s in steps)


def test_app_hard(tmp_path, monkeypatch) -> None:
    from lightning_kd.config import compose
    from lightning_kd.models import save_model_file
    from lightning_kd.run import train

    monkeypatch.chdir(tmp_path)
    meta = {"model": "test_resnet", "num_classes": 10}
    teacher = save_model_file(tiny("test_resnet", seed=1), tmp_path / "teacher.pt", meta)
    cfg = compose(
        [
            "augment=hard",
            "augment.augmented_fraction=0.25",
            *TINY_APP,
            "model=test_resnet",
            "teacher=test_resnet",
            f"teacher.checkpoint={teacher}",
        ]
    )
    assert cfg.augment._target_ == "lightning_kd.strategies.hard.HARDAugment"
    res = train(cfg)
    assert math.isfinite(res["student_acc"])
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/hard/disagreement", "train/kd"} <= set(header)
