#!/usr/bin/env python
"""Reproduce the paper's comparison: variants x models x seeds on one dataset, with tables and plots.

Defaults follow the released code (Adam, lr 1e-3, L2 5e-5, batch 256, 5 warm-up epochs then
StepLR(30, 0.75), 200 epochs, rho 0.05, ASAM rho 0.5, Q_p 0.95); scale them down for a CPU:

    python scripts/benchmark_optimizers.py --epochs 3 --max_train_samples 8000 --seeds 0 1 2 \\
        --warmup_epochs 0.5 --step_epochs 1 --output_dir docs/benchmark

Re-running the same command skips finished runs and resumes a run killed halfway.  On a
machine with a GPU the same command uses it.

``--study separation`` runs the regimes where the SAM family is documented to separate from
the base optimizer: symmetric label noise (``--label_noise``, clean test set) and small
training sets trained to overfitting (``--small_data``), with the Hessian's top eigenvalue and
trace of every trained model; the runs are ordered seed by seed, so a grid stopped early
holds whole seeds. ``--shard K/N`` lets N processes share one grid.

``--study controls`` asks what the z-score filter does: every method of ``--methods`` (the random
control at ZSAM's density and SAM split per tensor among them) at every effective radius of
``--radii`` on one seed, scored on a validation split with the training noise; then each method at
its selected radius (and the random control at ZSAM's selection) over ``--seeds``, level by level
of ``--label_noise``, with paired 95% intervals (zsam_hf/benchmark/controls.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time

import torch
import transformers

from zsam_hf.benchmark import controls
from zsam_hf.benchmark.grid import (
    VARIANTS,
    Budget,
    HessianBudget,
    RunSpec,
    at_matched_radius,
    load_results,
    run_grid,
)
from zsam_hf.benchmark.report import (
    cost_table,
    plot_accuracy,
    plot_accuracy_vs_time,
    plot_curves,
    plot_flatness,
    plot_sensitivity,
    write_tables,
)
from zsam_hf.benchmark.separation import write_separation_report


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--output_dir", default="benchmark_runs/fashion_mnist", help="results, tables and plots go here"
    )
    p.add_argument("--dataset_name", default="fashion_mnist")
    p.add_argument("--models", nargs="+", default=["cifar_resnet20", "paper_vit"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=200)
    p.add_argument("--max_train_samples", type=int, default=None, help="train subset (default: all)")
    p.add_argument(
        "--model_max_train_samples",
        nargs="*",
        default=[],
        metavar="MODEL=N",
        help="per-model train subset, e.g. paper_vit=4000 (overrides --max_train_samples)",
    )
    p.add_argument(
        "--eval_samples_per_epoch", type=int, default=None, help="test images for the per-epoch curves"
    )
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=5e-5)
    p.add_argument("--warmup_epochs", type=float, default=5)
    p.add_argument("--step_epochs", type=float, default=30)
    p.add_argument("--gamma", type=float, default=0.75)
    p.add_argument(
        "--schedule", choices=["released", "cosine"], default="released",
        help="after the warm-up: the released code's StepLR, or cosine decay to 0",
    )  # fmt: skip
    p.add_argument("--no_augment", action="store_true", help="train without random crop and flip")
    p.add_argument(
        "--rho", type=float, default=None, help="rho for sam/fsam/zsam (default 0.05; ASAM keeps 0.5)"
    )
    p.add_argument("--quantile", type=float, default=0.95)
    p.add_argument("--num_workers", type=int, default=0, help="dataloader workers")
    p.add_argument("--flatness_radii", nargs="+", type=float, default=[0.01, 0.02, 0.05])
    p.add_argument("--flatness_directions", type=int, default=4)
    p.add_argument("--flatness_samples", type=int, default=1000)
    p.add_argument(
        "--sweep_model", default="cifar_resnet20", help="model of the zsam sensitivity sweep ('' = none)"
    )
    p.add_argument("--sweep_quantiles", nargs="*", type=float, default=[0.5, 0.8, 0.9, 0.95, 0.99])
    p.add_argument("--sweep_rhos", nargs="*", type=float, default=[0.01, 0.02, 0.1, 0.2])
    p.add_argument("--sweep_epochs", type=float, default=None, help="default: half of --epochs")
    p.add_argument("--sweep_max_train_samples", type=int, default=None, help="default: half of the grid's")
    p.add_argument("--sweep_seeds", nargs="+", type=int, default=[0])
    p.add_argument(
        "--report_only", action="store_true", help="only rebuild tables and plots from results.jsonl"
    )
    p.add_argument("--study", choices=["grid", "separation", "controls"], default="grid")
    p.add_argument(
        "--methods", nargs="+", default=list(controls.METHODS), choices=list(controls.METHODS),
        help="controls study: the methods searched and compared",
    )  # fmt: skip
    p.add_argument(
        "--radii", nargs="+", type=float, default=list(controls.RADII), help="controls: ||e|| searched"
    )
    p.add_argument("--search_seed", type=int, default=0, help="controls: the seed of the radius search")
    p.add_argument("--validation_samples", type=int, default=2000, help="controls: validation images scored")
    p.add_argument("--label_noise", nargs="*", type=float, default=[0.0, 0.2, 0.4, 0.6])
    p.add_argument(
        "--noise_extra_level",
        type=float,
        default=0.4,
        help="the noise level that also runs --noise_extra_variants",
    )
    p.add_argument(
        "--noise_extra_variants",
        nargs="*",
        default=[
            "fsam",
            "zsam-global-start0.5",
            "zsam-global-start0.75",
            "zsam-global-k2",
            at_matched_radius("sam"),
            at_matched_radius("zsam-global"),
        ],
        choices=list(VARIANTS),
    )
    p.add_argument("--small_data", nargs="*", type=int, default=[1000, 4000], help="clean training subsets")
    p.add_argument("--small_data_epochs", nargs="*", type=float, default=[24, 12], help="epochs per subset")
    p.add_argument(
        "--hessian_samples", type=int, default=0, help="clean training images for the Hessian figures"
    )
    p.add_argument("--hessian_iterations", type=int, default=20)
    p.add_argument("--trace_samples", type=int, default=10)
    p.add_argument("--shard", default="0/1", help="K/N: run every N-th spec, starting at the K-th")
    args = p.parse_args(argv)
    k, _, n = args.shard.partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        p.error(f"--shard {args.shard!r} is invalid: expected K/N with 0 <= K < N, e.g. 0/2")
    args.shard = (int(k), int(n))
    if len(args.small_data_epochs) != len(args.small_data):
        p.error("--small_data_epochs needs one value per --small_data subset")
    return args


def _budget(args, epochs: float, max_train_samples: int | None, label_noise: float = 0.0) -> Budget:
    return Budget(
        validation=args.study == "controls",
        validation_samples=args.validation_samples,
        label_noise=label_noise,
        schedule=args.schedule,
        augment=not args.no_augment,
        dataset_name=args.dataset_name,
        epochs=epochs,
        max_train_samples=max_train_samples,
        eval_samples_per_epoch=args.eval_samples_per_epoch,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        step_epochs=args.step_epochs,
        gamma=args.gamma,
        rho=args.rho,
        quantile=args.quantile,
        num_workers=args.num_workers,
    )


def separation_specs(args) -> list[RunSpec]:
    """Label noise x variants and small data x variants, seed by seed (a stopped grid holds whole seeds)."""
    specs = []
    for seed in args.seeds:
        for model in args.models:
            for level in args.label_noise:
                budget = _budget(args, args.epochs, args.max_train_samples, label_noise=level)
                variants = list(args.variants)
                if level == args.noise_extra_level:
                    variants += [v for v in args.noise_extra_variants if v not in variants]
                specs += [RunSpec(model, v, seed, budget, group=f"noise{level:g}") for v in variants]
    for seed in args.seeds:  # the small sets after every seed of the noise grid
        for model in args.models:
            for samples, epochs in zip(args.small_data, args.small_data_epochs):
                budget = _budget(args, epochs, samples)
                specs += [RunSpec(model, v, seed, budget, group=f"small{samples}") for v in args.variants]
    return specs


def specs_for(args) -> list[RunSpec]:
    if args.study == "separation":
        return separation_specs(args)
    per_model = dict(item.split("=", 1) for item in args.model_max_train_samples)
    specs = []
    for model in args.models:
        samples = int(per_model[model]) if model in per_model else args.max_train_samples
        budget = _budget(args, args.epochs, samples)
        specs += [RunSpec(model, v, seed, budget) for seed in args.seeds for v in args.variants]
    if args.sweep_model:
        base = args.max_train_samples or 60000
        samples = args.sweep_max_train_samples or max(1, base // 2)
        budget = _budget(args, args.sweep_epochs or max(1.0, args.epochs / 2), samples)
        overrides = [{"zsam_quantile": q} for q in args.sweep_quantiles] + [
            {"sam_rho": r} for r in args.sweep_rhos
        ]
        specs += [
            RunSpec(args.sweep_model, "zsam-global", seed, budget, o, group="sweep")
            for seed in args.sweep_seeds
            for o in overrides
        ]
    return specs


def budget_text(args, specs: list[RunSpec]) -> str:
    grid = [s for s in specs if s.group == "grid"]
    per_model = {s.model: s.budget.max_train_samples or "all" for s in grid}
    return (
        f"Dataset {args.dataset_name}; {len(grid)} grid runs ({len(args.models)} models x {len(args.variants)} variants "
        f"x {len(args.seeds)} seeds); {args.epochs:g} epochs; train samples per model {per_model}; batch "
        f"{args.batch_size}; Adam lr {args.learning_rate:g}, L2 {args.weight_decay:g}; warm-up {args.warmup_epochs:g} "
        f"epochs then x{args.gamma:g} every {args.step_epochs:g} epochs; rho {args.rho or 'variant default'}, "
        f"Q_p {args.quantile:g}; device {'cuda' if torch.cuda.is_available() else 'cpu'} "
        f"({torch.get_num_threads()} threads). Command: python {shlex.join(sys.argv)}"
    )


def separation_budget_text(args, specs: list[RunSpec]) -> str:
    return (
        f"Dataset {args.dataset_name}; {len(specs)} runs: models {args.models}, variants {args.variants} at label "
        f"noise {args.label_noise} ({args.max_train_samples or 'all'} training images, {args.epochs:g} epochs; "
        f"at {args.noise_extra_level:g} also {args.noise_extra_variants}) and on clean subsets {args.small_data} "
        f"({args.small_data_epochs} epochs); seeds {args.seeds}; batch {args.batch_size}; Adam lr "
        f"{args.learning_rate:g}, L2 {args.weight_decay:g}; warm-up {args.warmup_epochs:g} epochs then "
        + (
            "cosine decay to 0"
            if args.schedule == "cosine"
            else f"x{args.gamma:g} every {args.step_epochs:g} epochs"
        )
        + ("; no augmentation" if args.no_augment else "; the script's crop and flip augmentation")
        + f"; per-epoch curves on {args.eval_samples_per_epoch or 'all'} test images, the final test on all of them; "
        f"Hessian on {args.hessian_samples} clean training images ({args.hessian_iterations} power iterations at "
        f"most, {args.trace_samples} Hutchinson samples); device {'cuda' if torch.cuda.is_available() else 'cpu'} "
        f"({torch.get_num_threads()} threads). Command: python {shlex.join(sys.argv)}"
    )


# The released code's per-tensor normalization climbs about MATCHED_RHO on ResNet-20: these pairs tell
# the z-score filter's effect (same radius) from the radius's (same method).
MATCHED_PAIRS = [
    (at_matched_radius("zsam-global"), at_matched_radius("sam")),
    ("zsam-tensor", at_matched_radius("sam")),
    ("zsam-tensor", at_matched_radius("zsam-global")),
    (at_matched_radius("sam"), "sam"),
    (at_matched_radius("zsam-global"), "zsam-global"),
    ("zsam-tensor", "zsam-global"),
]


def report(args, specs: list[RunSpec], records: list[dict]) -> str:
    keys = {s.key() for s in specs}
    records = [r for r in records if r["key"] in keys]
    if args.study == "separation":
        return write_separation_report(
            records, args.output_dir, args.variants, separation_budget_text(args, specs), MATCHED_PAIRS
        )
    variants = list(args.variants)  # the order the command line gave
    text = write_tables(records, args.output_dir, variants, budget_text(args, specs))
    plot_accuracy(records, os.path.join(args.output_dir, "test_accuracy.png"), variants)
    plot_curves(records, os.path.join(args.output_dir, "test_accuracy_curves.png"), variants)
    plot_flatness(records, os.path.join(args.output_dir, "flatness.png"), variants)
    plot_sensitivity(records, os.path.join(args.output_dir, "sensitivity.png"))
    plot_accuracy_vs_time(records, os.path.join(args.output_dir, "accuracy_vs_time.png"), variants)
    cost = cost_table(records, variants)
    with open(os.path.join(args.output_dir, "results.md"), "a") as f:
        f.write("\nAccuracy against wall time:\n\n" + cost)
    return text + "\nAccuracy against wall time:\n\n" + cost


def controls_budget_text(args, weight_tensors: int) -> str:
    return (
        f"Dataset {args.dataset_name}; models {args.models} ({weight_tensors} weight tensors: the per-tensor methods "
        f"run at rho = ||e|| / sqrt({weight_tensors})); methods {args.methods}; label noise {args.label_noise}; "
        f"{args.max_train_samples or 'all'} training images, {args.epochs:g} epochs, batch {args.batch_size}, Adam lr "
        f"{args.learning_rate:g}, L2 {args.weight_decay:g}, "
        + ("cosine decay" if args.schedule == "cosine" else "StepLR")
        + ("; no augmentation" if args.no_augment else "")
        + f"; Q_p {args.quantile:g}. Radius search on seed {args.search_seed} over ||e|| in {args.radii}, scored on "
        f"{args.validation_samples} validation images carved from the training pool with the training noise; final "
        f"runs on seeds {args.seeds} at the selected radii, tested on the whole clean test set, Hessian on "
        f"{args.hessian_samples} clean training images; device {'cuda' if torch.cuda.is_available() else 'cpu'} "
        f"({torch.get_num_threads()} threads). Command: python {shlex.join(sys.argv)}"
    )


def run_controls(args, log) -> str:
    """Level by level: the radius search, then (once every search run is in) the final runs."""
    path = os.path.join(args.output_dir, "results.jsonl")
    weight_tensors = controls.weight_tensor_count(args.models[0])
    hessian = HessianBudget(args.hessian_samples, args.hessian_iterations, trace_samples=args.trace_samples)
    for noise in args.label_noise:
        budget = _budget(args, args.epochs, args.max_train_samples, label_noise=noise)
        for model in args.models:
            search = controls.search_specs(
                model, budget, args.methods, args.radii, args.search_seed, weight_tensors
            )
            if not args.report_only:
                run_grid(search, args.output_dir, args.flatness_radii, args.flatness_directions,
                         args.flatness_samples, log=log, hessian=HessianBudget(0), shard=args.shard)  # fmt: skip
            chosen = controls.selections(load_results(path), search)
            if chosen is None:
                log(
                    f"noise {noise:g}: the radius search is not complete yet; run again to start the final runs"
                )
                continue
            final = controls.final_specs(model, budget, chosen, args.seeds)
            if not args.report_only:
                run_grid(final, args.output_dir, args.flatness_radii, args.flatness_directions,
                         args.flatness_samples, log=log, hessian=hessian, shard=args.shard)  # fmt: skip
    return controls.write_controls_report(
        load_results(path), args.output_dir, args.label_noise, args.methods, args.radii, weight_tensors,
        controls_budget_text(args, weight_tensors),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.study == "controls":
        start = time.time()
        print(run_controls(args, log=lambda m: print(f"{time.time() - start:7.0f}s {m}", flush=True)))
        return 0
    specs = specs_for(args)
    text = separation_budget_text(args, specs) if args.study == "separation" else budget_text(args, specs)
    with open(os.path.join(args.output_dir, "budget.json"), "w") as f:
        json.dump({"args": vars(args), "budget": text}, f, indent=1)
    print(text, flush=True)
    if args.report_only:
        records = load_results(os.path.join(args.output_dir, "results.jsonl"))
    else:
        start = time.time()
        records = run_grid(
            specs,
            args.output_dir,
            args.flatness_radii,
            args.flatness_directions,
            args.flatness_samples,
            log=lambda m: print(f"{time.time() - start:7.0f}s {m}", flush=True),
            hessian=HessianBudget(
                args.hessian_samples, args.hessian_iterations, trace_samples=args.trace_samples
            ),
            shard=args.shard,
        )
    print(report(args, specs, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
