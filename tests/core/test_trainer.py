"""ZSAMTrainer inside the real Trainer loop, checked against gradients computed by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import assert_close_dicts, sam_gradient_by_hand
from toy import (
    StepRecorder,
    TinyClassifier,
    image_dataset,
    make_args,
    micro_batches_of_step,
    tiny_vit,
    train_recorded,
    vector_dataset,
)

from zsam_hf import ZSAMTrainer


# ---- criterion 3: the optimizer receives grad L(w + e); weights are w again --------------
@pytest.mark.parametrize(
    "variant,normalization",
    [("zsam", "global"), ("zsam", "tensor"), ("sam", "global"), ("asam", "global"), ("fsam", "global")],
)
def test_optimizer_gets_gradient_at_w_plus_e_and_weights_are_restored(tmp_path, variant, normalization):
    model = TinyClassifier()
    trainer, rec = train_recorded(
        tmp_path,
        model,
        vector_dataset(24),
        sam_variant=variant,
        zsam_normalization=normalization,
        max_steps=4,
    )
    ema: dict = {}
    for step in range(4):
        assert all(torch.equal(rec.pre_step_weights[step][n], rec.start[step][n]) for n in rec.start[step])
        [(batch, _)] = micro_batches_of_step(trainer, step)
        expected, _ = sam_gradient_by_hand(
            model, rec.start[step], batch, False, 1.0, variant, normalization=normalization, ema=ema
        )
        assert_close_dicts(rec.pre_step_grads[step], expected, what=f"step {step}")
        assert not all(torch.equal(rec.end[step][n], rec.start[step][n]) for n in expected)  # it did step


# ---- criterion 4: gradient accumulation, both loss paths ---------------------------------
@pytest.mark.parametrize("accumulation", [1, 2, 4])
@pytest.mark.parametrize("model_kind", ["module", "vit"])
def test_accumulated_gradient_is_sum_of_micro_batch_sam_gradients(tmp_path, accumulation, model_kind):
    # 22 samples in micro-batches of 4: five full and one of 2; with 4-step accumulation the
    # second optimizer step is short (2 micro-batches).
    if model_kind == "vit":
        model, data, summed = tiny_vit(), image_dataset(22), True
    else:
        model, data, summed = TinyClassifier(), vector_dataset(22), False
    steps = math.ceil(6 / accumulation)
    trainer, rec = train_recorded(
        tmp_path, model, data, gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=0.02
    )
    assert trainer.model_accepts_loss_kwargs == summed
    for step in range(steps):
        batches = micro_batches_of_step(trainer, step)
        assert len(batches) == min(accumulation, 6 - step * accumulation)
        total = None
        for batch, num_items in batches:
            weight = 1.0 / int(num_items) if summed else 1.0 / len(batches)
            g_prime, _ = sam_gradient_by_hand(model, rec.start[step], batch, summed, weight, "zsam")
            total = g_prime if total is None else {n: total[n] + g_prime[n] for n in total}
        assert_close_dicts(rec.pre_step_grads[step], total, what=f"GA={accumulation} step {step}")
        assert all(torch.equal(rec.pre_step_weights[step][n], rec.start[step][n]) for n in total)


# ---- criterion 7: BatchNorm statistics move once per step ----------------------------------
def test_batchnorm_running_stats_move_once_per_step(tmp_path):
    model = TinyClassifier(batchnorm=True)
    at_w0 = copy.deepcopy(model)
    trainer, _ = train_recorded(
        tmp_path, model, vector_dataset(16), per_device_train_batch_size=16, max_steps=1
    )
    [(_, batch, _)] = trainer.micro_batches
    at_w0.train()
    at_w0(batch["x"])  # the one update the ascent pass should have made
    assert model.norm.num_batches_tracked.item() == 1
    assert not torch.allclose(model.norm.running_mean, torch.zeros(12))
    torch.testing.assert_close(model.norm.running_mean, at_w0.norm.running_mean)
    torch.testing.assert_close(model.norm.running_var, at_w0.norm.running_var)


# ---- criterion 8: clipping acts on the descent gradient only --------------------------------
def test_clipping_acts_on_descent_gradient_only(tmp_path):
    model = TinyClassifier()
    trainer, rec = train_recorded(
        tmp_path, model, vector_dataset(8), sam_variant="fsam", max_grad_norm=0.01, max_steps=1
    )
    [(_, batch, _)] = trainer.micro_batches
    expected, ascent = sam_gradient_by_hand(model, rec.start[0], batch, False, 1.0, "fsam", ema={})
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()]))
    assert norm > 0.01  # clipping was active
    clipped = {n: g * (0.01 / (norm + 1e-6)) for n, g in expected.items()}
    assert_close_dicts(rec.pre_step_grads[0], clipped, what="clipped descent gradient")
    # FSAM's EMA holds the first ascent gradient as is: clipping never reached it
    names = [n for n, _ in model.named_parameters()]
    assert_close_dicts(
        {n: trainer.perturbation.ema[n] for n in names}, ascent, what="unclipped ascent gradient"
    )


# ---- criterion 9: resume gives the same weights -------------------------------------------
@pytest.mark.parametrize("variant", ["zsam", "sam", "asam", "fsam", "none"])
def test_resume_from_checkpoint_matches_straight_training(tmp_path, variant):
    def run(output_dir, resume=None):
        model = TinyClassifier(batchnorm=True)
        args = make_args(
            tmp_path,
            output_dir=str(output_dir),
            sam_variant=variant,
            max_steps=6,
            save_strategy="steps",
            save_steps=3,
            optim="adamw_torch",
            learning_rate=0.01,
            per_device_train_batch_size=8,
        )
        ZSAMTrainer(model=model, args=args, train_dataset=vector_dataset(40)).train(
            resume_from_checkpoint=resume
        )
        return {n: t.clone() for n, t in model.state_dict().items()}

    straight = run(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "sam_state_rank0.pt").exists() == (variant == "fsam")
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_fsam_state_is_what_resume_needs(tmp_path):
    """Without the saved EMA, resuming FSAM would diverge: the test above has teeth."""
    model = TinyClassifier()
    args = make_args(tmp_path, sam_variant="fsam", max_steps=2, save_strategy="steps", save_steps=1)
    trainer = ZSAMTrainer(model=model, args=args, train_dataset=vector_dataset(16))
    trainer.train()
    saved = torch.load(tmp_path / "out" / "checkpoint-1" / "sam_state_rank0.pt", weights_only=True)
    assert set(saved["ema"]) == {n for n, _ in model.named_parameters()}
    assert not torch.equal(saved["ema"]["fc1.weight"], trainer.perturbation.ema["fc1.weight"])


# ---- criterion 10: frozen and unused parameters ---------------------------------------------
class PartlyFrozen(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.randn(4, 4))
        self.fc1.requires_grad_(False)


def test_frozen_and_unused_parameters_are_never_touched(tmp_path):
    model = PartlyFrozen()
    frozen = model.fc1.weight.detach().clone()
    unused = model.unused.detach().clone()
    seen = []
    model.fc1.register_forward_pre_hook(lambda m, a: seen.append(torch.equal(m.weight, frozen)))
    _, rec = train_recorded(tmp_path, model, vector_dataset(16), max_steps=3)
    assert len(seen) == 6 and all(seen)  # both passes of 3 steps saw the original frozen weights
    assert torch.equal(model.fc1.weight, frozen) and torch.equal(model.unused, unused)
    assert not torch.equal(rec.end[-1]["fc2.weight"], rec.start[0]["fc2.weight"])


class NothingTrainable(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.requires_grad_(False)
        self.unused = torch.nn.Parameter(torch.zeros(3))


def test_step_where_no_parameter_has_a_gradient_does_not_crash(tmp_path):
    model = NothingTrainable()
    before = {n: p.clone() for n, p in model.named_parameters()}
    trainer = ZSAMTrainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=vector_dataset(8))
    trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert any("loss" in h for h in trainer.state.log_history)


@pytest.mark.parametrize("variant", ["zsam", "sam"])
def test_full_determinism_is_honoured(tmp_path, variant, monkeypatch):
    """``full_determinism=True`` (torch.use_deterministic_algorithms): every op of the step has a
    deterministic form, so training runs and the optimizer still gets grad L(w + e)."""
    for name in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC"):
        monkeypatch.delenv(name, raising=False)  # the Trainer sets them; undone after the test
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        model = TinyClassifier()
        trainer, rec = train_recorded(
            tmp_path, model, vector_dataset(12), sam_variant=variant, full_determinism=True, max_steps=2
        )
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(previous)
    for step in range(2):
        [(batch, _)] = micro_batches_of_step(trainer, step)
        expected, _ = sam_gradient_by_hand(model, rec.start[step], batch, False, 1.0, variant)
        assert_close_dicts(rec.pre_step_grads[step], expected, what=f"step {step}")


# ---- criterion 11: unsupported backends -----------------------------------------------------
@pytest.mark.parametrize(
    "settings,message",
    [
        ({"deepspeed": {"train_batch_size": 4}}, "does not support DeepSpeed.*use FSDP2"),
        ({"fsdp": True, "fsdp_config": {"version": 1}}, "FSDP version 2 only, got fsdp_version=1"),
        (
            {"fsdp": True, "fsdp_config": {"version": 2}, "sam_sync_ascent": False},
            "sam_sync_ascent=False cannot hold",
        ),
    ],
)
def test_unsupported_engines_are_refused_with_what_to_use(tmp_path, settings, message):
    args = make_args(tmp_path)
    for name, value in settings.items():
        setattr(args, name, value)
    with pytest.raises(ValueError, match=message):
        ZSAMTrainer(model=TinyClassifier(), args=args, train_dataset=vector_dataset(8))


def test_plain_training_arguments_are_refused_with_a_hint(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="ZSAMTrainingArguments"):
        ZSAMTrainer(model=TinyClassifier(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


# ---- criterion 12: sharpness metrics in the logs ----------------------------------------------
@pytest.mark.parametrize("accumulation", [1, 2])
def test_logs_carry_sharpness_metrics(tmp_path, accumulation):
    trainer = ZSAMTrainer(
        model=TinyClassifier(),
        args=make_args(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=accumulation),
        train_dataset=vector_dataset(32),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        assert h["sharpness"] == pytest.approx(h["perturbed_loss"] - h["loss"], abs=1e-5)
        assert h["sharpness"] > 0  # the ascent step raises the loss
        assert h["perturbation_norm"] == pytest.approx(0.05, rel=1e-4)
        assert 0 < h["zsam_kept_fraction"] < 0.1
        assert h["loss"] == pytest.approx(h["perturbed_loss"] - h["sharpness"], abs=1e-5)


def test_plain_variant_logs_like_the_trainer(tmp_path):
    trainer = ZSAMTrainer(
        model=TinyClassifier(), args=make_args(tmp_path, sam_variant="none"), train_dataset=vector_dataset(8)
    )
    trainer.train()
    assert not any("sharpness" in h for h in trainer.state.log_history)


# ---- criterion 6: bf16 autocast, fp16 GradScaler --------------------------------------------------
def test_bf16_autocast_on_cpu(tmp_path):
    model = tiny_vit()
    trainer = ZSAMTrainer(
        model=model, args=make_args(tmp_path, bf16=True, max_steps=3), train_dataset=image_dataset(16)
    )
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(h["sharpness"]) for h in trainer.state.log_history if "loss" in h)


class CountingScaler(torch.amp.GradScaler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unscale_calls = 0

    def unscale_(self, optimizer):
        self.unscale_calls += 1
        return super().unscale_(optimizer)


def test_fp16_grad_scaler_unscales_once_and_skips_overflow_without_nan(tmp_path):
    # A scale near float32's limit overflows the first steps' gradients (ascent and descent):
    # the ascent must then leave w alone and the scaler must skip the step and back off.
    model = TinyClassifier()
    data = vector_dataset(16).map(lambda columns: {"x": columns["x"] * 50})
    trainer = ZSAMTrainer(
        model=model, args=make_args(tmp_path, fp16=True, max_grad_norm=1.0, max_steps=4), train_dataset=data
    )
    scaler = CountingScaler("cpu", init_scale=2.0**126, backoff_factor=2.0**-110, growth_interval=1000)
    trainer.accelerator.scaler = scaler
    trainer.accelerator.native_amp = True
    rec = StepRecorder(model)
    trainer.add_callback(rec)
    trainer.train()
    assert scaler.unscale_calls == 4  # once per step, by the Trainer's clipping only
    assert scaler.get_scale() < 2.0**126  # at least one overflow happened and was skipped
    skipped = [all(torch.equal(rec.start[s][n], rec.end[s][n]) for n in rec.start[s]) for s in range(4)]
    assert skipped[0] and not all(skipped)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["perturbation_norm"] == 0.0  # no perturbation on the overflowing step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(
        torch.equal(rec.pre_step_weights[s][n], rec.start[s][n]) for s in range(4) for n in rec.start[s]
    )
