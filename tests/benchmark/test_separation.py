"""The separation study: label noise, small sets, paired statistics, and its report."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from script_loader import load_script

from zsam_hf.benchmark.separation import paired_difference, t_quantile_975
from zsam_hf.vision.data import noisy_labels
from zsam_hf.vision.image_classification import DataArguments, ModelArguments, build_trainer


# ---- label noise ---------------------------------------------------------------------------------
def test_noisy_labels_replace_the_fraction_fixed_by_the_seed():
    labels = np.arange(10_000) % 10
    noisy = noisy_labels(labels, 0.4, 10, seed=3)
    changed = noisy != labels
    # 4,000 rows are redrawn; a redrawn label keeps its old class 1 time in 10
    assert 0.36 * 10_000 - 150 < changed.sum() < 0.36 * 10_000 + 150
    assert np.array_equal(noisy, noisy_labels(labels, 0.4, 10, seed=3))  # the same for every variant
    assert not np.array_equal(noisy, noisy_labels(labels, 0.4, 10, seed=4))  # another seed, other noise
    counts = np.bincount(noisy[changed], minlength=10)
    assert counts.min() > 0.7 * counts.mean()  # uniformly random classes
    assert np.array_equal(noisy_labels(labels, 0.0, 10, seed=3), labels)
    with pytest.raises(ValueError, match=r"train_label_noise=1\.5 is invalid"):
        noisy_labels(labels, 1.5, 10, seed=0)


def test_bad_label_noise_is_refused_naming_the_field():
    with pytest.raises(
        ValueError, match=r"train_label_noise=-0\.1 is invalid: expected a fraction in \[0, 1\]"
    ):
        DataArguments(dataset_name="digits", train_label_noise=-0.1)


def _built(tmp_path, noise: float):
    from zsam_hf import ZSAMTrainingArguments

    args = ZSAMTrainingArguments(
        output_dir=str(tmp_path / f"n{noise}"),
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,
        seed=7,
    )
    data = DataArguments(
        dataset_name="digits", eval_split="test", max_train_samples=600, train_label_noise=noise
    )
    return build_trainer(ModelArguments(model_name_or_path="cifar_resnet20"), data, args)


def test_noise_reaches_the_training_labels_only(tmp_path):
    clean, noisy = _built(tmp_path, 0.0), _built(tmp_path, 0.5)
    assert noisy.train_true_labels == clean.train_labels  # the same images, their true labels kept
    trained = np.array(noisy.train_labels)
    assert np.array_equal(trained, noisy_labels(np.array(clean.train_labels), 0.5, 10, seed=7))
    served = [noisy.trainer.train_dataset[i]["labels"] for i in range(600)]
    assert served == noisy.train_labels  # the Trainer trains on the noisy labels
    assert [noisy.trainer.eval_dataset[i]["labels"] for i in range(50)] == [
        clean.trainer.eval_dataset[i]["labels"] for i in range(50)
    ]  # the test set is clean
    assert [noisy.train_images[i]["labels"] for i in range(600)] == clean.train_labels


# ---- paired statistics -----------------------------------------------------------------------------
def test_paired_difference_against_scipy():
    from scipy import stats

    a = {0: 0.71, 1: 0.69, 2: 0.74, 3: 0.70, 4: 0.72}
    b = {0: 0.66, 1: 0.67, 2: 0.70, 3: 0.68, 4: 0.65, 9: 0.1}  # seed 9 has no pair: left out
    d = [a[s] - b[s] for s in range(5)]
    low, high = stats.t.interval(0.95, 4, loc=statistics.mean(d), scale=stats.sem(d))
    p = paired_difference(a, b)
    assert (p.n, p.mean) == (5, pytest.approx(statistics.mean(d)))
    assert (p.low, p.high) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    assert p.separates
    same = paired_difference({0: 0.7, 1: 0.6}, {0: 0.65, 1: 0.66})
    assert same.low < 0 < same.high and not same.separates
    assert not paired_difference({0: 0.9}, {0: 0.1}).separates  # one seed proves nothing
    for df in (1, 4, 9, 30):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    assert t_quantile_975(100) == pytest.approx(1.96)
    assert math.isinf(t_quantile_975(0))


# ---- the study end to end ----------------------------------------------------------------------------
STUDY = [
    "--study", "separation", "--dataset_name", "digits", "--models", "cifar_resnet20", "--variants", "none",
    "sam", "--seeds", "0", "1", "--epochs", "1", "--max_train_samples", "200", "--label_noise", "0", "0.4",
    "--noise_extra_variants", "zsam-global-start0.5", "--small_data", "120", "--small_data_epochs", "2",
    "--batch_size", "64", "--warmup_epochs", "0", "--schedule", "cosine", "--no_augment", "--hessian_samples",
    "32", "--hessian_iterations", "3", "--trace_samples", "2", "--flatness_samples", "50",
    "--flatness_directions", "1", "--flatness_radii", "0.01",
]  # fmt: skip


def test_separation_study_runs_every_cell_and_reports_paired_intervals(tmp_path):
    script = load_script("benchmark_optimizers")
    out = tmp_path / "study"
    assert script.main([*STUDY, "--output_dir", str(out), "--shard", "0/2"]) == 0
    half = {r["name"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert script.main([*STUDY, "--output_dir", str(out), "--shard", "1/2"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (2 + 3 + 2) and len(half) == 7  # seeds x (noise 0, noise 0.4 + extra, small)
    cells = {(r["group"], r["variant"], r["seed"]) for r in records}
    assert ("noise0.4", "zsam-global-start0.5", 1) in cells and ("small120", "sam", 0) in cells
    assert ("noise0", "zsam-global-start0.5", 0) not in cells  # the extras run at 40% only
    # paired on the initial weights too: every run of a seed starts from the same ones, although the
    # two shards ran their runs in different orders in this one process
    starts = {seed: {r["initial_weights"] for r in records if r["seed"] == seed} for seed in (0, 1)}
    assert all(len(digests) == 1 for digests in starts.values()) and starts[0] != starts[1], starts
    for r in records:
        assert r["hessian_top_eigenvalue"] > 0 and r["hessian_samples"] == 32
        assert 0 <= r["train_accuracy_true_labels"] <= 1
    late = [r for r in records if r["variant"] == "zsam-global-start0.5"]
    assert all(r["sam_start"] == 0.5 and 0.3 < r["mean_sam_steps_fraction"] < 0.7 for r in late)
    noisy = [r for r in records if r["group"] == "noise0.4"]
    assert all(r["label_noise"] == 0.4 and r["budget"]["schedule"] == "cosine" for r in noisy)
    table = (out / "results.md").read_text()
    assert (
        "**cifar_resnet20, 40% label noise**" in table
        and "**cifar_resnet20, 120 clean training images**" in table
    )
    assert "| zsam-global-start0.5 | 2 |" in table and "vs none: Δ acc. [95% CI], differs?" in table
    for png in ("accuracy_vs_noise.png", "accuracy_vs_time_noise0.4.png", "hessian_top_eigenvalue.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_wall_time_counts_only_runs_timed_start_to_finish():
    from zsam_hf.benchmark.separation import separation_tables

    def record(seed, accuracy, wall, resumed):
        return {"model": "m", "group": "noise0.4", "variant": "sam", "seed": seed, "final_test_accuracy": accuracy,
                "wall_time_s": wall, "resumed": resumed}  # fmt: skip

    table = separation_tables([record(0, 0.7, 200.0, False), record(1, 0.72, 3.0, True)], ["sam"])
    row = next(line for line in table.splitlines() if line.startswith("| sam |"))
    assert "| 200 |" in row and "| 2 |" in row  # n counts both; the time only the unresumed run


def test_pair_tables_compare_two_variants_seed_by_seed():
    from zsam_hf.benchmark.separation import pair_tables

    def record(variant, seed, accuracy):
        return {
            "model": "m",
            "group": "noise0.4",
            "variant": variant,
            "seed": seed,
            "final_test_accuracy": accuracy,
        }

    b = {0: 0.680, 1: 0.710, 2: 0.700}
    wide = {0: 0.700, 1: 0.740, 2: 0.710}  # - b: +2, +3, +1 points, sd 1
    tight = {0: 0.700, 1: 0.735, 2: 0.715}  # - b: +2, +2.5, +1.5 points, sd 0.5
    records = [
        record(name, s, v)
        for name, acc in (("b", b), ("wide", wide), ("tight", tight))
        for s, v in acc.items()
    ]
    records.append(record("c", 0, 0.5))  # one seed only
    text = pair_tables(records, [("wide", "b"), ("tight", "b"), ("wide", "c"), ("wide", "missing")])
    for name, sd, verdict in (("wide", 1.0, "no"), ("tight", 0.5, "**yes**")):
        half = 4.303 * sd / 3**0.5  # t(0.975, 2) sd(d) / sqrt(n)
        assert f"| {name} − b | +2.00 [{2 - half:+.2f}, {2 + half:+.2f}] {verdict} |" in text, text
    assert "| wide − c | +20.00 (n=1) |" in text and "missing" not in text
    assert pair_tables(records, [("b", "missing")]) == ""
