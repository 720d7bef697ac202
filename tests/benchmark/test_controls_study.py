"""The controls study, shrunk: radius search on a noisy validation split, selection, final runs, report."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
from script_loader import load_script

from zsam_hf import ZSAMTrainingArguments
from zsam_hf.vision.image_classification import DataArguments, ModelArguments, build_trainer, prepare_data


def test_the_validation_split_carries_the_training_noise_and_the_test_split_stays_clean(tmp_path):
    args = ZSAMTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none",
                                 remove_unused_columns=False, seed=3)  # fmt: skip
    data = DataArguments(dataset_name="digits", eval_split="auto", eval_label_noise=True, train_label_noise=0.5,
                         train_val_split=0.3)  # fmt: skip
    built = build_trainer(ModelArguments(model_name_or_path="cifar_resnet20"), data, args)
    raw = prepare_data(ModelArguments(model_name_or_path="cifar_resnet20"), data, seed=3).eval
    assert "clean_label" in raw.column_names
    labels = np.array([row["labels"] for row in raw])
    clean = np.array(raw.with_format(None)["clean_label"])
    changed = float((labels != clean).mean())  # half redrawn, a tenth of those to their own class
    assert 0.33 < changed < 0.57, changed
    assert built.test is not None and "clean_label" not in built.test.column_names


def test_the_controls_study_selects_each_radius_on_validation_and_compares_at_it(tmp_path):
    script = load_script("benchmark_optimizers")
    out = tmp_path / "controls"
    argv = ["--study", "controls", "--dataset_name", "digits", "--models", "cifar_resnet20",
            "--methods", "none", "zsam-tensor", "random-tensor", "--radii", "0.05", "0.2",
            "--seeds", "0", "1", "--label_noise", "0.4", "--epochs", "1", "--max_train_samples", "64",
            "--batch_size", "32", "--validation_samples", "64", "--no_augment", "--warmup_epochs", "0",
            "--schedule", "cosine", "--flatness_samples", "16", "--flatness_directions", "1",
            "--hessian_samples", "16", "--hessian_iterations", "2", "--trace_samples", "1",
            "--output_dir", str(out)]  # fmt: skip
    assert script.main(argv) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    search = [r for r in records if r["group"] == "search-noise0.4"]
    final = [r for r in records if r["group"] == "final-noise0.4"]
    best = {}
    for r in search:
        if r["variant"] not in best or r["validation_accuracy"] > best[r["variant"]]["validation_accuracy"]:
            best[r["variant"]] = r
    # the random control's own selection at ZSAM's rho already is the matched control: no extra runs
    duplicate = best["random-tensor"]["sam_rho"] == best["zsam-tensor"]["sam_rho"]
    assert len(search) == 1 + 2 * 2 and len(final) == 2 * (3 + (0 if duplicate else 1))

    from zsam_hf.vision.models import Preprocessing, build_model

    model = build_model(
        "cifar_resnet20", [str(i) for i in range(10)], Preprocessing(8, (0.5,) * 3, (0.5,) * 3, 3)
    )
    weight_tensors = sum(p.ndim > 1 for p in model.model.parameters())
    for r in search:
        if r["variant"] == "none":
            continue
        radius = r["sam_rho"] * (math.sqrt(weight_tensors) if r["variant"].endswith("tensor") else 1)
        assert round(radius, 4) in (0.05, 0.2)
        # measured ||e||: rho for SAM; about rho sqrt(T) for the per-tensor split (norm layers add a little)
        assert 0.9 * radius <= r["mean_perturbation_norm"] <= 1.05 * radius, r["name"]
        assert 0 <= r["validation_accuracy"] <= 1 and r["validation_samples"] == 64
    for r in final:
        if r["variant"] in ("zsam-tensor", "random-tensor"):
            assert r["sam_rho"] == best[r["variant"]]["sam_rho"]  # each method at its own selection
        if r["variant"] == "random-matched":
            assert r["sam_rho"] == best["zsam-tensor"]["sam_rho"] and r["zsam_normalization"] == "tensor"
        assert r.get("hessian_top_eigenvalue") is not None
    digests = defaultdict(set)
    for r in final:
        digests[r["seed"]].add(r["initial_weights"])
    assert all(len(d) == 1 for d in digests.values()) and digests[0] != digests[1]
    report = (out / "results.md").read_text()
    assert (
        "Radius search" in report
        and f"zsam-tensor − {'random-tensor' if duplicate else 'random-matched'}" in report
        and ("| random-matched |" in report) == (not duplicate)
        and "| sam-tensor − sam |" not in report
    )
    assert (out / "accuracy_vs_radius_noise0.4.png").stat().st_size > 5000


def _chosen(**rhos):
    norm = {
        "zsam-global": "global",
        "zsam-tensor": "tensor",
        "random-global": "global",
        "random-tensor": "tensor",
    }
    return {
        m: {
            "variant": m,
            "sam_rho": rho,
            "validation_accuracy": acc,
            "zsam_normalization": norm.get(m, "global"),
        }
        for m, (rho, acc) in rhos.items()
    }


def test_the_matched_random_control_runs_only_where_no_selection_already_ran_it():
    """ZSAM's best is per-tensor at rho 0.11: when the per-tensor random control selected 0.11 too, its runs
    are the matched control (no duplicate runs); when it selected another rho, random-matched runs at 0.11."""
    from zsam_hf.benchmark import controls
    from zsam_hf.benchmark.grid import Budget

    budget = Budget(label_noise=0.4)
    same = _chosen(**{"zsam-global": (0.5, 0.50), "zsam-tensor": (0.11, 0.52), "random-tensor": (0.11, 0.51)})
    other = _chosen(
        **{"zsam-global": (0.5, 0.50), "zsam-tensor": (0.11, 0.52), "random-tensor": (0.045, 0.51)}
    )
    assert controls.matched_control(same) == "random-tensor"
    assert controls.matched_control(other) == controls.MATCHED
    assert [s.variant for s in controls.final_specs("m", budget, same, [0])] == list(same)
    extra = controls.final_specs("m", budget, other, [0, 1])
    matched = [s for s in extra if s.variant == controls.MATCHED]
    assert [s.seed for s in matched] == [0, 1]
    assert all(s.overrides == {"sam_rho": 0.11, "zsam_normalization": "tensor"} for s in matched)
    assert controls.paired_questions(same)[0] == ("zsam-tensor", "random-tensor")
    assert controls.paired_questions(same).count(("zsam-tensor", "random-tensor")) == 1
    assert controls.paired_questions(other)[0] == ("zsam-tensor", controls.MATCHED)


def test_the_report_names_the_validation_labels_as_they_were_at_each_noise_level(tmp_path):
    """Validation labels carry the training noise: the 40% level's table says "noisy labels", the 0% level's
    must not (nothing was flipped); a partial search selects nothing."""
    from zsam_hf.benchmark import controls

    def run(noise, variant, rho, accuracy):
        return {"group": controls.search_group(noise), "key": f"{noise}-{variant}-{rho}", "seed": 0,
                "variant": variant, "sam_rho": rho, "validation_accuracy": accuracy,
                "final_test_accuracy": accuracy, "mean_perturbation_norm": rho}  # fmt: skip

    records = [run(level, m, rho, 0.8) for level in (0.4, 0.0) for m, rho in (("none", None), ("sam", 0.05))]
    report = controls.write_controls_report(
        records,
        str(tmp_path),
        [0.4, 0.0],
        ["none", "sam"],
        [0.05, 0.1],
        weight_tensors=20,
        budget_text="budget",
    )
    noisy, clean = report.split("## 0% label noise")
    assert "## 40% label noise" in noisy and "(noisy labels, as trained)" in noisy
    assert "noisy" not in clean and "(labels as trained: no noise)" in clean
    assert (
        noisy.count("incomplete, so nothing is selected yet") == clean.count("nothing is selected yet") == 1
    )
    assert (tmp_path / "accuracy_vs_radius_noise0.png").stat().st_size > 5000
