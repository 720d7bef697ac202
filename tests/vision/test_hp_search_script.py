"""The training script's search mode on the offline Fashion-MNIST subset: a table, a plot and the
command that trains the best trial; killed mid-search and run again, it runs only what is missing."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from script_loader import ROOT, load_script

SEARCH = [
    "--dataset_name", "fashion_mnist", "--model_name_or_path", "cifar_resnet20",
    "--max_train_samples", "192", "--max_eval_samples", "96", "--num_train_epochs", "1",
    "--per_device_train_batch_size", "64", "--logging_steps", "1", "--save_strategy", "no",
    "--use_cpu", "--disable_tqdm", "true", "--report_to", "none",
    "--hp_search_trials", "3", "--hp_search_rho", "0.01,0.1,0.5",
]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_a_search_writes_its_table_plot_and_best_command_and_resumes_after_a_kill(tmp_path, capsys):
    out = tmp_path / "search"
    argv = [*SEARCH, "--output_dir", str(out)]
    job = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train_image_classification.py"), *argv],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first = out / "trials" / "trial-0.json"
    deadline = time.monotonic() + 600
    while not first.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), "the first trial never finished"
    job.send_signal(signal.SIGKILL)  # wherever the next trials are: the search resumes from the study
    job.wait()
    recorded = first.read_text()

    script = load_script("train_image_classification")
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert first.read_text() == recorded  # the finished trial was not run again
    with open(out / "hp_search.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["sam_rho"]) for r in rows) == [0.01, 0.1, 0.5]  # each value once
    for row in rows:
        assert 0 <= float(row["eval_accuracy"]) <= 1
        assert float(row["perturbation_norm"]) == pytest.approx(float(row["sam_rho"]), rel=1e-4)
    best = max(rows, key=lambda r: float(r["eval_accuracy"]))
    table = (out / "hp_search.md").read_text()
    assert "**best**" in table and table.count("\n| ") == 3
    assert (out / "hp_search.png").stat().st_size > 5000
    command = printed.split("train it with:\n", 1)[1].strip().splitlines()[0]
    assert f"--sam_rho {float(best['sam_rho']):.4g}" in command
    assert "--hp_search" not in command and f"--output_dir {out}/best" in command


def test_a_search_refuses_to_choose_on_the_test_split(tmp_path, capsys):
    script = load_script("train_image_classification")
    code = script.main([*SEARCH, "--eval_split", "test", "--output_dir", str(tmp_path / "s")])
    assert code == 2
    assert "eval_split='test' is invalid in a hyperparameter search" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--hp_search_rho", "0.5:0.1", "hp_search_rho='0.5:0.1' is invalid"),
        ("--hp_search_rho", "0,0.1", "hp_search_rho='0,0.1' is invalid"),
        ("--hp_search_backend", "grid", "hp_search_backend='grid' is invalid: expected one of optuna, ray"),
    ],
)
def test_bad_search_flags_are_refused_naming_them(tmp_path, capsys, flag, value, message):
    script = load_script("train_image_classification")
    assert script.main([*SEARCH, flag, value, "--output_dir", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
