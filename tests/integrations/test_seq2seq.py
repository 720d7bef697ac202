"""with_zsam over Seq2SeqTrainer (the ready-made pair of the core): a T5 built from config, no Hub.

With SAM at a negligible radius (1e-9) the ZSAM trainer ends at the plain trainer's weights and
logs the same loss; with the defaults it trains and logs the SAM keys; its arguments keep every
default of Seq2SeqTrainingArguments.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from text_models import sentences, tiny_t5, word_tokenizer
from trainer_checks import (
    COMMON,
    NEGLIGIBLE,
    assert_keeps_every_default,
    assert_same_logs,
    logged,
    max_difference,
)

import zsam_hf
from zsam_hf import ZSAMSeq2SeqTrainer, ZSAMSeq2SeqTrainingArguments, with_zsam


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
    assert max_difference(plain_model, our_model) <= 1e-6
    assert_same_logs(logged(ours, ["loss"]), logged(plain, ["loss"]), rel=1e-5)
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
