"""with_zsam over real Trainer subclasses: Seq2SeqTrainer (core), TRL's SFTTrainer and DPOTrainer.

Each pair is checked three ways: with SAM at a negligible radius (1e-9) the ZSAM trainer ends at
the plain trainer's weights and logs the same per-batch metrics (so the host's loss, scaling and
metrics pass through untouched and are counted once); with the defaults it trains and logs the
SAM keys; and its arguments class keeps every default of the host's config.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from checks import assert_identical
from text_models import sentences, tiny_llama, tiny_t5, word_tokenizer

import zsam_hf
from zsam_hf import ZSAMSeq2SeqTrainer, ZSAMSeq2SeqTrainingArguments, with_zsam

NEGLIGIBLE = dict(sam_variant="sam", sam_rho=1e-9)
COMMON = dict(
    report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, logging_steps=1, save_strategy="no"
)


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _logged(trainer, keys) -> list[dict]:
    return [{k: h[k] for k in keys if k in h} for h in trainer.state.log_history if "loss" in h]


def assert_same_logs(ours: list[dict], plain: list[dict], rel: float = 1e-4, abs: float = 1e-6) -> None:
    assert len(ours) == len(plain) and all(set(a) == set(b) for a, b in zip(ours, plain))
    for step, (a, b) in enumerate(zip(ours, plain)):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=abs), (step, key)


def assert_keeps_every_default(plain_class, zsam_class, **required):
    plain, ours = plain_class(**required), zsam_class(**required)
    for f in dataclasses.fields(plain_class):
        assert getattr(ours, f.name) == getattr(plain, f.name), f.name
    assert {f.name for f in dataclasses.fields(zsam_class)} - {f.name for f in dataclasses.fields(plain_class)} >= {
        "sam_variant", "sam_rho", "sam_interval", "sam_start", "zsam_quantile"
    }  # fmt: skip


# ---- Seq2SeqTrainer ----------------------------------------------------------------------------
def _seq2seq_data(n: int = 24):
    from datasets import Dataset

    tokenizer = word_tokenizer()
    source = sentences(n, seed=1)
    target = [" ".join(reversed(s.split()[:3])) for s in source]  # a small "translation"
    rows = [{**tokenizer(s), "labels": tokenizer(t)["input_ids"]} for s, t in zip(source, target)]
    return Dataset.from_list(rows), tokenizer


def _seq2seq_run(tmp_path: Path, trainer_class, args_class, **overrides):
    from transformers import DataCollatorForSeq2Seq

    data, tokenizer = _seq2seq_data()
    model = tiny_t5()
    args = args_class(
        output_dir=str(tmp_path / trainer_class.__name__), max_steps=6, per_device_train_batch_size=4,
        per_device_eval_batch_size=8, learning_rate=3e-3, predict_with_generate=True, generation_max_length=6,
        eval_strategy="no", **COMMON, **overrides,
    )  # fmt: skip
    trainer = trainer_class(
        model=model, args=args, train_dataset=data, eval_dataset=data.select(range(8)),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    return trainer, model


def test_seq2seq_with_a_negligible_radius_ends_at_the_plain_trainers_weights(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    plain, plain_model = _seq2seq_run(tmp_path, Seq2SeqTrainer, Seq2SeqTrainingArguments)
    ours, our_model = _seq2seq_run(tmp_path, ZSAMSeq2SeqTrainer, ZSAMSeq2SeqTrainingArguments, **NEGLIGIBLE)
    assert _max_difference(plain_model, our_model) <= 1e-6
    assert_same_logs(_logged(ours, ["loss"]), _logged(plain, ["loss"]), rel=1e-5)
    metrics = ours.evaluate()  # predict_with_generate: the eval generates
    assert "eval_loss" in metrics and ours.predict(ours.eval_dataset).predictions.shape[0] == 8


def test_seq2seq_with_zsam_trains_logs_and_names_its_task(tmp_path):
    trainer, model = _seq2seq_run(tmp_path, ZSAMSeq2SeqTrainer, ZSAMSeq2SeqTrainingArguments)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert all(0 < h["zsam_kept_fraction"] < 0.2 and h["perturbation_norm"] > 0 for h in logs)
    trainer.create_model_card()
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    assert "pipeline_tag: text2text-generation" in card and "ZSAMSeq2SeqTrainer" in card
    assert "image" not in card.lower()


def test_seq2seq_arguments_keep_their_defaults(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    assert_keeps_every_default(
        Seq2SeqTrainingArguments, ZSAMSeq2SeqTrainingArguments, output_dir=str(tmp_path)
    )
    assert with_zsam(zsam_hf.trainer.Seq2SeqTrainer, Seq2SeqTrainingArguments) == (
        ZSAMSeq2SeqTrainer, ZSAMSeq2SeqTrainingArguments
    )  # fmt: skip


def test_with_zsam_refuses_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="expects a transformers Trainer subclass"):
        with_zsam(torch.optim.SGD)
    with pytest.raises(TypeError, match="already takes the two-pass step"):
        with_zsam(zsam_hf.ZSAMTrainer)
    with pytest.raises(TypeError, match="ZSAMSeq2SeqTrainingArguments"):
        from transformers import Seq2SeqTrainingArguments

        ZSAMSeq2SeqTrainer(model=tiny_t5(), args=Seq2SeqTrainingArguments(output_dir="x", use_cpu=True))


# ---- TRL -------------------------------------------------------------------------------------------
trl = pytest.importorskip("trl", reason="trl is in the test extra; install zsam-hf[test] to run these")


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
    assert _max_difference(plain.model, ours.model) <= 1e-6
    plain_logs, our_logs = _logged(plain, SFT_METRICS), _logged(ours, SFT_METRICS)
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
    assert _max_difference(straight.model, one_batch.model) > 0  # two micro-batches: each its own ascent
    checkpoint = os.path.join(straight.args.output_dir, "checkpoint-3")
    resumed = _sft_run(
        tmp_path, zsam_pair, "resumed", resume_from_checkpoint=checkpoint, save_strategy="no", **accumulate
    )
    assert_identical(straight.model.state_dict(), resumed.model.state_dict())
    plain = _sft_run(tmp_path, plain_pair, "plain", **accumulate)
    assert [h["num_tokens"] for h in _logged(straight, ["num_tokens"])] == [
        h["num_tokens"] for h in _logged(plain, ["num_tokens"])
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
    assert _max_difference(plain.model, ours.model) <= 1e-6
    assert_same_logs(_logged(ours, DPO_METRICS), _logged(plain, DPO_METRICS))
    assert "rewards/margins" in _logged(ours, DPO_METRICS)[0]
    assert_keeps_every_default(DPOConfig, zsam_config, output_dir=str(tmp_path), use_cpu=True)
    trained = _dpo_run(tmp_path, "zsam", zsam_dpo, zsam_config, max_steps=6)
    logs = [h for h in trained.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"] and all(
        "sharpness" in h and "rewards/margins" in h for h in logs
    )
