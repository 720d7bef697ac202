"""The optimizer-comparison grid: outputs, resume, schedule and flatness measure."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from script_loader import load_script as load_script_named
from toy import TinyClassifier, vector_dataset
from transformers import TrainerCallback

import zsam_hf.benchmark.grid as benchmark

ROOT = Path(__file__).resolve().parent.parent.parent


def load_script():
    return load_script_named("benchmark_optimizers")


TINY = [
    "--dataset_name",
    "digits",
    "--models",
    "cifar_resnet20",
    "--variants",
    "none",
    "zsam-global",
    "zsam-global-k2",
    "--seeds",
    "0",
    "--epochs",
    "2",
    "--max_train_samples",
    "300",
    "--batch_size",
    "64",
    "--warmup_epochs",
    "0.5",
    "--step_epochs",
    "1",
    "--flatness_samples",
    "100",
    "--flatness_directions",
    "2",
    "--flatness_radii",
    "0.01",
    "0.05",
    "--sweep_model",
    "cifar_resnet20",
    "--sweep_quantiles",
    "0.8",
    "--sweep_rhos",
    "0.1",
    "--sweep_epochs",
    "1",
    "--sweep_max_train_samples",
    "100",
]


def test_tiny_grid_writes_results_table_and_plots_then_resumes(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "grid"
    assert script.main([*TINY, "--output_dir", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    assert sorted((r["group"], r["variant"]) for r in records) == [
        ("grid", "none"),
        ("grid", "zsam-global"),
        ("grid", "zsam-global-k2"),
        ("sweep", "zsam-global"),
        ("sweep", "zsam-global"),
    ]
    grid = {r["variant"]: r for r in records if r["group"] == "grid"}
    for r in grid.values():
        assert 0 <= r["final_test_accuracy"] <= 1 and r["wall_time_s"] > 0
        assert len(r["curve_test_accuracy"]) == 2 and r["best_test_accuracy"] >= r["final_test_accuracy"]
        assert set(r) >= {"flatness@0.01", "flatness@0.05", "final_test_loss", "train_loss"}
    assert "mean_sharpness" in grid["zsam-global"] and "mean_sharpness" not in grid["none"]
    assert 0 < grid["zsam-global"]["mean_zsam_kept_fraction"] < 0.1
    table = (out / "results.md").read_text()
    assert (
        "| cifar_resnet20 | zsam-global | 1 |" in table
        and "Sensitivity sweep" in table
        and "Command:" in table
    )
    assert (out / "results.csv").read_text().count("\n") == 6
    assert grid["zsam-global-k2"]["sam_interval"] == 2 and grid["zsam-global"]["sam_interval"] == 1
    assert grid["zsam-global-k2"]["mean_sam_steps_fraction"] == pytest.approx(
        0.5
    )  # steps 0, 2, 4, 6, 8 of 10
    assert "| cifar_resnet20 | zsam-global-k2 | 2 | 1 |" in table and "| 50% |" in table  # the cost table
    for png in (
        "test_accuracy.png",
        "test_accuracy_curves.png",
        "flatness.png",
        "sensitivity.png",
        "accuracy_vs_time.png",
    ):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert json.loads((out / "budget.json").read_text())["args"]["epochs"] == 2

    capsys.readouterr()
    assert script.main([*TINY, "--output_dir", str(out)]) == 0  # everything done: nothing retrained
    assert capsys.readouterr().out.count("done already, skipped") == 5
    assert len(benchmark.load_results(str(out / "results.jsonl"))) == 5


class _KillAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("killed halfway")


def test_a_run_killed_halfway_is_resumed_and_counted_once(tmp_path, monkeypatch):
    budget = benchmark.Budget(
        dataset_name="digits",
        epochs=2,
        max_train_samples=200,
        batch_size=64,
        warmup_epochs=0.5,
        step_epochs=1,
    )
    spec = benchmark.RunSpec("cifar_resnet20", "sam", 0, budget)
    original = benchmark.build_trainer

    def build_and_kill(*args, **kwargs):
        built = original(*args, **kwargs)
        built.trainer.add_callback(_KillAfterFirstSave())
        return built

    monkeypatch.setattr(benchmark, "build_trainer", build_and_kill)
    with pytest.raises(KeyboardInterrupt):
        benchmark.run_grid([spec], str(tmp_path), [0.01], 1, 50)
    assert benchmark.load_results(str(tmp_path / "results.jsonl")) == []  # not counted half-done
    assert list((tmp_path / "runs" / spec.name).glob("checkpoint-*"))
    monkeypatch.setattr(benchmark, "build_trainer", original)
    [record] = benchmark.run_grid([spec], str(tmp_path), [0.01], 1, 50)
    assert record["resumed"] is True and record["steps"] == 2 * math.ceil(200 / 64)
    assert not (tmp_path / "runs" / spec.name).exists()  # checkpoints cleaned once recorded


def test_released_code_schedule_warms_up_then_steps():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    budget = benchmark.Budget(warmup_epochs=2, step_epochs=3, gamma=0.5)
    sched = benchmark.released_code_schedule(opt, steps_per_epoch=10, budget=budget)
    lrs = []
    for _ in range(90):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 20) and lrs[19] == pytest.approx(1.0)
    assert (
        lrs[20] == lrs[49] == pytest.approx(1.0)
        and lrs[50] == pytest.approx(0.5)
        and lrs[80] == pytest.approx(0.25)
    )


def test_flatness_measures_loss_increase_and_restores_weights():
    torch.manual_seed(0)
    model = TinyClassifier()
    data = vector_dataset(64)
    before = {n: p.clone() for n, p in model.state_dict().items()}

    class Wrapped(torch.nn.Module):  # flatness() expects model(**batch).loss
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, labels):
            out = self.inner(x, labels)
            return type("Out", (), {"loss": out["loss"]})()

    result = benchmark.flatness(Wrapped(model), data, [0.0, 0.5], directions=3, seed=0)
    assert result["flatness@0.0"] == pytest.approx(0.0, abs=1e-7)
    assert result["flatness@0.5"] > 0
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    # the same directions by hand: relative norm 0.5 per tensor
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # the 0.0 radius consumed three draws per tensor first
        for p in model.parameters():
            torch.randn(p.shape, generator=gen)
    x, labels = data[:]["x"], data[:]["labels"]
    base = torch.nn.functional.cross_entropy(model(x)["logits"], labels).item()
    increases = []
    with torch.no_grad():
        for _ in range(3):
            for p, w in zip(model.parameters(), before.values()):
                noise = torch.randn(w.shape, generator=gen)
                p.copy_(w + noise * (0.5 * w.norm() / noise.norm()))
            increases.append(torch.nn.functional.cross_entropy(model(x)["logits"], labels).item() - base)
    assert result["flatness@0.5"] == pytest.approx(sum(increases) / 3, rel=1e-4)


def test_memory_benchmark_measures_every_row_in_its_own_process(tmp_path):
    """scripts/benchmark_memory.py as a user runs it, shrunk: every row (the optimizer's and the Trainer's)
    runs in its own process and reports a peak per step and the resident memory before it. (The figures themselves vary by megabytes from
    process to process: the benchmark's spreads report that, a test cannot bound it.)"""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_memory.py"
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [sys.executable, str(script), "--width", "2048", "--depth", "2", "--batch", "8", "--repeats", "1",
         "--steps", "2", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    module = load_script_named("benchmark_memory")
    assert list(results) == [*module.ROWS, *module.TRAINER_ROWS]  # both front doors by default
    param_bytes = 2 * (2048 * 2048 + 2048) * 4
    for row, (run,) in results.items():
        assert run["param_bytes"] == param_bytes and len(run["step_peaks"]) == 2, row
        # the kernel's counters lag by up to a few pages per thread: a step's peak is its start, or higher
        assert all(
            peak >= before - 2**20 for peak, before in zip(run["step_peaks"], run["resident_before"])
        ), row
    assert "peak" in done.stdout and module.ROWS[5] in done.stdout
    # Each front door over its own base row: the Trainer's rows over the Trainer's plain step.
    assert f"over the {module.ROWS[0]} row's" in done.stdout
    assert f"over the {module.TRAINER_ROWS[0]} row's" in done.stdout and module.TRAINER_ROWS[2] in done.stdout


def test_the_memory_benchmark_leaves_out_the_third_party_row_where_its_package_does_not_import(
    monkeypatch, capsys
):
    """Without pytorch_optimizer (the benchmark extra), scripts/benchmark_memory.py measures every other row, the
    Trainer's included, and says why that one is missing, as benchmark_step.py does. The package is played
    missing by a None in ``sys.modules`` (an import of it then fails); with it present, its row is measured
    (the test above runs every row)."""
    module = load_script_named("benchmark_memory")
    missing = "SAM (pytorch_optimizer)"
    assert module.rows_to_measure(["optimizer", "trainer"]) == [*module.ROWS, *module.TRAINER_ROWS]
    assert "is not installed" not in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    assert module.rows_to_measure(["optimizer", "trainer"]) == [
        *(row for row in module.ROWS if row != missing),
        *module.TRAINER_ROWS,
    ]
    assert "pytorch_optimizer is not installed: its SAM row is left out" in capsys.readouterr().err
    assert module.rows_to_measure(["trainer"]) == list(module.TRAINER_ROWS)  # no row to leave out, no note
    assert "is not installed" not in capsys.readouterr().err


def test_the_step_benchmark_runs_through_the_trainer_and_prints_its_ratio(tmp_path):
    """A shrunk run of scripts/benchmark_step.py: every row steps through ZSAMTrainer.training_step."""
    import os
    import subprocess
    import sys

    from script_loader import ROOT

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_step.py"), "--workloads", "resnet10t@16x2",
         "--steps", "1", "--rounds", "1", "--warmup", "1", "--intervals", "2", "--no_released",
         "--json", str(tmp_path / "step.json")],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ZSAM (ours) / SAM step-time ratio" in done.stdout
    assert (tmp_path / "step.json").stat().st_size > 0


def test_the_optimizer_benchmark_runs_every_sam_and_prints_zsam_against_our_sam():
    """A shrunk ``--mode optimizer --captured`` run: every row (ours, the capturable ones, the re-created ones,
    pytorch_optimizer's) steps, and the summary gives ZSAM against our SAM (the issue's goal), against the
    fastest other SAM, and the capturable pair's ratio (eager on a CPU)."""
    import os
    import re
    import subprocess
    import sys

    from script_loader import ROOT

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_step.py"), "--mode", "optimizer", "--captured",
         "--workloads", "resnet10t@16x2", "--steps", "1", "--rounds", "1", "--warmup", "1"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for row in [
        "SAM (ours",
        "ZSAM (ours)",
        "ZSAM (released code)",
        "SAM (davda54",
        "SAM (pytorch_optimizer)",
        "SAM (ours, capturable)",
        "ZSAM (ours, capturable)",
    ]:
        assert row in done.stdout
    ratio = re.search(r"ZSAM \(ours\) / SAM \(ours\): ([0-9.]+) \(goal <= 1.03\)", done.stdout)
    assert ratio and float(ratio.group(1)) > 0, done.stdout
    captured = re.search(r"capturable \(eager\): ZSAM / SAM ([0-9.]+) \(goal <= 1.03\)", done.stdout)
    assert captured and float(captured.group(1)) > 0, done.stdout


def test_step_benchmark_phases_add_up_to_the_step(tmp_path):
    """``--phases``: SAM's and ZSAM's steps split into ascent forward/backward, perturb, descent and restore;
    every timed phase was reached (positive), the descent (the step's remainder) too, page faults are counted
    per phase, and only the two-pass rows are reported."""
    import json
    import os
    import subprocess
    import sys

    from script_loader import ROOT

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_step.py"), "--phases", "--workloads", "resnet10t@16x2",
         "--steps", "2", "--rounds", "1", "--warmup", "1", "--json", str(tmp_path / "phases.json")],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    phases = json.loads((tmp_path / "phases.json").read_text())["results"][0]["phases"]
    assert set(phases) == {"seconds", "minor_faults", "heap_change_bytes"}
    assert all(set(rows) == {"sam", "zsam"} for rows in phases.values())
    for row in phases["seconds"].values():
        assert all(value >= 0 for name, value in row.items() if name != "descent pass + optimizer step")
        assert row["perturb"] > 0 and row["restore"] > 0 and row["ascent backward"] > 0
        assert row["descent pass + optimizer step"] > 0
    # Page faults per phase, the descent's too: differences of a counter that never goes down.
    for row in phases["minor_faults"].values():
        assert all(value >= 0 for value in row.values())
    # The heap's largest change in a phase, in bytes; the reader reads glibc's heap, not its fallback of 0.
    assert all(value == int(value) for row in phases["heap_change_bytes"].values() for value in row.values())
    heap_bytes = load_script_named("benchmark_step")._heap_bytes
    assert heap_bytes() > 0
    assert "ZSAM - SAM" in done.stdout and "ZSAM faults" in done.stdout and "ZSAM heap" in done.stdout


