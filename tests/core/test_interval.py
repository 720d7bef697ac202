"""sam_interval: the two-pass step on every k-th optimizer step, the plain step on the others."""

from __future__ import annotations

import pytest
import torch
from reference import assert_close_dicts, loss_by_hand, reference_offsets, sam_gradient_by_hand
from toy import TinyClassifier, make_args, micro_batches_of_step, train_recorded, vector_dataset

from zsam_hf import ZSAMTrainer


def plain_gradient_by_hand(model, w0: dict, batch: dict, weight: float) -> dict:
    leaves = {n: t.clone().requires_grad_() for n, t in w0.items()}
    grads = torch.autograd.grad(loss_by_hand(model, leaves, batch, False, weight), list(leaves.values()))
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("variant", ["zsam", "sam"])
def test_every_third_step_takes_the_two_pass_step_under_accumulation(tmp_path, variant):
    model = TinyClassifier()
    trainer, rec = train_recorded(
        tmp_path, model, vector_dataset(56), sam_variant=variant, sam_interval=3, max_steps=7,
        gradient_accumulation_steps=2,
    )  # fmt: skip
    two_pass = []
    for step in range(7):
        batches = micro_batches_of_step(trainer, step)
        assert len(batches) == 2
        w0 = rec.start[step]
        expected = {n: torch.zeros_like(t) for n, t in w0.items()}
        plain = {n: torch.zeros_like(t) for n, t in w0.items()}
        for batch, _ in batches:
            g_prime, _ = sam_gradient_by_hand(model, w0, batch, False, 0.5, variant)
            g = plain_gradient_by_hand(model, w0, batch, 0.5)
            expected = {n: expected[n] + g_prime[n] for n in expected}
            plain = {n: plain[n] + g[n] for n in plain}
        if step % 3 == 0:
            two_pass.append(step)
            assert_close_dicts(rec.pre_step_grads[step], expected, what=f"two-pass step {step}")
            assert any(not torch.allclose(expected[n], plain[n], rtol=1e-3) for n in plain)  # they differ
        else:
            assert_close_dicts(rec.pre_step_grads[step], plain, what=f"plain step {step}")
    assert two_pass == [0, 3, 6]


