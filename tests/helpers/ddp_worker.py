"""Run by test_ddp.py under `torchrun --nproc_per_node 2`: train a few ZSAM steps per mode."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from toy import RecordingTrainer, StepRecorder, TinyClassifier, make_args, vector_dataset

# record name -> the SAM fields of the run (ZSAM per replica and synchronized; the two controls)
MODES = {
    "sync0": dict(sam_sync_ascent=False),
    "sync1": dict(sam_sync_ascent=True),
    "random": dict(sam_variant="random", zsam_normalization="tensor"),
    "sam-tensor": dict(sam_variant="sam", zsam_normalization="tensor"),
}


def main(out: Path) -> None:
    for mode, fields in MODES.items():
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
    dist.barrier()
    dist.destroy_process_group()  # a clean shutdown: gloo's threads are not left to interpreter exit


if __name__ == "__main__":
    main(Path(sys.argv[1]))
