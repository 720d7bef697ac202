"""Your own Trainer subclass (or TRL's SFTTrainer, DPOTrainer) with the two-pass step: ``with_zsam``.

Run: python examples/custom_trainer.py
"""

import sys

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from zsam_hf import with_zsam


class LabelSmoothingTrainer(Trainer):
    """A subclass with its own loss: ZSAM takes both passes through it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels, label_smoothing=0.1)
        return (loss, outputs) if return_outputs else loss


# The pair: the subclass plus the two-pass step, and its arguments plus the SAM fields.
# TRL: ZSAMSFTTrainer, ZSAMSFTConfig = with_zsam(SFTTrainer, SFTConfig)
ZSAMLabelSmoothingTrainer, ZSAMArguments = with_zsam(LabelSmoothingTrainer, TrainingArguments)


def main(output_dir: str = "outputs/custom") -> Trainer:
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    ids = torch.randint(1, 50, (96, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": int(row[0] > 25)} for row in ids]
    args = ZSAMArguments(output_dir=output_dir, sam_variant="sam", sam_rho=0.05, max_steps=12,
                         per_device_train_batch_size=16, logging_steps=4, report_to="none")  # fmt: skip
    trainer = ZSAMLabelSmoothingTrainer(
        model=BertForSequenceClassification(config), args=args, train_dataset=data
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main(*sys.argv[1:])
