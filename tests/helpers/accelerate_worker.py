"""Run by test_optimizer_loops.py, alone or under torchrun: the ZSAM optimizer in an accelerate loop.

    python accelerate_worker.py OUT MODE      MODE: replica | sync | bf16 | scaler

The loop of the README's recipe: accelerator.prepare, accumulate (2 micro-batches a step), the
ascent of each micro-batch inside optimizer.ascent() and no_sync, the descent through
accelerator.backward, restore, clipping after the second pass, then accelerate's step. Each rank
saves the weights at the start of every step, the micro-batches it saw, and the final weights.
``scaler`` runs accelerate's fp16 protocol on the CPU: accelerate makes its GradScaler on a GPU only,
so the worker hands it one (a scale that overflows at first, counting its unscale_ calls) and turns
on the native-AMP path a GPU would take.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from checks import end_distributed_run
from toy import TinyClassifier, vector_dataset

from zsam_hf import ZSAM


class CountingScaler(torch.amp.GradScaler):
    calls = 0

    def unscale_(self, optimizer):
        CountingScaler.calls += 1
        return super().unscale_(optimizer)


def main(out: Path, mode: str) -> None:
    precision = {"bf16": "bf16", "scaler": "fp16"}.get(mode, "no")
    accelerator = Accelerator(gradient_accumulation_steps=2, mixed_precision=precision, cpu=True)
    if mode == "scaler":  # before prepare(), which hands the scaler to the wrapped optimizer
        accelerator.native_amp = True
        accelerator.scaler = CountingScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-10)
    model = TinyClassifier(hidden=16)
    zsam = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1, sync_ascent=mode == "sync")
    loader = torch.utils.data.DataLoader(vector_dataset(64, seed=5), batch_size=4, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, zsam, loader)
    starts, batches, losses, norms = [], [], [], []
    for batch in loader:
        if mode == "scaler":  # large inputs, large gradients: the first scales overflow
            batch = {**batch, "x": batch["x"] * 100}
        with accelerator.accumulate(model):
            if len(batches) % 2 == 0:
                starts.append(
                    {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
                )
            batches.append({k: v.clone() for k, v in batch.items()})
            with zsam.ascent(), accelerator.no_sync(model):
                loss = model(**batch)["loss"]
                accelerator.backward(loss)
            norm = zsam.last_perturbation_norm
            norms.append(None if norm is None else float(norm))
            accelerator.backward(model(**batch)["loss"])
            zsam.restore()
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    final = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    record = {"starts": starts, "batches": batches, "final": final, "losses": losses,
              "world": accelerator.num_processes, "unscale_calls": CountingScaler.calls, "norms": norms,
              "scale": accelerator.scaler.get_scale() if accelerator.scaler is not None else None}  # fmt: skip
    torch.save(record, out / f"{mode}_rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_distributed_run()
