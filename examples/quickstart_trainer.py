"""The one-line change: a transformers Trainer script that trains with ZSAM.

A tiny BERT classifier built from its config (no download) on a toy task; swap in your own model
and dataset. Run: python examples/quickstart_trainer.py
"""

import sys

import torch
from transformers import BertConfig, BertForSequenceClassification

# from transformers import Trainer, TrainingArguments
from zsam_hf import ZSAMTrainer as Trainer
from zsam_hf import ZSAMTrainingArguments as TrainingArguments


def toy_dataset(n: int, seed: int = 0) -> list[dict]:
    """Token ids whose label is set by the first token."""
    ids = torch.randint(1, 50, (n, 8), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": int(row[0] > 25)} for row in ids]


def main(output_dir: str = "outputs/quickstart") -> Trainer:
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=output_dir,
        sam_variant="zsam",  # the new arguments: zsam (default), sam, asam, fsam, random, none
        sam_rho=0.05,
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        logging_steps=4,
        report_to="none",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=toy_dataset(128), eval_dataset=toy_dataset(64, seed=1)
    )
    trainer.train()  # logs carry perturbation_norm, sharpness, zsam_kept_fraction, ...
    print(trainer.evaluate())
    return trainer


if __name__ == "__main__":
    main(*sys.argv[1:])
