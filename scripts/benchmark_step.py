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

``--mode optimizer`` times the optimizer front door instead, in the plain loop users write
(``loss.backward(); opt.first_step(zero_grad=True); loss.backward(); opt.second_step(zero_grad=True)``),
rows taking turns call by call on the same model and batch: the base optimizer alone, our
``ZSAM(variant="sam")`` and ``ZSAM``, the released code's ZSAM and davda54's SAM (both re-created here
for comparison only) and pytorch_optimizer's ``SAM`` (from PyPI; left out, with a note, where it is not installed):

    python scripts/benchmark_step.py --mode optimizer --workloads resnet18@32x64 vit_base_patch16_224@224x4

``--captured`` adds our SAM and ZSAM built with ``capturable=True``, each on its own copy of the model: on CUDA
the whole two-pass step is captured once into a CUDA graph and every call replays it; elsewhere they run
eagerly (the sync-free path's own cost):

    python scripts/benchmark_step.py --mode optimizer --captured --device cuda --bf16 --workloads resnet18@32x64

``--phases`` splits SAM's and ZSAM's steps into the ascent's forward and backward, the perturbation, the
descent pass with the optimizer step, and the restore (medians of ms and of minor page faults, and the C heap's
largest drop, where glibc hands memory back to the kernel), to show where ZSAM's extra time goes:

    python scripts/benchmark_step.py --phases --workloads vit_base_patch16_224@224x4 --steps 5 --rounds 1 --warmup 1
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import sys
import tempfile
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from zsam_hf import ZSAM, ZSAMTrainer, ZSAMTrainingArguments


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

    def measured(*args, **kwargs):
        applied, stats = perturb(*args, **kwargs)
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


def workload(arch: str, image_size: int, batch_size: int, device: str):
    """A timm model with random weights (1000 classes at 224 px, 10 below), one fixed batch, and its bytes."""
    torch.manual_seed(0)
    num_classes = 1000 if image_size >= 128 else 10
    gen = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device),
        "labels": torch.randint(0, num_classes, (batch_size,), generator=gen).to(device),
    }
    model = Classifier(arch, num_classes).to(device)
    return model, batch, sum(p.numel() * p.element_size() for p in model.parameters())


# ---- the optimizer front door, in a plain loop -----------------------------------------------------
def two_step(model, optimizer, batch) -> None:
    """davda54-style: backward, first_step, backward at w + e, second_step."""
    model(**batch)["loss"].backward()
    optimizer.first_step(zero_grad=True)
    model(**batch)["loss"].backward()
    optimizer.second_step(zero_grad=True)


def base_step(model, optimizer, batch) -> None:
    model(**batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def davda54_sam_step(model, optimizer, batch, rho: float) -> int:
    """davda54/sam's step (re-created): e = rho g / ||g||, a full copy of each parameter kept."""
    model(**batch)["loss"].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        grad_norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2)
        old = [p.data.clone() for p in params]
        for p in params:
            p.add_(p.grad * (rho / (grad_norm + 1e-12)))
    optimizer.zero_grad()
    model(**batch)["loss"].backward()
    with torch.no_grad():
        for p, w in zip(params, old):
            p.data = w
    optimizer.step()
    optimizer.zero_grad()
    return sum(w.numel() * w.element_size() for w in old)


