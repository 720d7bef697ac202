"""Run by test_ddp.py under `torchrun --nproc_per_node 2`: train a few ZSAM steps per mode."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from checks import end_distributed_run
from toy import RecordingTrainer, StepRecorder, TinyClassifier, make_args, vector_dataset

# record name -> the SAM fields of the run (ZSAM per replica and synchronized; the two controls)
MODES = {
    "sync0": dict(sam_sync_ascent=False),
    "sync1": dict(sam_sync_ascent=True),
    "random": dict(sam_variant="random", zsam_normalization="tensor"),
    "sam-tensor": dict(sam_variant="sam", zsam_normalization="tensor"),
    "capturable": dict(sam_capturable=True),  # per-replica ascent, no host read, params moved to buffers
}


def record_mode(out: Path, mode: str, fields: dict) -> None:
    """Train one mode and save this rank's record; the trainer and its DDP model die on return."""
    model = TinyClassifier()
    args = make_args(out, output_dir=str(out / f"run_{mode}"), max_steps=3, **fields)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=vector_dataset(48))
    recorder = StepRecorder(model)
    trainer.add_callback(recorder)
    trainer.train()
    record = {
        "start": recorder.start,
        "grads": recorder.pre_step_grads,
        "pre_step": recorder.pre_step_weights,
        "end": recorder.end,
        "batches": trainer.micro_batches,
        "world_size": dist.get_world_size(),
    }
    torch.save(record, out / f"{mode}_rank{dist.get_rank()}.pt")


def main(out: Path) -> None:
    for mode, fields in MODES.items():
        record_mode(out, mode, fields)
    end_distributed_run()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
