"""Run the same command again after a kill: it resumes from the newest complete checkpoint.

A finished job run again takes no step. Run twice: python examples/resume.py
"""

import sys

import torch
from transformers import BertConfig, BertForSequenceClassification

from zsam_hf import ZSAMTrainer, ZSAMTrainingArguments, last_complete_checkpoint


def main(output_dir: str = "outputs/resume") -> ZSAMTrainer:
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (64, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": int(row[0] > 25)} for row in ids]
    args = ZSAMTrainingArguments(output_dir=output_dir, max_steps=8, save_strategy="steps", save_steps=4,
                                 per_device_train_batch_size=16, report_to="none")  # fmt: skip
    trainer = ZSAMTrainer(model=BertForSequenceClassification(config), args=args, train_dataset=data)
    checkpoint = last_complete_checkpoint(output_dir)  # None on the first run; skips a half-written one
    print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(f"{output_dir}/final")
    return trainer


if __name__ == "__main__":
    main(*sys.argv[1:])