def as_cuda_graph(step):
    """``step`` captured once into a CUDA graph, after three warm-up calls on a side stream (as capture
    requires); the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def capturable_rows(arch: str, image_size: int, batch_size: int, args) -> dict:
    """Our SAM and ZSAM with ``capturable=True``, each on its own copy of the model and batch: another row's
    step may point parameters at other storage, which a captured graph would not follow. On CUDA a call
    replays one CUDA graph of the whole two-pass step; elsewhere it runs eagerly. Both keep SAM's memory
    between the passes (one copy of the parameters)."""
    rows = {}
    for name, variant in (("SAM (ours, capturable)", "sam"), ("ZSAM (ours, capturable)", "zsam")):
        model, batch, param_bytes = workload(arch, image_size, batch_size, args.device)
        optimizer = ZSAM(model.parameters(), torch.optim.SGD, variant=variant, lr=1e-3, capturable=True)
        # autocast's weight cache must be off under capture (torch.cuda.graphs' documented condition)
        autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16, cache_enabled=False)

        def step(model=model, optimizer=optimizer, batch=batch, autocast=autocast) -> None:
            with autocast:
                two_step(model, optimizer, batch)

        if args.device == "cuda":
            step = as_cuda_graph(step)
        rows[name] = (lambda step=step, kept=param_bytes: step() or kept, 1)
    return rows


def measure_optimizers(arch: str, image_size: int, batch_size: int, args) -> dict:
    """The optimizer rows for one workload: medians per step, bytes kept between the passes, and on
    CUDA each row's peak allocated memory over the base optimizer's. Without pytorch_optimizer (not on every
    GPU image), its row is left out, and said so."""
    device = args.device
    model, batch, param_bytes = workload(arch, image_size, batch_size, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    ours_sam = ZSAM(model.parameters(), torch.optim.SGD, variant="sam", lr=1e-3)
    ours = ZSAM(model.parameters(), torch.optim.SGD, lr=1e-3)
    davda = torch.optim.SGD(model.parameters(), lr=1e-3)
    released = torch.optim.SGD(model.parameters(), lr=1e-3)

    def ours_kept(optimizer):
        def step():
            kept = []
            first = optimizer.first_step

            def measured_first(zero_grad=False):
                first(zero_grad=zero_grad)
                kept.append(optimizer._applied.extra_bytes())

            optimizer.first_step = measured_first
            two_step(model, optimizer, batch)
            optimizer.first_step = first
            return kept[0]

        return step

    def run(fn):
        def call():
            with autocast:
                return fn()

        return call

    rows = {
        "base optimizer (SGD)": (run(lambda: base_step(model, sgd, batch) or 0), 1),
        "SAM (ours, ZSAM(variant='sam'))": (run(ours_kept(ours_sam)), 1),
        "ZSAM (ours)": (run(ours_kept(ours)), 1),
        "ZSAM (released code)": (run(lambda: released_code_step(model, released, batch, 0.05, 0.95)), 1),
        "SAM (davda54, re-created)": (run(lambda: davda54_sam_step(model, davda, batch, 0.05)), 1),
    }
    third_party = _third_party_sam(model)
    if third_party is not None:
        rows["SAM (pytorch_optimizer)"] = (run(lambda: two_step(model, third_party, batch) or param_bytes), 1)
    if args.captured:
        rows.update(capturable_rows(arch, image_size, batch_size, args))
    medians, kept = time_interleaved(rows, args.warmup, args.steps * args.rounds, device)
    peaks = {}
    if device == "cuda":
        for name, (fn, _) in rows.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated()
    return {"workload": f"{arch}@{image_size}x{batch_size}", "medians_s": medians, "extra_bytes": kept,
            "param_bytes": param_bytes, "peak_bytes": peaks}  # fmt: skip


def third_party_sam_class():
    """pytorch_optimizer's ``SAM`` class, or None (with a note on stderr) where it does not import: the package
    is the benchmark extra's, not every environment has it, and its row is then left out (here and in
    ``benchmark_memory.py``)."""
    try:
        from pytorch_optimizer import SAM
    except ImportError:
        print("note: pytorch_optimizer is not installed: its SAM row is left out", file=sys.stderr)
        return None
    return SAM


def _third_party_sam(model: nn.Module):
    """pytorch_optimizer's ``SAM`` over SGD, or None (with a note on stderr) where the package is missing."""
    sam = third_party_sam_class()
    return None if sam is None else sam(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3)


