"""DDP on CPUs or GPUs: the same Trainer script, launched on several processes.

torchrun --nproc_per_node 2 examples/ddp.py OUTPUT_DIR
accelerate launch --multi_gpu --num_processes 2 examples/ddp.py OUTPUT_DIR   (add --use_cpu... see the guide)
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsam_hf import ZSAMTrainer, ZSAMTrainingArguments, end_process_group


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def main(output_dir: str) -> None:
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(0))
    data = [{"x": row, "labels": int(row[0] > 0) + int(row[1] > 0.5)} for row in x]
    args = ZSAMTrainingArguments(output_dir=output_dir, max_steps=6, per_device_train_batch_size=8,
                                 logging_steps=2, report_to="none", use_cpu=not torch.cuda.is_available())  # fmt: skip
    trainer = ZSAMTrainer(model=MLP(), args=args, train_dataset=data)
    trainer.train()
    if trainer.is_world_process_zero():
        print(f"world_size {args.world_size}; logged {trainer.state.log_history[0]}")
    trainer.save_model(f"{output_dir}/final")


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # once main() has dropped the trainer and its DDP model (see its docstring)