def test_the_filter_profile_times_every_part_inside_steps_and_unwraps_them(tmp_path):
    """A shrunk run of scripts/profile_filter.py: every tensor's mean and every large tensor's collecting pass
    is counted (the wrappers sit where the engine calls), nested parts fit in the perturbation's time, the
    JSON holds what was printed, and afterwards every wrapped function is the library's own again."""
    import zsam_hf.perturbation as perturbation_module
    from zsam_hf.selection import cpu, kernel

    script = load_script_named("profile_filter")
    originals = {(module.__name__, name): getattr(module, name) for module, name, _ in script.PARTS}
    common = ["--workload", "resnet10t@16x2", "--steps", "2", "--warmup", "1"]
    result = script.main([*common, "--json", str(tmp_path / "profile.json")])
    model, _, _ = load_script_named("benchmark_step").workload("resnet10t", 16, 2, "cpu")
    weights = [p.numel() for p in model.parameters() if p.ndim > 1]  # counted here, not by the profiler
    assert result["weight_tensors"] == len(weights)
    assert result["large_weight_tensors"] == sum(n > cpu.SMALL_TENSOR for n in weights) > 0
    assert result["weight_tensors"] > result["large_weight_tensors"]
    assert result["calls"]["gradient_mean"] == result["weight_tensors"]
    assert result["calls"]["_candidates"] == result["large_weight_tensors"]
    assert 0 < result["calls"]["climb_entries"] <= result["weight_tensors"]
    total = result["seconds"]["perturbation"]
    # Every phase of the step is timed, each a part of the step: the passes cost more than the restore.
    assert set(result["seconds"]) == set(script.PHASES)
    assert all(result["seconds"][phase] > 0 for phase in script.PHASES)
    assert result["seconds"]["ascent"] > result["seconds"]["restore"]
    assert result["seconds"]["descent"] > result["seconds"]["restore"]
    for name in ("_candidates", "_sampled_bracket", "gradient_mean", "climb_entries"):
        assert 0 < result["parts"][name] <= total
    assert 0 < result["parts"]["scatter_entries"] <= result["seconds"]["restore"]
    by_size = result["by_size"]
    largest = max(by_size)
    assert largest > cpu.SMALL_TENSOR and by_size[largest]["_candidates"] > 0
    assert json.loads((tmp_path / "profile.json").read_text())["calls"] == result["calls"]

    sampled = script.main([*common, "--mean_from_sample"])
    assert sampled["mean_from_sample"] and sampled["calls"]["gradient_mean"] == result["weight_tensors"]
    sam = script.main([*common, "--variant", "sam"])
    assert "_global_norm" in sam["parts"] and "_candidates" not in sam["parts"]

    for module, name, _ in script.PARTS:
        assert getattr(module, name) is originals[(module.__name__, name)], name
    assert perturbation_module.gradient_mean is originals[("zsam_hf.perturbation", "gradient_mean")]
    if kernel.library() is not None:  # the compiled path: each tensor's deviations in one loop
        small = result["weight_tensors"] - result["large_weight_tensors"]
        assert result["calls"]["deviations_pair"] == result["large_weight_tensors"]
        assert result["calls"]["narrow_deviations"] == small > 0
        assert result["calls"]["_kept_small"] == small  # (a bound that misses may add _kept_exact calls)
