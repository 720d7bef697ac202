"""The controls study: does the z-score choice of entries matter, and does any variant beat SAM when
every method runs at its own best radius?

Two phases per label-noise level, on the separation study's setup:

1. **radius search** (one seed): every method at every *effective* radius ||e|| in ``radii``, scored
   on a validation split carved from the training pool and labelled with the training noise (what a
   user tuning on their own data has). Methods normalized per tensor climb about rho sqrt(T) (T
   weight tensors), so they run at rho = ||e|| / sqrt(T);
2. **final runs** (several seeds): each method at the radius its validation accuracy selected, plus
   the random control at the radius and normalization ZSAM selected (``random-matched``), with the
   Hessian figures; compared seed by seed with paired 95% intervals (``separation.py``).

The runs are ordinary grid runs (``grid.run_one``): resumable, one line each in ``results.jsonl``.
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from .grid import VARIANTS, Budget, RunSpec  # noqa: E402
from .separation import pair_tables, separation_tables  # noqa: E402

METHODS = ("none", "sam", "zsam-global", "zsam-tensor", "random-global", "random-tensor", "sam-tensor")
RADII = (0.02, 0.05, 0.1, 0.2, 0.5)
MATCHED = "random-matched"  # the random control where ZSAM's own selection put it


def per_tensor(method: str) -> bool:
    return VARIANTS[method].get("zsam_normalization") == "tensor"


def rho_for(method: str, radius: float, weight_tensors: int) -> float:
    """The rho that gives ``method`` an ascent of norm about ``radius``."""
    return radius / math.sqrt(weight_tensors) if per_tensor(method) else radius


def weight_tensor_count(model_name: str, num_labels: int = 10, image_size: int = 28) -> int:
    """T: the model's weight tensors (ndim > 1), each scaled to rho under the per-tensor split."""
    from ..vision.models import Preprocessing, build_model

    built = build_model(model_name, [str(i) for i in range(num_labels)], Preprocessing(image_size, (0.5,) * 3,
                        (0.5,) * 3, 3), pretrained=False)  # fmt: skip
    return sum(p.ndim > 1 for p in built.model.parameters() if p.requires_grad)


def search_group(noise: float) -> str:
    return f"search-noise{noise:g}"


def final_group(noise: float) -> str:
    return f"final-noise{noise:g}"


def search_specs(model: str, budget: Budget, methods, radii, seed: int, weight_tensors: int) -> list[RunSpec]:
    """Every method at every effective radius (the base optimizer once), one seed."""
    group = search_group(budget.label_noise)
    specs = [RunSpec(model, "none", seed, budget, group=group)] if "none" in methods else []
    for radius in radii:
        for method in methods:
            if method != "none":
                rho = round(rho_for(method, radius, weight_tensors), 6)
                specs.append(RunSpec(model, method, seed, budget, {"sam_rho": rho}, group=group))
    return specs


def selections(records: list[dict], specs: list[RunSpec]) -> dict[str, dict] | None:
    """Each method's selected run of the search (best validation accuracy; ties: the smaller rho), or
    None while a search run of ``specs`` is missing."""
    by_key = {r["key"]: r for r in records}
    if any(spec.key() not in by_key for spec in specs):
        return None
    return _chosen_from([by_key[spec.key()] for spec in specs])


def best_zsam(chosen: dict[str, dict]) -> dict | None:
    """ZSAM's own selection over both normalizations (what a user tuning ZSAM would keep)."""
    zsam = [chosen[m] for m in ("zsam-global", "zsam-tensor") if m in chosen]
    return max(zsam, key=lambda r: r["validation_accuracy"]) if zsam else None


def matched_control(chosen: dict[str, dict]) -> str | None:
    """The runs that serve as the random control at ZSAM's selection: the random control of ZSAM's
    normalization when its own search selected the same rho (the same runs: masks come from seed and
    step), else the extra ``random-matched`` runs; None without a ZSAM method."""
    zsam = best_zsam(chosen)
    if zsam is None:
        return None
    own = f"random-{zsam['zsam_normalization']}"
    return own if own in chosen and chosen[own].get("sam_rho") == zsam["sam_rho"] else MATCHED


def final_specs(model: str, budget: Budget, chosen: dict[str, dict], seeds) -> list[RunSpec]:
    """Each method at its selected rho for every seed, and the random control at ZSAM's selection
    where no method's selection already runs it (``matched_control``)."""
    group = final_group(budget.label_noise)
    zsam = best_zsam(chosen)
    extra_matched = matched_control(chosen) == MATCHED
    specs = []
    for seed in seeds:
        for method, record in chosen.items():
            overrides = {} if method == "none" else {"sam_rho": record["sam_rho"]}
            specs.append(RunSpec(model, method, seed, budget, overrides, group=group))
        if extra_matched:
            overrides = {"sam_rho": zsam["sam_rho"], "zsam_normalization": zsam["zsam_normalization"]}
            specs.append(RunSpec(model, MATCHED, seed, budget, overrides, group=group))
    return specs


def paired_questions(chosen: dict[str, dict]) -> list[tuple[str, str]]:
    """The comparisons that answer the study's questions (the main table adds each vs none and vs sam)."""
    pairs = []
    zsam = best_zsam(chosen)
    if zsam is not None:  # the filter against random entries, same radius and split
        pairs.append((zsam["variant"], matched_control(chosen)))
    for pair in [("sam-tensor", "sam"), ("zsam-global", "random-global"), ("zsam-tensor", "random-tensor")]:
        if pair not in pairs:
            pairs.append(pair)
    return pairs


