"""Choose rho with the Trainer's own hyperparameter search (Optuna); each trial trains with its rho.

pip install "zsam-hf[tune]"; run: python examples/tuning.py
"""

import sys

import torch
from transformers import BertConfig, BertForSequenceClassification

from zsam_hf import ZSAMTrainer, ZSAMTrainingArguments


def model_init():
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config)


def toy_dataset(n: int, seed: int) -> list[dict]:
    ids = torch.randint(1, 50, (n, 8), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": int(row[0] > 25)} for row in ids]


def main(output_dir: str = "outputs/tuning", n_trials: int = 4):
    args = ZSAMTrainingArguments(output_dir=output_dir, sam_variant="zsam", num_train_epochs=2,
                                 per_device_train_batch_size=16, eval_strategy="epoch", report_to="none")  # fmt: skip
    trainer = ZSAMTrainer(model_init=model_init, args=args, train_dataset=toy_dataset(128, 0),
                          eval_dataset=toy_dataset(64, 1))  # fmt: skip
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"sam_rho": trial.suggest_float("sam_rho", 0.01, 0.5, log=True)},
        backend="optuna",  # or "ray": the same search on Ray Tune's workers
        n_trials=int(n_trials),
        direction="minimize",  # eval_loss
    )
    print(f"best sam_rho {best.hyperparameters['sam_rho']:.4g}, eval_loss {best.objective:.4f}")
    return best


if __name__ == "__main__":
    main(*sys.argv[1:])