@pytest.mark.parametrize(
    ("schedule", "two_pass_steps"),
    [({"sam_interval": 3}, (0, 3, 6)), ({"sam_interval": 2, "sam_start": 0.5}, (4, 6))],
    ids=["interval", "start"],
)
def test_fsam_average_moves_only_on_two_pass_steps(tmp_path, schedule, two_pass_steps):
    model = TinyClassifier()
    trainer, rec = train_recorded(
        tmp_path, model, vector_dataset(32), sam_variant="fsam", max_steps=8, **schedule
    )
    ema: dict = {}
    names = list(rec.start[0])
    for step in two_pass_steps:  # the reference builds its average from the two-pass steps alone
        [(batch, _)] = micro_batches_of_step(trainer, step)
        w0 = rec.start[step]
        g = plain_gradient_by_hand(model, w0, batch, 1.0)
        reference_offsets("fsam", names, [w0[n] for n in names], [g[n] for n in names], 0.05, ema=ema)
    for name in names:
        torch.testing.assert_close(
            trainer.perturbation.ema[name], torch.from_numpy(ema[name]).float(), rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("variant", ["zsam", "fsam"])
def test_resume_at_step_four_ends_at_the_uninterrupted_weights(tmp_path, variant):
    def run(output_dir, resume=None):
        model = TinyClassifier(batchnorm=True)
        args = make_args(
            tmp_path, output_dir=str(output_dir), sam_variant=variant, sam_interval=3, max_steps=7,
            save_strategy="steps", save_steps=4, optim="adamw_torch", learning_rate=0.01,
        )  # fmt: skip
        ZSAMTrainer(model=model, args=args, train_dataset=vector_dataset(56)).train(
            resume_from_checkpoint=resume
        )
        return {n: t.clone() for n, t in model.state_dict().items()}

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-4"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_logs_average_over_two_pass_steps_and_say_how_many(tmp_path):
    trainer = ZSAMTrainer(
        model=TinyClassifier(),
        args=make_args(tmp_path, sam_interval=3, max_steps=9, logging_steps=3),
        train_dataset=vector_dataset(64),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [3, 6, 9]
    for h in logs:
        assert h["sam_steps_fraction"] == pytest.approx(1 / 3)
        assert h["perturbation_norm"] == pytest.approx(0.05, rel=1e-4)  # the one two-pass step's ||e||
        assert 0 < h["zsam_kept_fraction"] < 0.1 and h["sharpness"] > 0


def test_interval_is_on_the_card(tmp_path):
    trainer = ZSAMTrainer(
        model=TinyClassifier(),
        args=make_args(tmp_path, sam_interval=5, max_steps=1),
        train_dataset=vector_dataset(8),
    )
    trainer.train()
    trainer.create_model_card()
    assert "| sam_interval | 5 |" in (tmp_path / "out" / "README.md").read_text()


def test_interval_under_bf16_autocast(tmp_path):
    from toy import image_dataset, tiny_vit

    model = tiny_vit()
    args = make_args(tmp_path, bf16=True, sam_interval=2, max_steps=4, logging_steps=4)
    trainer = ZSAMTrainer(model=model, args=args, train_dataset=image_dataset(32))
    trainer.train()
    [log] = [h for h in trainer.state.log_history if "loss" in h]
    assert log["sam_steps_fraction"] == 0.5 and log["perturbation_norm"] == pytest.approx(0.05, rel=1e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- sam_start: the two-pass step only from a step, or a fraction of the run, on ----------------
@pytest.mark.parametrize(
    ("sam_start", "sam_interval", "expected"),
    [(3, 1, [3, 4, 5, 6, 7]), (0.5, 1, [4, 5, 6, 7]), (0.75, 2, [6]), (0.3, 2, [3, 5, 7]), (2, 3, [2, 5])],
)
def test_sam_start_schedule_matches_the_reference(tmp_path, sam_start, sam_interval, expected):
    """Every optimizer step hands the optimizer the reference gradient: grad L(w + e) on the steps of the
    schedule (from ceil(sam_start * max_steps), or step sam_start, every sam_interval-th), grad L(w) before."""
    model = TinyClassifier()
    trainer, rec = train_recorded(
        tmp_path, model, vector_dataset(64), sam_start=sam_start, sam_interval=sam_interval, max_steps=8
    )
    for step in range(8):
        [(batch, _)] = micro_batches_of_step(trainer, step)
        w0 = rec.start[step]
        g_prime, _ = sam_gradient_by_hand(model, w0, batch, False, 1.0, "zsam")
        plain = plain_gradient_by_hand(model, w0, batch, 1.0)
        assert any(not torch.allclose(g_prime[n], plain[n], rtol=1e-3) for n in plain)  # they differ
        if step in expected:
            assert_close_dicts(rec.pre_step_grads[step], g_prime, what=f"two-pass step {step}")
        else:
            assert_close_dicts(rec.pre_step_grads[step], plain, what=f"plain step {step}")
    assert trainer.args.sam_hyperparameters()["sam_start"] == sam_start
    [log] = [h for h in trainer.state.log_history if "loss" in h][-1:]
    assert log["sam_steps_fraction"] == float(7 in expected)  # the last log covers step 7 alone


@pytest.mark.parametrize("variant", ["zsam", "fsam"])
@pytest.mark.parametrize("resume_at", [2, 6])  # before and after the start
def test_resume_with_sam_start_ends_at_the_uninterrupted_weights(tmp_path, variant, resume_at):
    def run(output_dir, resume=None):
        model = TinyClassifier(batchnorm=True)
        args = make_args(
            tmp_path, output_dir=str(output_dir), sam_variant=variant, sam_start=0.5, sam_interval=2,
            max_steps=9, save_strategy="steps", save_steps=resume_at, optim="adamw_torch", learning_rate=0.01,
        )  # fmt: skip
        ZSAMTrainer(model=model, args=args, train_dataset=vector_dataset(72)).train(
            resume_from_checkpoint=resume
        )
        return {n: t.clone() for n, t in model.state_dict().items()}

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / f"checkpoint-{resume_at}"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_sam_start_is_on_the_card(tmp_path):
    trainer = ZSAMTrainer(
        model=TinyClassifier(),
        args=make_args(tmp_path, sam_start=0.75, max_steps=1),
        train_dataset=vector_dataset(8),
    )
    trainer.train()
    trainer.create_model_card()
    assert "| sam_start | 0.75 |" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("sam_start", [0, 3, 0.5, 0.75, 0.999])
@pytest.mark.parametrize("sam_interval", [1, 2, 5])
def test_the_step_count_is_the_trainers_own_rule(sam_start, sam_interval):
    """``sharpness_step_count`` (what the separation report charges a schedule) counts exactly the steps
    ``is_sharpness_step`` takes."""
    from types import SimpleNamespace

    from zsam_hf import ZSAMTrainerMixin, ZSAMTrainingArguments
    from zsam_hf.config import sharpness_step_count

    args = ZSAMTrainingArguments(
        output_dir="unused", sam_start=sam_start, sam_interval=sam_interval, report_to=[]
    )
    for max_steps in (1, 7, 40):
        taken = sum(
            ZSAMTrainerMixin.is_sharpness_step(
                SimpleNamespace(args=args, state=SimpleNamespace(global_step=s, max_steps=max_steps))
            )
            for s in range(max_steps)
        )
        assert sharpness_step_count(sam_start, sam_interval, max_steps) == taken, max_steps