def report_optimizers(result: dict, args) -> None:
    medians, kept, param_bytes = result["medians_s"], result["extra_bytes"], result["param_bytes"]
    base = medians["base optimizer (SGD)"]
    sams = {k: v for k, v in medians.items() if k.startswith("SAM")}
    fastest_other = min(v for k, v in sams.items() if "ours" not in k)
    print(f"\n{result['workload']}, device {args.device}{' bf16' if args.bf16 else ''}, threads "
          f"{torch.get_num_threads()}, {args.rounds * args.steps} timed calls per row, rows interleaved")  # fmt: skip
    print(f"{'row':<34}{'per step (ms)':>15}{'vs base':>9}{'vs fastest other SAM':>22}{'kept / params':>15}")
    for name, value in medians.items():
        print(f"{name:<34}{value * 1000:>15.1f}{value / base:>9.3f}{value / fastest_other:>22.3f}"
              f"{kept[name] / param_bytes:>15.3f}")  # fmt: skip
    if result["peak_bytes"]:
        base_peak = result["peak_bytes"]["base optimizer (SGD)"]
        for name, peak in result["peak_bytes"].items():
            print(
                f"  peak allocated, {name}: {(peak - base_peak) / param_bytes:+.3f} x params over the base row"
            )
    ours, our_sam, released = (
        medians["ZSAM (ours)"],
        medians["SAM (ours, ZSAM(variant='sam'))"],
        medians["ZSAM (released code)"],
    )
    print(
        f"ZSAM (ours) / SAM (ours): {ours / our_sam:.3f} (goal <= 1.03); ZSAM (ours) / fastest other SAM: "
        f"{ours / fastest_other:.3f} (goal <= 1.05); our SAM / fastest other SAM: {our_sam / fastest_other:.3f} "
        f"(goal <= 1.00); released code / our ZSAM: {released / ours:.3f}"
    )
    if "ZSAM (ours, capturable)" in medians:
        how = "one CUDA graph per step" if args.device == "cuda" else "eager"
        captured, captured_sam = medians["ZSAM (ours, capturable)"], medians["SAM (ours, capturable)"]
        print(
            f"capturable ({how}): ZSAM / SAM {captured / captured_sam:.3f} (goal <= 1.03); capturable ZSAM / "
            f"default ZSAM {captured / ours:.3f}; capturable ZSAM / default SAM {captured / our_sam:.3f}"
        )


def parse_workload(text: str, flag: str = "--workloads") -> tuple[str, int, int]:
    """``resnet50@224x8`` -> ("resnet50", 224, 8); ``flag`` names the argument in the error."""
    arch, _, rest = text.partition("@")
    size, _, batch = rest.partition("x")
    if not (arch and size.isdigit() and batch.isdigit()):
        raise SystemExit(f"{flag} {text!r}: expected ARCH@SIZExBATCH, e.g. resnet50@224x8")
    return arch, int(size), int(batch)


def make_trainers(model, output_dir: str, args, extra=()) -> dict[str, ZSAMTrainer]:
    """One ZSAMTrainer per row over the same model: none, sam, zsam, then ``extra`` (label, variant, k)."""
    rows = (("none", "none", 1), ("sam", "sam", 1), ("zsam", "zsam", 1), *extra)
    return {label: make_trainer(model, output_dir, args, variant, k) for label, variant, k in rows}


def make_trainer(model, output_dir: str, args, variant: str, k: int = 1) -> ZSAMTrainer:
    """A ZSAMTrainer (SGD) ready for ``trainer_step``: its optimizer built, one micro-batch per step."""
    targs = ZSAMTrainingArguments(
        output_dir=output_dir, sam_variant=variant, sam_interval=k, optim="sgd", learning_rate=1e-3,
        report_to=[], use_cpu=args.device == "cpu", disable_tqdm=True, bf16=args.bf16,
    )  # fmt: skip
    trainer = ZSAMTrainer(model=model, args=targs)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


PHASES = ("ascent forward", "ascent backward", "perturb", "descent pass + optimizer step", "restore")


