"""Run by test_checkpoints.py in a fresh process: train a tiny ViT with ZSAM, checkpoint every 2 steps.

    python resume_worker.py OUT_DIR [--kill-after-step N]

Re-running the same command resumes from the last checkpoint in OUT_DIR, as a user would.
With --kill-after-step the process SIGKILLs itself right after saving that step's checkpoint.
"""

import os
import signal
import sys

from toy import image_dataset, make_args, tiny_vit
from transformers import TrainerCallback

from zsam_hf import ZSAMTrainer, last_complete_checkpoint


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out: str, kill_after: int | None) -> None:
    model = tiny_vit(seed=0, dropout=0.1)  # dropout: the resumed RNG state matters too
    args = make_args_for(out)
    trainer = ZSAMTrainer(model=model, args=args, train_dataset=image_dataset(48, seed=3))
    if kill_after is not None:
        trainer.add_callback(KillAfterSave(kill_after))
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(out))
    trainer.save_model(os.path.join(out, "final"))


def make_args_for(out: str):
    from pathlib import Path

    return make_args(
        Path(out),
        output_dir=out,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        optim="adamw_torch",
        learning_rate=3e-3,
        per_device_train_batch_size=8,
    )


if __name__ == "__main__":
    kill = int(sys.argv[sys.argv.index("--kill-after-step") + 1]) if "--kill-after-step" in sys.argv else None
    main(sys.argv[1], kill)
