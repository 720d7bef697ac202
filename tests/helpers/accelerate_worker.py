"""Run by test_optimizer_loops.py, alone or under torchrun: the ZSAM optimizer in an accelerate loop.

    python accelerate_worker.py OUT MODE      MODE: replica | sync | bf16

The loop of the README's recipe: accelerator.prepare, accumulate (2 micro-batches a step), the
ascent of each micro-batch inside optimizer.ascent() and no_sync, the descent through
accelerator.backward, restore, clipping after the second pass, then accelerate's step. Each rank
saves the weights at the start of every step, the micro-batches it saw, and the final weights.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from toy import TinyClassifier, vector_dataset

from zsam_hf import ZSAM


def main(out: Path, mode: str) -> None:
    accelerator = Accelerator(
        gradient_accumulation_steps=2, mixed_precision="bf16" if mode == "bf16" else "no", cpu=True
    )
    model = TinyClassifier(hidden=16)
    zsam = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1, sync_ascent=mode == "sync")
    loader = torch.utils.data.DataLoader(vector_dataset(64, seed=5), batch_size=4, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, zsam, loader)
    starts, batches, losses = [], [], []
    for batch in loader:
        with accelerator.accumulate(model):
            if len(batches) % 2 == 0:
                starts.append(
                    {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
                )
            batches.append({k: v.clone() for k, v in batch.items()})
            with zsam.ascent(), accelerator.no_sync(model):
                loss = model(**batch)["loss"]
                accelerator.backward(loss)
            accelerator.backward(model(**batch)["loss"])
            zsam.restore()
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    final = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    record = {"starts": starts, "batches": batches, "final": final, "losses": losses,
              "world": accelerator.num_processes}  # fmt: skip
    torch.save(record, out / f"{mode}_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