def measure_phases(arch: str, image_size: int, batch_size: int, args) -> dict:
    """Where a two-pass step's time goes, for SAM and ZSAM: the ascent's forward and backward, building and
    applying e, the host's own training step at w + e with the optimizer step, and the restore (medians of
    seconds and of minor page faults, and the largest drop of the C heap's size). The descent is the step minus
    the rest, so anything one variant makes the next pass pay shows there: page faults in it mean memory the
    allocator gave back and takes again."""
    model, batch, _ = workload(arch, image_size, batch_size, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = make_trainers(model, tmp, args)
        spent: dict[str, tuple[float, int, int]] = {}
        for trainer in trainers.values():
            _time_into(trainer, "_loss_for_backward", "ascent forward", spent)
            _time_into(trainer, "_ascent_gradients", "ascent backward", spent)
            perturb = trainer.perturbation.perturb

            def timed_perturb(*a, _perturb=perturb, **k):
                start = _clock()
                applied, stats = _perturb(*a, **k)
                spent["perturb"] = _since(start)
                _time_into(applied, "restore", "restore", spent)
                return applied, stats

            trainer.perturbation.perturb = timed_perturb
        times = {label: {phase: [] for phase in ("step", *PHASES)} for label in ("sam", "zsam")}
        for i in range(args.warmup + args.steps * args.rounds):
            for label, trainer in trainers.items():
                spent.clear()
                start = _clock()
                trainer_step(trainer, model, batch)
                step = _since(start)
                if i < args.warmup or label == "none":
                    continue
                spent["descent pass + optimizer step"] = tuple(
                    whole - sum(part[j] for part in spent.values()) for j, whole in enumerate(step)
                )
                for phase, value in {"step": step, **spent}.items():
                    times[label][phase].append(value)
    summaries = {"seconds": statistics.median, "minor_faults": statistics.median, "heap_change_bytes": min}
    return {
        unit: {
            label: {k: summary([v[j] for v in row]) for k, row in rows.items()}
            for label, rows in times.items()
        }
        for j, (unit, summary) in enumerate(summaries.items())
    }


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _heap_bytes_reader():
    """glibc's main heap size (``mallinfo2().arena``, glibc 2.33+): it drops when glibc hands the heap's top
    back to the kernel. Elsewhere, a reader of 0."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return lambda: 0
    return lambda: libc.mallinfo2().arena


_heap_bytes = _heap_bytes_reader()


def _clock() -> tuple[float, int, int]:
    """Now: wall seconds, this process's minor page faults so far, and the C heap's size."""
    return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt, _heap_bytes()


def _since(start: tuple[float, int, int]) -> tuple[float, int, int]:
    return tuple(now - then for now, then in zip(_clock(), start))


def _time_into(obj, method: str, phase: str, spent: dict) -> None:
    """Replace ``obj.method`` (on the instance) by a wrapper that records its duration and page faults
    under ``phase``."""
    original = getattr(obj, method)

    def timed(*a, **k):
        start = _clock()
        result = original(*a, **k)
        spent[phase] = _since(start)
        return result

    setattr(obj, method, timed)


def report_phases(workload_text: str, phases: dict, args) -> None:
    print(
        f"\n{workload_text}, device {args.device}, threads {torch.get_num_threads()}: medians of ms and page faults,"
    )
    print("and the C heap's largest change in MB (negative: glibc gave memory back to the kernel)")
    header = ("SAM ms", "ZSAM ms", "ZSAM - SAM", "SAM faults", "ZSAM faults", "SAM heap", "ZSAM heap")
    print(f"{'phase':<30}" + "".join(f"{name:>12}" for name in header))
    seconds, faults, heap = phases["seconds"], phases["minor_faults"], phases["heap_change_bytes"]
    for phase in ("step", *PHASES):
        sam, zsam = seconds["sam"][phase] * 1000, seconds["zsam"][phase] * 1000
        print(
            f"{phase:<30}{sam:>12.1f}{zsam:>12.1f}{zsam - sam:>+12.1f}"
            f"{faults['sam'][phase]:>12.0f}{faults['zsam'][phase]:>12.0f}"
            f"{heap['sam'][phase] / 1e6:>+12.1f}{heap['zsam'][phase] / 1e6:>+12.1f}"
        )


def measure(arch: str, image_size: int, batch_size: int, args) -> dict:
    """All rows for one workload: medians per optimizer step and the bytes kept between passes."""
    device = args.device
    model, batch, param_bytes = workload(arch, image_size, batch_size, device)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = make_trainers(model, tmp, args, [("zsam-k" + str(k), "zsam", k) for k in args.intervals])
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
    parser.add_argument(
        "--mode", choices=["trainer", "optimizer"], default="trainer",
        help="time ZSAMTrainer's step (default) or the ZSAM optimizer beside other SAM optimizers",
    )  # fmt: skip
    parser.add_argument(
        "--captured", action="store_true",
        help="optimizer mode: also time our SAM and ZSAM with capturable=True (on CUDA: one CUDA graph a step)",
    )  # fmt: skip
    parser.add_argument(
        "--phases", action="store_true",
        help="trainer mode: time each phase of SAM's and ZSAM's two-pass step instead of whole steps",
    )  # fmt: skip
    args = parser.parse_args()
    results = []
    for text in args.workloads:
        if args.mode == "optimizer":
            results.append(measure_optimizers(*parse_workload(text), args))
            report_optimizers(results[-1], args)
        elif args.phases:
            results.append({"workload": text, "phases": measure_phases(*parse_workload(text), args)})
            report_phases(text, results[-1]["phases"], args)
        else:
            results.append(measure(*parse_workload(text), args))
            report(results[-1], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, **vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
