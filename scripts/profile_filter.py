#!/usr/bin/env python
"""Where ZSAM's perturbation spends its time on the CPU: each part of the filter, timed inside real steps.

The step benchmark (``benchmark_step.py``) says how much a ZSAM step costs over a SAM step; this says where.
It runs the perturbation engine (``SharpnessPerturbation``, what both front doors call) on a timm model with
real gradients, and between perturbations does what a two-pass step does: the descent backward at w + e,
the restore, an SGD step. So each part starts with the caches as a real step leaves them, which matters:
the per-tensor work costs 2-4x in the step what it costs repeated on the same data (docs/performance.md).
Each part's function is wrapped by name with ``time.perf_counter``; parts nest (the copy of the kept
entries holds their count; the small tensors' selection holds their deviations and narrowing, threshold and
copy), and a nested part is counted in its caller as well. The step's phases are timed too (``PHASES``: the
two passes, the perturbation, the restore, the optimizer's step), so a run with ``--variant sam`` beside one
without says which phases ZSAM's extra time is in. Figures are per step, at torch's current thread count:

    python scripts/profile_filter.py                                          # ResNet-18, 64 x 32 px
    taskset -c 1 env OMP_NUM_THREADS=1 python scripts/profile_filter.py       # one thread
    python scripts/profile_filter.py --variant sam                            # SAM's perturbation
    python scripts/profile_filter.py --by_size                                # each part by tensor size

``--mean_from_sample`` is a timing-only experiment whose kept entries are not the filter's: each large
tensor's mean comes from its strided sample instead of a pass over the tensor. What it saves bounds what a
selection that reads each gradient once (the mean summed in the collecting pass) could save.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time

# benchmark_step.py, beside this script: the workloads (model, batch, ``ARCH@SIZExBATCH``) this script profiles
import benchmark_step
import torch

from zsam_hf import perturbation
from zsam_hf.selection import cpu, kernel
from zsam_hf.selection.order_statistics import as_float

# (module, function, what it is); the order is the order within a tensor's selection.
PARTS = (
    (perturbation, "gradient_mean", "means: a pass over each weight gradient"),
    (cpu, "_sampled_bracket", "the strided sample and its bracket of the quantile"),
    (cpu, "_sample", "the strided sample through torch (without the loops)"),
    (cpu, "_bracket", "the bracket through NumPy (without the loops, or where ties leave them too many)"),
    (cpu, "_candidates", "the collecting pass"),
    (kernel, "deviations_pair", "the candidates' deviations and band, narrowed to the two order statistics"),
    (cpu, "_threshold", "the kept entries' bound from them (NumPy's selection where ties are left)"),
    (cpu, "_quantile_of_deviations", "NumPy's selection of the order statistics (ties; without the loops)"),
    (cpu, "_candidates_above", "the kept entries counted and copied out"),
    (kernel, "narrow_deviations", "small tensors' deviations, narrowed to the two order statistics"),
    (cpu, "_kept_small", "small tensors' selection (holds their narrowing, threshold and copy)"),
    (cpu, "_kept_exact", "the NumPy and torch full selection (a bound that missed; small tensors without C)"),
    (perturbation, "_global_norm", "norms (SAM's ||g||; ZSAM's ||g~||)"),
    (perturbation, "climb_entries", "the climb to w + e at the kept entries"),
    (perturbation, "scatter_entries", "the restore's writes"),
)


# The step's phases, in order: the ascent pass (forward and backward at w), the perturbation, the descent pass
# at w + e, the restore, the base optimizer's step. Comparing them with ``--variant sam`` says which phases
# ZSAM's extra time is in (the passes, or the perturbation and restore only).
PHASES = ("ascent", "perturbation", "descent", "restore", "optimizer_step")


class PartTimer:
    """Wraps each of ``PARTS`` with a timer: seconds and calls per part, and per tensor size."""

    def __init__(self):
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self.by_size = collections.defaultdict(collections.Counter)
        self._size = 0  # entries of the weight gradient being selected
        self._originals = []

    def install(self) -> None:
        for module, name, _ in PARTS:
            original = getattr(module, name)
            self._originals.append((module, name, original))
            setattr(module, name, self.timed(name, original))

    def uninstall(self) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.by_size.clear()

    def timed(self, name: str, function):
        """``function`` timed as part ``name``."""

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if name in ("gradient_mean", "climb_entries", "scatter_entries"):
                self._size = args[0].numel()  # a tensor's selection starts with its mean
            elif name == "_global_norm":
                self._size = 0  # over all tensors
            start = time.perf_counter()
            result = function(*args, **kwargs)
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            self.calls[name] += 1
            self.by_size[self._size][name] += elapsed
            return result

        return wrapper


def mean_from_sample(grad: torch.Tensor) -> torch.Tensor:
    """Timing only: a large gradient's mean taken from its strided sample (not the filter's mean)."""
    flat = as_float(grad).reshape(-1)
    if flat.numel() <= cpu.SMALL_TENSOR:
        return flat.mean()
    stride = cpu._sample_stride(flat.numel())
    return flat[stride // 2 :: stride].mean()


def profile(arch: str, image_size: int, batch_size: int, args) -> dict:
    """Per-step seconds of the perturbation, the restore and each part, over ``args.steps`` steps."""
    model, batch, _ = benchmark_step.workload(arch, image_size, batch_size, "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = perturbation.SharpnessPerturbation(variant=args.variant)
    names, params = zip(*model.named_parameters())
    timer, totals = PartTimer(), collections.Counter()
    timer.install()
    if args.mean_from_sample:  # in place of the timed mean; ``uninstall`` puts the filter's back
        perturbation.gradient_mean = timer.timed("gradient_mean", mean_from_sample)
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                timer.clear()
                totals.clear()
            begun = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(**batch)["loss"].backward()
            start = time.perf_counter()
            with torch.no_grad():
                applied, _ = engine.perturb(list(names), list(params), [p.grad for p in params])
            perturbed = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(**batch)["loss"].backward()
            descended = time.perf_counter()
            applied.restore()
            restored = time.perf_counter()
            optimizer.step()
            ended = time.perf_counter()
            for phase, seconds in zip(PHASES, (start, perturbed, descended, restored, ended)):
                totals[phase] += seconds - begun
                begun = seconds
    finally:
        timer.uninstall()
    weights = [p for p in params if p.ndim > 1]
    return {
        "workload": f"{arch}@{image_size}x{batch_size}",
        "threads": torch.get_num_threads(),
        "variant": args.variant,
        "mean_from_sample": args.mean_from_sample,
        "steps": args.steps,
        "weight_tensors": len(weights),
        "large_weight_tensors": sum(p.numel() > cpu.SMALL_TENSOR for p in weights),
        "seconds": {name: value / args.steps for name, value in totals.items()},
        "parts": {name: timer.seconds[name] / args.steps for _, name, _ in PARTS if timer.calls[name]},
        "calls": {name: timer.calls[name] / args.steps for _, name, _ in PARTS if timer.calls[name]},
        "by_size": {
            size: {name: value / args.steps for name, value in parts.items()}
            for size, parts in sorted(timer.by_size.items())
        },
    }


def report(result: dict, by_size: bool) -> None:
    experiment = ", mean from the sample (timing only)" if result["mean_from_sample"] else ""
    print(
        f"\n{result['workload']}, {result['variant']}{experiment}, {result['threads']} thread(s), "
        f"{result['steps']} steps: ms per step (parts nest: a nested part is in its caller's time too)"
    )
    for name in PHASES:
        print(f"{name:<28}{1000 * result['seconds'][name]:>9.2f}")
    print(f"{'step':<28}{1000 * sum(result['seconds'][name] for name in PHASES):>9.2f}")
    about = {name: what for _, name, what in PARTS}
    for name, seconds in result["parts"].items():
        calls = result["calls"][name]
        print(f"  {name:<26}{1000 * seconds:>9.2f}   {calls:>5.1f} calls   {about[name]}")
    if by_size:
        print("by the tensor's entries (µs per step, all tensors of that size; 0: over all tensors):")
        for size, parts in result["by_size"].items():
            print(f"  {size:>10}  " + " ".join(f"{name}={1e6 * value:.0f}" for name, value in parts.items()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload", default="resnet18@32x64", help="ARCH@SIZExBATCH (a timm name, as benchmark_step.py's)"
    )
    parser.add_argument("--variant", choices=["zsam", "sam"], default="zsam")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--by_size", action="store_true", help="also each part by tensor size")
    parser.add_argument(
        "--mean_from_sample", action="store_true",
        help="timing only: large tensors' means from their samples (the kept entries are not the filter's)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = profile(*benchmark_step.parse_workload(args.workload, "--workload"), args)
    report(result, args.by_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
