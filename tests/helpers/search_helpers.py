"""What the hyperparameter-search tests share: a callback that writes down each trial (in whatever
process runs it: Ray Tune runs trials in worker processes), and a fresh single run to compare with.

    python search_helpers.py OUT_DIR VARIANT:RHO ...   # each configuration trained alone, weights saved
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import safetensors.torch
from toy import TinyClassifier, make_args, vector_dataset
from transformers import Trainer, TrainerCallback

from zsam_hf import ZSAMTrainer

MAX_STEPS = 4


class LoggingTrainer(Trainer):
    """A user's own Trainer subclass: the Ray test gives it the two-pass step through ``with_zsam``,
    whose class is made at run time and must travel to Ray's workers."""


def model_init():
    return TinyClassifier(seed=0)


def search_args(out: Path, **overrides):
    return make_args(out, max_steps=MAX_STEPS, eval_strategy="no", learning_rate=0.1, **overrides)


def trial_name(variant: str, rho: float) -> str:
    return f"{variant}-{rho:g}"


class TrialRecorder(TrainerCallback):
    """Writes each trial's SAM settings, its logged ||e|| and its final weights into ``record_dir``."""

    def __init__(self, record_dir: str):
        self.record_dir = record_dir
        self.norms: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.norms = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "perturbation_norm" in logs:
            self.norms.append(logs["perturbation_norm"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        name = trial_name(args.sam_variant, args.sam_rho)
        os.makedirs(self.record_dir, exist_ok=True)
        state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(state_dict, os.path.join(self.record_dir, f"{name}.safetensors"))
        with open(os.path.join(self.record_dir, f"{name}.json"), "w") as f:
            json.dump(
                {"variant": args.sam_variant, "rho": args.sam_rho, "norms": self.norms, "pid": os.getpid()}, f
            )


def single_run(out: str, variant: str, rho: float) -> None:
    """The configuration trained by a trainer of its own (no search), weights in OUT/<trial name>.safetensors."""
    args = search_args(Path(out) / trial_name(variant, rho), sam_variant=variant, sam_rho=rho)
    trainer = ZSAMTrainer(model=model_init(), args=args, train_dataset=vector_dataset(32))
    trainer.train()
    state_dict = {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}
    safetensors.torch.save_file(state_dict, os.path.join(out, f"{trial_name(variant, rho)}.safetensors"))


if __name__ == "__main__":
    for configuration in sys.argv[2:]:
        variant, rho = configuration.split(":")
        single_run(sys.argv[1], variant, float(rho))
