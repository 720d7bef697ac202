"""The separation study's report: per-cell mean ± std (n) and paired differences with 95% intervals.

Runs of one seed share their data, their noisy labels and their initialization, so variants are
compared seed by seed: d_s = acc(variant, s) - acc(reference, s), and the interval is
mean(d) ± t(0.975, n - 1) sd(d) / sqrt(n). A difference is called one only when its interval
excludes 0; the tables say "no" otherwise, whatever the means look like.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..config import sharpness_step_count  # noqa: E402

# Two-sided 95% Student t quantiles by degrees of freedom (so the report needs no SciPy).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the nearest tabulated df below)."""
    if df < 1:
        return math.inf
    return _T975[max(k for k in _T975 if k <= df)] if df <= 30 else 1.960


@dataclass
class Paired:
    mean: float
    low: float
    high: float
    n: int

    @property
    def separates(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    """a - b over the seeds both have, with its 95% confidence interval (None with no common seed)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean = statistics.mean(d)
    if len(d) < 2:
        return Paired(mean, -math.inf, math.inf, 1)
    half = t_quantile_975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Paired(mean, mean - half, mean + half, len(d))


def _by_cell(records: list[dict], key: str) -> dict[tuple[str, str, str], dict[int, float]]:
    cells: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in records:
        if r.get(key) is not None:
            cells[(r["model"], r["group"], r["variant"])][r["seed"]] = r[key]
    return cells


def _mean_std(values) -> str:
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def _wall_time(runs: list[dict]) -> str:
    """Mean wall time of the runs that went start to finish (a resumed run timed only its last part)."""
    timed = [r["wall_time_s"] for r in runs if not r.get("resumed")]
    return f"{statistics.mean(timed):.0f}" if timed else "–"


def _fmt(p: Paired | None, scale: float = 100) -> str:
    if p is None:
        return "–"
    if p.n < 2:
        return f"{scale * p.mean:+.2f} (n=1)"
    return f"{scale * p.mean:+.2f} [{scale * p.low:+.2f}, {scale * p.high:+.2f}] {'**yes**' if p.separates else 'no'}"


def _group_order(groups) -> list[str]:
    def key(g: str):
        if g.startswith("noise"):
            return (0, float(g[5:]))
        return (1, float(g[5:]) if g.startswith("small") else 0)

    return sorted(groups, key=key)


def _group_title(group: str) -> str:
    if group.startswith("noise"):
        return f"{100 * float(group[5:]):.0f}% label noise"
    if group.startswith("small"):
        return f"{group[5:]} clean training images"
    return group


def separation_tables(records: list[dict], variants: list[str], base: str = "none") -> str:
    """Markdown: for each model and regime, every variant's test accuracy (mean ± std, n), training
    accuracies, Hessian figures, and paired differences against the base optimizer and ZSAM vs SAM."""
    acc = _by_cell(records, "final_test_accuracy")
    by_cell = defaultdict(list)
    for r in records:
        by_cell[(r["model"], r["group"], r["variant"])].append(r)
    lines = []
    models = list(dict.fromkeys(r["model"] for r in records))
    for model in models:
        groups = _group_order({g for (m, g, _) in by_cell if m == model})
        for group in groups:
            present = [v for v in variants if (model, group, v) in by_cell]
            present += sorted({v for (m, g, v) in by_cell if m == model and g == group} - set(present))
            lines += [
                "",
                f"**{model}, {_group_title(group)}**",
                "",
                "| variant | n | test acc. % | train acc. % (true labels) | train acc. % (labels trained on) "
                f"| Hessian λ_max | Hessian trace | wall time (s) | vs {base}: Δ acc. [95% CI], differs? "
                "| vs sam: Δ acc. [95% CI], differs? |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for variant in present:
                runs = by_cell[(model, group, variant)]
                cells = [variant, str(len(runs)), _mean_std(100 * r["final_test_accuracy"] for r in runs)]
                for key in ("train_accuracy_true_labels", "train_accuracy_trained_labels"):
                    values = [100 * r[key] for r in runs if r.get(key) is not None]
                    cells.append(_mean_std(values) if values else "–")
                for key in ("hessian_top_eigenvalue", "hessian_trace"):
                    values = [r[key] for r in runs if r.get(key) is not None]
                    cells.append(_mean_std(values) if values else "–")
                cells.append(_wall_time(runs))
                here = acc[(model, group, variant)]
                versus_base = paired_difference(here, acc[(model, group, base)]) if variant != base else None
                versus_sam = (
                    paired_difference(here, acc[(model, group, "sam")])
                    if variant not in (base, "sam") and (model, group, "sam") in acc
                    else None
                )
                cells += [_fmt(versus_base), _fmt(versus_sam)]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_noise(records: list[dict], path: str, variants: list[str]) -> None:
    """Test accuracy against the label-noise level per variant, mean with 95% confidence bars."""
    models = list(dict.fromkeys(r["model"] for r in records if r["group"].startswith("noise")))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant in variants:
            points = defaultdict(list)
            for r in records:
                if r["model"] == model and r["variant"] == variant and r["group"].startswith("noise"):
                    points[r["label_noise"]].append(100 * r["final_test_accuracy"])
            levels = sorted(points)
            if len(levels) < 2:
                continue
            means = [statistics.mean(points[lv]) for lv in levels]
            halves = [
                t_quantile_975(len(points[lv]) - 1)
                * statistics.stdev(points[lv])
                / math.sqrt(len(points[lv]))
                if len(points[lv]) > 1
                else 0.0
                for lv in levels
            ]
            ax.errorbar([100 * lv for lv in levels], means, yerr=halves, marker="o", capsize=3, label=variant)
        ax.set(title=model, xlabel="training labels replaced at random (%)", ylabel="clean test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def passes_per_step(record: dict) -> float:
    """Forward-backward passes per optimizer step: 1 for the base optimizer, 2 for a two-pass step every
    step, in between for the schedules (``sam_start``, ``sam_interval``), counted by the Trainer's rule."""
    if record["variant"] == "none":
        return 1.0
    steps = record["steps"]
    two_pass = sharpness_step_count(record.get("sam_start") or 0, record.get("sam_interval") or 1, steps)
    return 1 + two_pass / steps


def plot_accuracy_vs_cost(records: list[dict], path: str, group: str, variants: list[str]) -> None:
    """Mean test accuracy against cost in one regime: the schedules (sam_start, sam_interval) beside the
    full two-pass methods and the base optimizer, with 95% bars on the accuracy. Two cost axes: the
    mean wall time of the runs timed start to finish (what a user waits; it moves with the machine's
    load), and forward-backward passes per optimizer step (exact, whatever the load)."""
    fig, (by_time, by_passes) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for variant in variants:
        runs = [r for r in records if r["group"] == group and r["variant"] == variant]
        if not runs:
            continue
        accs = [100 * r["final_test_accuracy"] for r in runs]
        half = (
            t_quantile_975(len(accs) - 1) * statistics.stdev(accs) / math.sqrt(len(accs))
            if len(accs) > 1
            else 0
        )
        label = f"{variant} (n={len(runs)})"
        timed = [r["wall_time_s"] for r in runs if not r.get("resumed")]
        if timed:
            by_time.errorbar(statistics.mean(timed), statistics.mean(accs), yerr=half, marker="o",
                             capsize=3, label=label, linestyle="none")  # fmt: skip
        if all("steps" in r for r in runs):
            passes = statistics.mean(passes_per_step(r) for r in runs)
            by_passes.errorbar(passes, statistics.mean(accs), yerr=half, marker="o", capsize=3, label=label,
                               linestyle="none")  # fmt: skip
    by_time.set(title=_group_title(group), xlabel="wall time per run (s)", ylabel="clean test accuracy (%)")
    by_passes.set(title=_group_title(group), xlabel="forward-backward passes per optimizer step")
    for ax in (by_time, by_passes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hessian(records: list[dict], path: str, variants: list[str]) -> None:
    """The Hessian's top eigenvalue per variant and regime (each dot a seed, the bar the mean)."""
    measured = [r for r in records if r.get("hessian_top_eigenvalue") is not None]
    groups = _group_order({r["group"] for r in measured})
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 4), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        present = [v for v in variants if any(r["group"] == group and r["variant"] == v for r in measured)]
        for i, variant in enumerate(present):
            values = [
                r["hessian_top_eigenvalue"]
                for r in measured
                if r["group"] == group and r["variant"] == variant
            ]
            ax.bar(i, statistics.mean(values), alpha=0.4)
            ax.scatter([i] * len(values), values, s=10, color="k")
        ax.set_xticks(range(len(present)), present, rotation=60, ha="right", fontsize=7)
        ax.set_title(_group_title(group), fontsize=9)
        ax.set_yscale("log")
    axes[0][0].set_ylabel("Hessian top eigenvalue (training loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pair_tables(records: list[dict], pairs: list[tuple[str, str]]) -> str:
    """Markdown: for each model and regime holding both, the paired difference a - b of each pair
    (seed by seed, with its 95% interval): comparisons the main table does not make, such as two
    methods at the same radius."""
    acc = _by_cell(records, "final_test_accuracy")
    lines = []
    for model in dict.fromkeys(r["model"] for r in records):
        for group in _group_order({g for (m, g, _) in acc if m == model}):
            rows = [
                f"| {a} − {b} | {_fmt(paired_difference(acc[(model, group, a)], acc[(model, group, b)]))} |"
                for a, b in pairs
                if (model, group, a) in acc and (model, group, b) in acc
            ]
            if rows:
                lines += ["", f"**{model}, {_group_title(group)}: paired comparisons**", "",
                          "| a − b | Δ acc. [95% CI], differs? |", "|---|---|", *rows]  # fmt: skip
    return "\n".join(lines) + "\n" if lines else ""


def write_separation_report(
    records: list[dict],
    out_dir: str,
    variants: list[str],
    budget_text: str,
    pairs: list[tuple[str, str]] = (),
) -> str:
    """results.md with the tables (and the paired comparisons of ``pairs``), and the three plots;
    returns the Markdown."""
    ordered = list(dict.fromkeys([*variants, *(r["variant"] for r in records)]))
    text = budget_text + "\n" + separation_tables(records, ordered) + pair_tables(records, list(pairs))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    plot_accuracy_vs_noise(records, os.path.join(out_dir, "accuracy_vs_noise.png"), list(variants))
    groups = {r["group"] for r in records}
    for group in groups:
        if any(r["group"] == group and (r.get("sam_start") or r.get("sam_interval", 1) > 1) for r in records):
            plot_accuracy_vs_cost(
                records, os.path.join(out_dir, f"accuracy_vs_time_{group}.png"), group, ordered
            )
    plot_hessian(records, os.path.join(out_dir, "hessian_top_eigenvalue.png"), ordered)
    return text