# ---- the report ----------------------------------------------------------------------------------
def effective_radius(record: dict) -> float:
    """The mean logged ||e|| of a run (what 'radius' means across normalizations)."""
    return record.get("mean_perturbation_norm") or 0.0


def search_table(records: list[dict], chosen: dict[str, dict], methods, radii, weight_tensors: int) -> str:
    """Markdown: validation (and clean test) accuracy of each method at each effective radius (the base
    optimizer, which has none, in the first column)."""
    cells = {(r["variant"], _radius_of(r, weight_tensors)): r for r in records}
    header = "| method | " + " | ".join(f"‖e‖ {r:g}" for r in radii) + " | selected rho |"
    lines = [header, "|---|" + "---|" * (len(radii) + 1)]
    for method in methods:
        row = [method]
        for i, radius in enumerate(radii):
            r = (
                cells.get((method, radius))
                if method != "none"
                else cells.get(("none", None))
                if i == 0
                else None
            )
            if r is None:
                row.append("–")
                continue
            mark = "**" if chosen.get(method) is r else ""
            row.append(
                f"{mark}{100 * r['validation_accuracy']:.1f}{mark} ({100 * r['final_test_accuracy']:.1f})"
            )
        selected = chosen.get(method)
        row.append(
            "–" if selected is None or selected.get("sam_rho") is None else f"{selected['sam_rho']:.4g}"
        )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _radius_of(record: dict, weight_tensors: int) -> float | None:
    rho = record.get("sam_rho")
    if record["variant"] == "none" or rho is None:
        return None
    factor = math.sqrt(weight_tensors) if per_tensor(record["variant"]) else 1.0
    return round(rho * factor, 4)


def plot_accuracy_vs_radius(
    records: list[dict],
    chosen: dict[str, dict],
    path: str,
    methods,
    weight_tensors: int,
    title: str,
    radii=RADII,
    noisy: bool = True,
) -> None:
    """Validation and clean test accuracy against the measured ||e|| per method, log axis, the selected
    point of each method circled; the base optimizer as a horizontal line. ``noisy``: the validation
    labels carry the training noise (the axis says so)."""
    validation = "validation accuracy, noisy labels (%)" if noisy else "validation accuracy (%)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, key, label in zip(axes, ("validation_accuracy", "final_test_accuracy"),
                              (validation, "clean test accuracy (%)")):  # fmt: skip
        for method in methods:
            runs = sorted((r for r in records if r["variant"] == method), key=effective_radius)
            if method == "none":
                for r in runs:
                    ax.axhline(100 * r[key], color="k", linestyle=":", label="none")
                continue
            if not runs:
                continue
            line = ax.plot([effective_radius(r) for r in runs], [100 * r[key] for r in runs], "o-",
                           label=method, markersize=4)[0]  # fmt: skip
            selected = chosen.get(method)
            if selected is not None:
                ax.plot([effective_radius(selected)], [100 * selected[key]], "o", markersize=12, fillstyle="none",
                        color=line.get_color())  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.FixedLocator(list(radii)))  # the searched radii, labelled plainly
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set(xlabel="measured ‖e‖ (log scale)", ylabel=label, title=title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_controls_report(
    records: list[dict], out_dir: str, levels, methods, radii, weight_tensors: int, budget_text: str
) -> str:
    """results.md (search tables, final tables with paired intervals) and one radius plot per level."""
    parts = [budget_text, ""]
    for noise in levels:
        search = [r for r in records if r["group"] == search_group(noise)]
        final = [r for r in records if r["group"] == final_group(noise)]
        if not search:
            continue
        expected = (1 if "none" in methods else 0) + len([m for m in methods if m != "none"]) * len(radii)
        complete = len({r["key"] for r in search}) >= expected
        chosen = _chosen_from(search) if complete else {}  # no selection from a partial search
        plot = f"accuracy_vs_radius_noise{noise:g}.png"
        plot_accuracy_vs_radius(search, chosen, os.path.join(out_dir, plot), methods, weight_tensors,
                                f"{100 * noise:.0f}% label noise", radii, noisy=noise > 0)  # fmt: skip
        parts += [f"## {100 * noise:.0f}% label noise", "",
                  f"Radius search ({len(search)} of {expected} runs, seed {search[0]['seed']}): validation accuracy % "
                  + ("(noisy labels, as trained)" if noise > 0 else "(labels as trained: no noise)")
                  + " and clean test accuracy % in brackets; "
                  + ("the selected radius in bold." if complete else "incomplete, so nothing is selected yet."), "",
                  search_table(search, chosen, methods, radii, weight_tensors), f"![accuracy against radius]({plot})", ""]  # fmt: skip
        rows = [*methods, MATCHED] if matched_control(chosen) == MATCHED else list(methods)
        # random-matched runs made before the rule that reuses the random control's own selection
        final = [r for r in final if r["variant"] in rows]
        if final:
            seeds = sorted({r["seed"] for r in final})
            parts += [f"Final runs at the selected radii ({len(final)} runs, seeds {seeds}):",
                      separation_tables(final, rows), pair_tables(final, paired_questions(chosen))]  # fmt: skip
    text = "\n".join(parts)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text


def _chosen_from(search: list[dict]) -> dict[str, dict]:
    """Each method's run with the best validation accuracy (ties: the smaller rho)."""
    chosen: dict[str, dict] = {}
    for r in search:
        best = chosen.get(r["variant"])
        if best is None or (r["validation_accuracy"], -(r.get("sam_rho") or 0)) > (
            best["validation_accuracy"],
            -(best.get("sam_rho") or 0),
        ):
            chosen[r["variant"]] = r
    return chosen
