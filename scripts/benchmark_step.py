#!/usr/bin/env python
"""Step time and persistent memory of the base optimizer, SAM, our ZSAM and a released-code ZSAM.

One run, one machine, one model (a ResNet-18 from timm, batch 64 of 32x32 images):
ratios are taken between rows of the same run.  Our rows go through
``ZSAMTrainer.training_step`` itself (with the base optimizer's step), so the figures
include every bit of glue a user pays for.  The "released" row re-creates the authors'
``SAM.first_step`` for comparison only: ``torch.quantile`` per weight tensor and two
full tensors kept per parameter (``old_p`` and ``e_w``) between the passes.

    python scripts/benchmark_step.py              # CPU: ~2 minutes on 2 cores
    python scripts/benchmark_step.py --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from zsam_hf import ZSAMTrainer, ZSAMTrainingArguments


class Classifier(nn.Module):
    """timm backbone + mean cross-entropy, in the shape the Trainer expects."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        self.net = timm.create_model(arch, pretrained=False, num_classes=num_classes)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def released_code_step(model, optimizer, batch, rho: float, quantile: float) -> int:
    """The authors' ZSAM step (tensor normalization); returns the bytes kept between passes."""
    loss = model(**batch)["loss"]
    loss.backward()
    grad_norm = torch.norm(torch.stack([p.grad.norm(2) for p in model.parameters() if p.grad is not None]), 2)
    kept = 0
    with torch.no_grad():
        state = {}
        for p in model.parameters():
            if p.grad is None:
                continue
            old_p = p.data.clone()
            g = p.grad
            if g.ndim > 1:
                z = (g - g.mean()) / (g.std() + 1e-12)
                tau = torch.quantile(z.abs().flatten(), quantile)
                filtered = g * (z.abs() > tau)
                norm = filtered.norm()
                e_w = rho * filtered / (norm + 1e-12) if norm > 0 else rho * g / (grad_norm + 1e-12)
            else:
                e_w = rho * g / (grad_norm + 1e-12)
            p.add_(e_w)
            state[p] = (old_p, e_w)
            kept += old_p.numel() * old_p.element_size() + e_w.numel() * e_w.element_size()
    optimizer.zero_grad()
    model(**batch)["loss"].backward()
    with torch.no_grad():
        for p, (old_p, _) in state.items():
            p.data = old_p
    optimizer.step()
    optimizer.zero_grad()
    return kept


def trainer_step(trainer: ZSAMTrainer, model, batch) -> int:
    """One optimizer step through ZSAMTrainer.training_step; returns the bytes kept between passes."""
    kept = []
    perturb = trainer.perturbation.perturb

    def measured(*args):
        applied, stats = perturb(*args)
        kept.append(applied.extra_bytes())
        return applied, stats

    trainer.perturbation.perturb = measured
    trainer.training_step(model, batch)
    trainer.perturbation.perturb = perturb
    trainer.optimizer.step()
    model.zero_grad(set_to_none=True)
    return kept[0] if kept else 0


def time_interleaved(steps: dict, warmup: int, repeats: int, device: str) -> tuple[dict, dict]:
    """Median step time per row, the rows taking turns step by step.

    Interleaving single steps (rather than timing one row after another) spreads a shared
    machine's bursts of load evenly over the rows, so the ratios stay fair.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    kept: dict[str, int] = {}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            kept[name] = step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per row and round (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of --steps (timed steps = steps x rounds)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = args.device
    gen = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(
            device
        ),
        "labels": torch.randint(0, 10, (args.batch_size,), generator=gen).to(device),
    }
    model = Classifier(args.arch, 10).to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for variant in ("none", "sam", "zsam"):
            targs = ZSAMTrainingArguments(
                output_dir=tmp,
                sam_variant=variant,
                optim="sgd",
                learning_rate=1e-3,
                report_to=[],
                use_cpu=device == "cpu",
                disable_tqdm=True,
            )
            trainer = ZSAMTrainer(model=model, args=targs)
            trainer.create_optimizer()
            trainer.current_gradient_accumulation_steps = 1
            trainers[variant] = trainer
        released_opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        steps = {
            "base optimizer (SGD)": lambda: trainer_step(trainers["none"], model, batch),
            "SAM": lambda: trainer_step(trainers["sam"], model, batch),
            "ZSAM (ours)": lambda: trainer_step(trainers["zsam"], model, batch),
            "ZSAM (released code)": lambda: released_code_step(model, released_opt, batch, 0.05, 0.95),
        }
        medians, kept = time_interleaved(steps, args.warmup, args.steps * args.rounds, device)

    sam = medians["SAM"]
    print(
        f"{args.arch}, batch {args.batch_size} of {args.image_size}x{args.image_size}, device {device}, "
        f"threads {torch.get_num_threads()}, {args.rounds * args.steps} timed steps per row, rows interleaved"
    )
    print(f"{'row':<24}{'median step (ms)':>18}{'vs SAM':>9}{'extra memory / params':>24}")
    for name, value in medians.items():
        print(f"{name:<24}{value * 1000:>18.1f}{value / sam:>9.2f}{kept[name] / param_bytes:>24.3f}")
    print(f"ZSAM (ours) / SAM step-time ratio: {medians['ZSAM (ours)'] / sam:.3f}")
    print(f"SAM / base step-time ratio: {sam / medians['base optimizer (SGD)']:.3f}")
    print(f"released / SAM step-time ratio: {medians['ZSAM (released code)'] / sam:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"medians_s": medians, "extra_bytes": kept, "param_bytes": param_bytes, **vars(args)},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
