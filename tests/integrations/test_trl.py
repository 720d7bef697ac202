"""with_zsam over TRL's SFTTrainer (full fine-tuning and LoRA) and DPOTrainer: a Llama built from config.

With SAM at a negligible radius (1e-9) each ZSAM trainer ends at the plain trainer's weights and logs the
same per-batch metrics (TRL's num_tokens counted once); with the defaults each trains and logs the SAM
keys; each config keeps every default of TRL's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from checks import assert_identical
from text_models import sentences, tiny_llama, word_tokenizer
from trainer_checks import (
    COMMON,
    NEGLIGIBLE,
    assert_keeps_every_default,
    assert_same_logs,
    logged,
    max_difference,
)

from zsam_hf import with_zsam

trl = pytest.importorskip("trl", reason="trl is in the integrations extra: pip install zsam-hf[integrations]")


def _sft_pair():
    from trl import SFTConfig, SFTTrainer

    return (SFTTrainer, SFTConfig), with_zsam(SFTTrainer, SFTConfig)


SFT_METRICS = ["loss", "num_tokens", "mean_token_accuracy", "entropy"]


def _sft_run(tmp_path, pair, name, peft=False, **overrides):
    from datasets import Dataset

    trainer_class, config_class = pair
    settings = dict(
        output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3,
        bf16=False, max_length=16, **COMMON,
    )  # fmt: skip
    settings.update(overrides)
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
    trainer = trainer_class(
        model=tiny_llama(), args=config_class(**settings), processing_class=word_tokenizer(),
        train_dataset=Dataset.from_dict({"text": sentences(32, seed=2)}), peft_config=peft_config,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=overrides.get("resume_from_checkpoint"))
    return trainer


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_sft_with_a_negligible_radius_matches_the_plain_sft_trainer(tmp_path, peft):
    plain_pair, zsam_pair = _sft_pair()
    # LoRA's B starts at 0, so the plain step's gradient of A is exactly 0 and Adam (whose eps turns
    # any nonzero gradient into a step) would tell 0 from the 1e-9-scale gradient at w + e: SGD here.
    optim = {"optim": "sgd", "learning_rate": 0.1} if peft else {}
    plain = _sft_run(tmp_path, plain_pair, "plain", peft, **optim)
    ours = _sft_run(tmp_path, zsam_pair, "ours", peft, **optim, **NEGLIGIBLE)
    assert max_difference(plain.model, ours.model) <= 1e-6
    plain_logs, our_logs = logged(plain, SFT_METRICS), logged(ours, SFT_METRICS)
    assert [h["num_tokens"] for h in our_logs] == [h["num_tokens"] for h in plain_logs]  # counted once
    assert_same_logs(our_logs, plain_logs)
    assert {"mean_token_accuracy", "entropy"} <= set(our_logs[0])


def test_sft_with_zsam_trains_and_logs_the_sam_keys(tmp_path):
    _, zsam_pair = _sft_pair()
    trainer = _sft_run(tmp_path, zsam_pair, "zsam", learning_rate=1e-2, max_steps=8)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert all(
        {"perturbed_loss", "sharpness", "zsam_kept_fraction", "mean_token_accuracy"} <= set(h) for h in logs
    )
    trainer.create_model_card()
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    assert (
        "pipeline_tag: text-generation" in card and "ZSAMSFTTrainer" in card and "image" not in card.lower()
    )


def test_sft_config_keeps_its_defaults(tmp_path):
    (_, plain_config), (_, zsam_config) = _sft_pair()
    assert_keeps_every_default(plain_config, zsam_config, output_dir=str(tmp_path), use_cpu=True)
    config = zsam_config(output_dir=str(tmp_path), use_cpu=True)
    assert (config.learning_rate, config.logging_steps) == (2e-5, 10)  # SFTConfig's, not TrainingArguments'
    with pytest.raises(ValueError, match=r"sam_rho=-1\.0 is invalid"):
        zsam_config(output_dir=str(tmp_path), use_cpu=True, sam_rho=-1.0)


def test_sft_with_zsam_accumulation_and_resume_are_exact(tmp_path):
    plain_pair, zsam_pair = _sft_pair()
    accumulate = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, optim="adamw_torch")
    straight = _sft_run(tmp_path, zsam_pair, "straight", save_strategy="steps", save_steps=3, **accumulate)
    one_batch = _sft_run(tmp_path, zsam_pair, "onebatch", per_device_train_batch_size=4, optim="adamw_torch")
    assert max_difference(straight.model, one_batch.model) > 0  # two micro-batches: each its own ascent
    checkpoint = os.path.join(straight.args.output_dir, "checkpoint-3")
    resumed = _sft_run(
        tmp_path, zsam_pair, "resumed", resume_from_checkpoint=checkpoint, save_strategy="no", **accumulate
    )
    assert_identical(straight.model.state_dict(), resumed.model.state_dict())
    plain = _sft_run(tmp_path, plain_pair, "plain", **accumulate)
    assert [h["num_tokens"] for h in logged(straight, ["num_tokens"])] == [
        h["num_tokens"] for h in logged(plain, ["num_tokens"])
    ]  # every micro-batch counted once


DPO_METRICS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
]


def _dpo_run(tmp_path, name, trainer_class, config_class, **overrides):
    from datasets import Dataset

    prompts = sentences(16, seed=4)
    data = Dataset.from_dict(
        {"prompt": prompts, "chosen": [" the cat sat"] * 16, "rejected": [" a dog ran"] * 16}
    )
    settings = dict(
        output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
        bf16=False, max_length=16, **COMMON,
    )  # fmt: skip
    args = config_class(**{**settings, **overrides})
    trainer = trainer_class(
        model=tiny_llama(),
        ref_model=tiny_llama(),
        args=args,
        processing_class=word_tokenizer(),
        train_dataset=data,
    )
    trainer.train()
    return trainer


def test_dpo_with_a_negligible_radius_matches_the_plain_dpo_trainer_and_trains_with_zsam(tmp_path):
    from trl import DPOConfig, DPOTrainer

    zsam_dpo, zsam_config = with_zsam(DPOTrainer, DPOConfig)
    plain = _dpo_run(tmp_path, "plain", DPOTrainer, DPOConfig)
    ours = _dpo_run(tmp_path, "ours", zsam_dpo, zsam_config, **NEGLIGIBLE)
    assert max_difference(plain.model, ours.model) <= 1e-6
    assert_same_logs(logged(ours, DPO_METRICS), logged(plain, DPO_METRICS))
    assert "rewards/margins" in logged(ours, DPO_METRICS)[0]
    assert_keeps_every_default(DPOConfig, zsam_config, output_dir=str(tmp_path), use_cpu=True)
    trained = _dpo_run(tmp_path, "zsam", zsam_dpo, zsam_config, max_steps=6)
    logs = [h for h in trained.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"] and all(
        "sharpness" in h and "rewards/margins" in h for h in logs
    )
