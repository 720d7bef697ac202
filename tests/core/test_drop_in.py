"""Criterion 13: an ordinary Trainer script with only the two class names swapped."""

import numpy as np
from toy import image_dataset, tiny_vit


def test_swapping_two_class_names_trains_and_evaluates(tmp_path):
    # The script below is the usual Trainer recipe; only these two names differ.
    from zsam_hf import ZSAMTrainer as Trainer
    from zsam_hf import ZSAMTrainingArguments as TrainingArguments

    def compute_metrics(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    model = tiny_vit()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_train_epochs=15,
        learning_rate=3e-3,
        logging_steps=4,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=image_dataset(160, seed=1),
        eval_dataset=image_dataset(60, seed=2),
        compute_metrics=compute_metrics,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_accuracy"] > 0.8
    assert any("sharpness" in h for h in trainer.state.log_history)
