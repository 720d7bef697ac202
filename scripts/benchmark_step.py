#!/usr/bin/env python
"""Step time and persistent memory of the base optimizer, SAM, our ZSAM (every k-th step too) and a released-code ZSAM.

One run, one machine; ratios are taken between rows of the same workload in the same run.
Our rows go through ``ZSAMTrainer.training_step`` itself (with the base optimizer's step), so
the figures include every bit of glue a user pays for. A "ZSAM, k = 5" row times whole cycles of
five optimizer steps (one two-pass step, four plain ones) and reports the time per optimizer
step. The "released" row re-creates the authors' ``SAM.first_step`` for comparison only:
``torch.quantile`` per weight tensor and two full tensors kept per parameter between the passes.

Workloads are ``ARCH@SIZExBATCH`` (timm architectures, random weights, 1000 classes for 224 px):

    python scripts/benchmark_step.py                      # ResNet-18, 64 images of 32 px: ~2 min on 2 cores
    python scripts/benchmark_step.py --workloads vit_base_patch16_224@224x4 resnet50@224x8 --steps 3
    python scripts/benchmark_step.py --device cuda --bf16 --workloads vit_base_patch16_224@224x64 resnet50@224x128
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


def interval_cycle(trainer: ZSAMTrainer, model, batch, k: int) -> int:
    """k consecutive optimizer steps (indices 0..k-1: one two-pass step, k-1 plain ones)."""
    kept = 0
    for index in range(k):
        trainer.state.global_step = index
        kept = max(kept, trainer_step(trainer, model, batch))
    trainer.state.global_step = 0
    return kept


def time_interleaved(steps: dict, warmup: int, repeats: int, device: str) -> tuple[dict, dict]:
    """Median time per optimizer step of each row, the rows taking turns call by call.

    Interleaving (rather than timing one row after another) spreads a shared machine's bursts
    of load evenly over the rows, so the ratios stay fair. Each row is (callable, optimizer
    steps per call).
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    kept: dict[str, int] = {}
    for i in range(warmup + repeats):
        for name, (step, per_call) in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            kept[name] = step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) / per_call)
    return {name: statistics.median(values) for name, values in times.items()}, kept


def parse_workload(text: str) -> tuple[str, int, int]:
    """``resnet50@224x8`` -> ("resnet50", 224, 8)."""
    arch, _, rest = text.partition("@")
    size, _, batch = rest.partition("x")
    if not (arch and size.isdigit() and batch.isdigit()):
        raise SystemExit(f"--workloads {text!r}: expected ARCH@SIZExBATCH, e.g. resnet50@224x8")
    return arch, int(size), int(batch)


def measure(arch: str, image_size: int, batch_size: int, args) -> dict:
    """All rows for one workload: medians per optimizer step and the bytes kept between passes."""
    torch.manual_seed(0)
    device = args.device
    num_classes = 1000 if image_size >= 128 else 10
    gen = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device),
        "labels": torch.randint(0, num_classes, (batch_size,), generator=gen).to(device),
    }
    model = Classifier(arch, num_classes).to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for label, variant, k in (("none", "none", 1), ("sam", "sam", 1), ("zsam", "zsam", 1), *(
                (f"zsam-k{k}", "zsam", k) for k in args.intervals)):  # fmt: skip
            targs = ZSAMTrainingArguments(
                output_dir=tmp, sam_variant=variant, sam_interval=k, optim="sgd", learning_rate=1e-3,
                report_to=[], use_cpu=device == "cpu", disable_tqdm=True, bf16=args.bf16,
            )  # fmt: skip
            trainer = ZSAMTrainer(model=model, args=targs)
            trainer.create_optimizer()
            trainer.current_gradient_accumulation_steps = 1
            trainers[label] = trainer
        steps = {
            "base optimizer (SGD)": (lambda: trainer_step(trainers["none"], model, batch), 1),
            "SAM": (lambda: trainer_step(trainers["sam"], model, batch), 1),
            "ZSAM (ours)": (lambda: trainer_step(trainers["zsam"], model, batch), 1),
        }
        for k in args.intervals:
            steps[f"ZSAM, k = {k}"] = (lambda k=k: interval_cycle(trainers[f"zsam-k{k}"], model, batch, k), k)
        if args.released:
            released_opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            steps["ZSAM (released code)"] = (
                lambda: released_code_step(model, released_opt, batch, 0.05, 0.95),
                1,
            )
        medians, kept = time_interleaved(steps, args.warmup, args.steps * args.rounds, device)
    return {"workload": f"{arch}@{image_size}x{batch_size}", "medians_s": medians, "extra_bytes": kept,
            "param_bytes": param_bytes}  # fmt: skip


def report(result: dict, args) -> None:
    medians, kept, param_bytes = result["medians_s"], result["extra_bytes"], result["param_bytes"]
    base, sam = medians["base optimizer (SGD)"], medians["SAM"]
    print(f"\n{result['workload']}, device {args.device}{' bf16' if args.bf16 else ''}, threads "
          f"{torch.get_num_threads()}, {args.rounds * args.steps} timed calls per row, rows interleaved")  # fmt: skip
    print(
        f"{'row':<24}{'per optimizer step (ms)':>25}{'vs base':>9}{'vs SAM':>8}{'extra memory / params':>24}"
    )
    for name, value in medians.items():
        print(
            f"{name:<24}{value * 1000:>25.1f}{value / base:>9.3f}{value / sam:>8.2f}{kept[name] / param_bytes:>24.3f}"
        )
    print(f"ZSAM (ours) / SAM step-time ratio: {medians['ZSAM (ours)'] / sam:.3f}")
    for k in args.intervals:
        bound = 1 + 1.15 * (sam / base - 1) / k
        print(f"ZSAM k = {k} / base: {medians[f'ZSAM, k = {k}'] / base:.3f} (amortized two-pass cost bound "
              f"1 + 1.15 (SAM/base - 1) / {k} = {bound:.3f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads", nargs="+", default=["resnet18@32x64"], help="ARCH@SIZExBATCH (timm names)"
    )
    parser.add_argument("--intervals", nargs="*", type=int, default=[2, 5], help="sam_interval values timed")
    parser.add_argument("--steps", type=int, default=15, help="timed calls per row and round (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of --steps (timed calls = steps x rounds)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as the Trainer's --bf16")
    parser.add_argument(
        "--no_released", dest="released", action="store_false", help="skip the released-code row"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = []
    for text in args.workloads:
        results.append(measure(*parse_workload(text), args))
        report(results[-1], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, **vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
