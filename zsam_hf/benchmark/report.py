"""Tables and plots of a benchmark grid: mean +- std over seeds, curves, sensitivity."""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = [
    "name",
    "group",
    "model",
    "variant",
    "seed",
    "overrides",
    "final_test_accuracy",
    "best_test_accuracy",
    "final_test_loss",
    "train_loss",
    "wall_time_s",
    "mean_sharpness",
    "mean_perturbation_norm",
    "mean_zsam_kept_fraction",
    "steps",
    "resumed",
    "device",
]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _groups(records: list[dict], group: str) -> dict[tuple[str, str], list[dict]]:
    by = defaultdict(list)
    for r in records:
        if r["group"] == group:
            by[(r["model"], r["variant"])].append(r)
    return by


def _grid_models(records: list[dict]) -> list[str]:
    """Models of the main grid, in the order their first run appears."""
    return list(dict.fromkeys(r["model"] for r in records if r["group"] == "grid"))


def _flatness_keys(records: list[dict]) -> list[str]:
    """The flatness@r keys present, by increasing radius r."""
    return sorted({k for r in records for k in r if k.startswith("flatness@")}, key=lambda k: float(k[9:]))


def _panels_per_model(models: list[str]):
    """One figure with a panel per model (at least one panel)."""
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 4), squeeze=False)
    return fig, axes[0]


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(records: list[dict], out_dir: str, variants: list[str], budget_text: str) -> str:
    """results.json, results.csv and results.md (mean +- std over seeds); returns the Markdown."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    flat_keys = _flatness_keys(records)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + flat_keys, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "overrides": json.dumps(r.get("overrides", {}))})

    grid = _groups(records, "grid")
    lines = [budget_text, ""]
    flat_headers = "".join(f" loss increase @ r={k[9:]} |" for k in flat_keys)
    header = f"| model | variant | n | test acc. (final) | test acc. (best epoch) | test loss |{flat_headers}"
    header += " mean sharpness | wall time (s) |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for model in _grid_models(records):
        for variant in variants:
            runs = grid.get((model, variant), [])
            if not runs:
                continue
            cells = [model, variant, str(len(runs))]
            for key, scale in (
                ("final_test_accuracy", 100),
                ("best_test_accuracy", 100),
                ("final_test_loss", 1),
            ):
                mean, std = _mean_std([r[key] * scale for r in runs])
                cells.append(f"{mean:.2f} ± {std:.2f}" if scale == 100 else f"{mean:.4f} ± {std:.4f}")
            for key in flat_keys:
                mean, std = _mean_std([r[key] for r in runs])
                cells.append(f"{mean:.4f} ± {std:.4f}")
            sharp = [r["mean_sharpness"] for r in runs if r.get("mean_sharpness") is not None]
            cells.append(f"{statistics.mean(sharp):.4f}" if sharp else "–")
            cells.append(f"{statistics.mean(r['wall_time_s'] for r in runs):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    sweep = [r for r in records if r["group"] == "sweep"]
    if sweep:
        lines += [
            "",
            "Sensitivity sweep (zsam, global normalization):",
            "",
            "| setting | test acc. |",
            "|---|---|",
        ]
        for r in sorted(sweep, key=lambda r: json.dumps(r["overrides"], sort_keys=True)):
            setting = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
            lines.append(f"| {setting} (seed {r['seed']}) | {100 * r['final_test_accuracy']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text


def plot_accuracy(records: list[dict], path: str, variants: list[str]) -> None:
    grid = _groups(records, "grid")
    models = _grid_models(records)
    fig, axes = _panels_per_model(models)
    for ax, model in zip(axes, models):
        names = [v for v in variants if (model, v) in grid]
        stats = [_mean_std([100 * r["final_test_accuracy"] for r in grid[(model, v)]]) for v in names]
        ax.bar(
            names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="tab:blue", alpha=0.8
        )
        for i, v in enumerate(names):
            ax.scatter(
                [i] * len(grid[(model, v)]),
                [100 * r["final_test_accuracy"] for r in grid[(model, v)]],
                color="black",
                s=10,
                zorder=3,
            )
        low = min(m - s for m, s in stats) if stats else 0
        ax.set_ylim(max(0, low - 3), min(100, max(m + s for m, s in stats) + 1.5) if stats else 100)
        ax.set_title(model)
        ax.set_ylabel("test accuracy (%)")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Final test accuracy: mean ± std over seeds (dots: seeds)")
    _save(fig, path)


def plot_curves(records: list[dict], path: str, variants: list[str]) -> None:
    grid = _groups(records, "grid")
    models = _grid_models(records)
    fig, axes = _panels_per_model(models)
    for ax, model in zip(axes, models):
        for v in variants:
            runs = [r for r in grid.get((model, v), []) if r.get("curve_test_accuracy")]
            if not runs:
                continue
            length = min(len(r["curve_test_accuracy"]) for r in runs)
            epochs = runs[0]["curve_epoch"][:length]
            mean = [statistics.mean(100 * r["curve_test_accuracy"][i] for r in runs) for i in range(length)]
            ax.plot(epochs, mean, marker="o", label=v)
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_sensitivity(records: list[dict], path: str) -> bool:
    sweep = [r for r in records if r["group"] == "sweep"]
    if not sweep:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "zsam_quantile", "Q_p"), (axes[1], "sam_rho", "rho")):
        points = defaultdict(list)
        for r in sweep:
            if list(r["overrides"]) == [key]:
                points[r["overrides"][key]].append(100 * r["final_test_accuracy"])
        xs = sorted(points)
        ax.errorbar(
            xs,
            [statistics.mean(points[x]) for x in xs],
            yerr=[_mean_std(points[x])[1] for x in xs],
            marker="o",
            capsize=4,
        )
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"ZSAM sensitivity to {label}")
        if key == "sam_rho":
            ax.set_xscale("log")
    _save(fig, path)
    return True


def plot_flatness(records: list[dict], path: str, variants: list[str]) -> None:
    grid = _groups(records, "grid")
    models = _grid_models(records)
    keys = _flatness_keys(records)
    fig, axes = _panels_per_model(models)
    for ax, model in zip(axes, models):
        for v in variants:
            runs = grid.get((model, v), [])
            if runs and keys:
                ax.plot(
                    [float(k[9:]) for k in keys],
                    [statistics.mean(r[k] for r in runs) for k in keys],
                    marker="o",
                    label=v,
                )
        ax.set_title(model)
        ax.set_xlabel("relative perturbation norm r")
        ax.set_ylabel("test loss increase (mean)")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=8)
    _save(fig, path)


def _interval(run: dict) -> int:
    return int(run.get("sam_interval") or 1)


def cost_table(records: list[dict], variants: list[str]) -> str:
    """Accuracy against cost: wall time and time per epoch, each also relative to the base optimizer."""
    grid = _groups(records, "grid")
    header = (
        "| model | variant | k | n | test acc. (final) | wall time (s) | time / epoch (s) | "
        "time vs base | two-pass steps |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for model in _grid_models(records):
        base = grid.get((model, "none"))
        base_wall = statistics.mean(r["wall_time_s"] for r in base) if base else None
        for variant in variants:
            runs = grid.get((model, variant), [])
            if not runs:
                continue
            accuracy = _mean_std([100 * r["final_test_accuracy"] for r in runs])
            wall = _mean_std([r["wall_time_s"] for r in runs])
            per_epoch = statistics.mean(r["wall_time_s"] / r["epochs"] for r in runs if r.get("epochs"))
            fraction = [
                r["mean_sam_steps_fraction"] for r in runs if r.get("mean_sam_steps_fraction") is not None
            ]
            cells = [
                model,
                variant,
                "–" if variant == "none" else str(_interval(runs[0])),
                str(len(runs)),
                f"{accuracy[0]:.2f} ± {accuracy[1]:.2f}",
                f"{wall[0]:.0f} ± {wall[1]:.0f}",
                f"{per_epoch:.1f}",
                f"{wall[0] / base_wall:.2f}" if base_wall else "–",
                f"{100 * statistics.mean(fraction):.0f}%" if fraction else "0%",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_time(records: list[dict], path: str, variants: list[str]) -> None:
    """Test accuracy against wall time, one point per variant (mean ± std over seeds on both axes)."""
    grid = _groups(records, "grid")
    models = _grid_models(records)
    fig, axes = _panels_per_model(models)
    families = {"none": "black", "sam": "tab:blue", "zsam-global": "tab:red", "zsam-tensor": "tab:orange"}
    for ax, model in zip(axes, models):
        for variant in variants:
            runs = grid.get((model, variant), [])
            if not runs:
                continue
            family = variant.rsplit("-k", 1)[0] if "-k" in variant else variant
            accuracy = _mean_std([100 * r["final_test_accuracy"] for r in runs])
            wall = _mean_std([r["wall_time_s"] for r in runs])
            color = families.get(family, "tab:gray")
            ax.errorbar(wall[0], accuracy[0], xerr=wall[1], yerr=accuracy[1], fmt="o", color=color, capsize=3)
            label = "base" if variant == "none" else f"k={_interval(runs[0])}"
            ax.annotate(label, (wall[0], accuracy[0]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        for family, color in families.items():
            if any(v == family or v.startswith(family + "-k") for m, v in grid if m == model):
                ax.plot([], [], "o", color=color, label="base optimizer" if family == "none" else family)
        ax.set_title(model)
        ax.set_xlabel("wall time (s), mean ± std over seeds")
        ax.set_ylabel("final test accuracy (%)")
        ax.legend(fontsize=8)
    fig.set_size_inches(max(7, 5 * len(models)), 5)
    fig.suptitle("Accuracy against wall time (k: the two-pass step every k-th optimizer step)", fontsize=10)
    _save(fig, path)
