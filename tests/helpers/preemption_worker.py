"""Run by test_preemption.py, killed with SIGKILL at any instant and run again with the same command.

    python preemption_worker.py OUT_DIR VARIANT            # one process
    torchrun --nproc_per_node 2 preemption_worker.py ...   # DDP (gloo)

Trains an MLP with dropout (so the restored RNG state matters) and a checkpoint every 3 steps,
the checkpoints large enough (about 12 MB each) that a save takes a while to write. Each run
resumes from ``last_complete_checkpoint(OUT_DIR)`` as the training script does, and prints:

    PID <rank> <pid>        at start, for the test to kill one rank
    RESUME <path | none>    what it resumes from
    TRAIN_BEGIN             when training starts
    TRAINED                 after train() returned, before the final save (with HOLD_BEFORE_FINAL_SAVE=1
                            it then waits there, so a test can kill it at exactly that instant)
    DONE                    after the final weights are saved to OUT_DIR/final
"""

import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from checks import end_distributed_run
from markers import announce
from toy import vector_dataset
from transformers import TrainerCallback

from zsam_hf import ZSAMTrainer, ZSAMTrainingArguments, last_complete_checkpoint

MAX_STEPS = 30
SAVE_STEPS = 3


class DropoutMLP(nn.Module):
    def __init__(self, n_in: int = 6, hidden: int = 1024, n_out: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, n_out)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x, labels=None):
        h = self.dropout(torch.tanh(self.fc1(x)))
        logits = self.fc3(self.dropout(torch.tanh(self.fc2(h))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Announce(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        if args.process_index == 0:
            announce("TRAIN_BEGIN")


def main(out: str, variant: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    announce(f"PID {rank} {os.getpid()}")
    args = ZSAMTrainingArguments(
        output_dir=out,
        sam_variant=variant,
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        optim="adamw_torch",
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    trainer = ZSAMTrainer(model=DropoutMLP(), args=args, train_dataset=vector_dataset(96, seed=1))
    trainer.add_callback(Announce())
    checkpoint = last_complete_checkpoint(out)
    if rank == 0:
        announce(f"RESUME {checkpoint or 'none'}")
    trainer.train(resume_from_checkpoint=checkpoint)
    if rank == 0:
        announce("TRAINED")
    if os.environ.get("HOLD_BEFORE_FINAL_SAVE") == "1":
        time.sleep(600)  # the test kills it here: after the last checkpoint, before the final save
    trainer.save_model(os.path.join(out, "final"))
    if rank == 0:
        announce("DONE")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_distributed_run()
