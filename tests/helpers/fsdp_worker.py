"""Run by test_fsdp.py under torchrun: the same ZSAM runs under DDP (synchronized ascent) and FSDP2.

    python -m torch.distributed.run --nproc_per_node N fsdp_worker.py OUT_DIR

Every run goes through the unmodified Trainer. On the CPU the Trainer does not shard by itself
(accelerate only switches to FSDP for accelerator process groups); ``fsdp_on_cpu`` makes the real
FSDP2 path run here. Rank 0 writes, per run, the full weights at each step's start, the full
gradients handed to the optimizer, the final weights, and every rank's micro-batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import accelerate.state
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import DistributedType
from checks import end_distributed_run
from torch.distributed.tensor import DTensor
from toy import DictDataset, RecordingTrainer, make_args
from transformers import TrainerCallback

RUNS = {
    "zsam-global": dict(sam_variant="zsam", zsam_normalization="global"),
    "zsam-tensor": dict(sam_variant="zsam", zsam_normalization="tensor"),
    "sam": dict(sam_variant="sam"),
    "asam": dict(sam_variant="asam"),
    "fsam": dict(sam_variant="fsam"),
    "zsam-k2": dict(sam_variant="zsam", sam_interval=2),  # steps 0 and 2 two-pass, step 1 plain
}
STEPS = 3


def fsdp_on_cpu() -> None:
    """Test-only: let accelerate take its FSDP path with a gloo (CPU) process group."""
    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no" and plugin.mixed_precision_policy is None:
                plugin.set_mixed_precision(self._mixed_precision)  # as accelerate's own FSDP branch does
            self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = init


class ShardedNet(nn.Module):
    """Rows 13, 13 and 2: uneven slices on 2 and 3 ranks, and an empty one (the head on rank 2 of 3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 13)
        self.fc2 = nn.Linear(13, 13)
        self.head = nn.Linear(13, 2)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return (
            {"logits": logits}
            if labels is None
            else {"loss": F.cross_entropy(logits, labels), "logits": logits}
        )


def dataset(n: int = 96) -> DictDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen)
    return DictDataset({"x": x, "labels": ((x[:, 0] + 0.5 * x[:, 1]) > 0).long()})


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class FullRecorder(TrainerCallback):
    """Full weights at each step's start and full gradients right before optimizer.step() (collective)."""

    def __init__(self, model: nn.Module):
        self.model, self.start, self.grads = model, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start.append({n: full(p) for n, p in self.model.named_parameters()})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: full(p.grad) for n, p in self.model.named_parameters()})


def train(out: Path, mode: str, name: str, **overrides) -> dict:
    model = ShardedNet()
    settings = dict(
        output_dir=str(out / f"{mode}-{name}"), max_steps=STEPS, gradient_accumulation_steps=2,
        max_grad_norm=0.5, per_device_train_batch_size=4, sam_sync_ascent=True, **RUNS[name],
    )  # fmt: skip
    if mode == "fsdp":
        settings.update(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
    settings.update(overrides)
    trainer = RecordingTrainer(model=model, args=make_args(out, **settings), train_dataset=dataset())
    assert trainer.is_fsdp_enabled == (mode == "fsdp")
    recorder = FullRecorder(model)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=overrides.get("resume_from_checkpoint"))
    if mode == "fsdp":
        assert all(isinstance(p, DTensor) for p in model.parameters())  # it really was sharded
    batches = [None] * dist.get_world_size()
    dist.all_gather_object(batches, trainer.micro_batches)
    return {
        "start": recorder.start,
        "grads": recorder.grads,
        "final": {n: full(p) for n, p in model.named_parameters()},
        "batches": batches,
        "logs": trainer.state.log_history,
    }


def main(out: Path) -> None:
    records = {}
    for name in RUNS:  # DDP first: the FSDP patch keeps a plugin once one was given
        records[("ddp", name)] = train(out, "ddp", name)
    fsdp_on_cpu()
    for name in RUNS:
        records[("fsdp", name)] = train(out, "fsdp", name)
    # FSDP2 mixed precision: bf16 parameters in the passes, fp32 slices kept and stepped
    records[("bf16", "zsam-global")] = train(
        out, "fsdp", "zsam-global", bf16=True, output_dir=str(out / "bf16")
    )
    for name in ("zsam-global", "fsam"):  # checkpoints: a straight run and one resumed from step 2
        settings = dict(
            max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch", learning_rate=0.01
        )
        records[("straight", name)] = train(
            out, "fsdp", name, **settings, output_dir=str(out / f"straight-{name}")
        )
        resume = str(out / f"straight-{name}" / "checkpoint-2")
        records[("resumed", name)] = train(
            out,
            "fsdp",
            name,
            **settings,
            output_dir=str(out / f"resumed-{name}"),
            resume_from_checkpoint=resume,
        )
    if dist.get_rank() == 0:
        torch.save({"records": records, "world": dist.get_world_size()}, out / "records.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_distributed_run()
