"""scripts/train_image_classification_no_trainer.py: the accelerate loop end to end, resumed, on 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "scripts" / "train_image_classification_no_trainer.py"
TINY = ["--dataset_name", "digits", "--max_train_samples", "400", "--per_device_train_batch_size", "32",
        "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3", "--checkpointing_steps", "epoch"]  # fmt: skip


def _run(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else []
    )
    done = subprocess.run(
        [sys.executable, *launcher, str(SCRIPT), *TINY, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_trains_saves_a_card_and_resumes_with_the_same_command(tmp_path):
    out = tmp_path / "run"
    first = _run("--num_train_epochs", "2", "--output_dir", str(out))
    accuracy = float(first.stdout.split("eval_accuracy: ")[1].split()[0])
    assert accuracy > 0.3  # 10 classes: well above chance
    assert {"checkpoint-7", "checkpoint-14", "model.safetensors", "config.json", "README.md"} <= set(
        os.listdir(out)
    )
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "ZSAM optimizer (accelerate loop)" in card
    assert "| zsam_quantile | 0.95 |" in card and "| optimizer steps run | 14 |" in card
    assert not [e for e in os.listdir(out) if e.startswith("_staging-")]  # checkpoints renamed into place
    again = _run("--num_train_epochs", "3", "--output_dir", str(out))  # one more epoch: picks up at 14
    assert f"Resuming from {out / 'checkpoint-14'}" in again.stdout
    assert (
        "checkpoint-21" in os.listdir(out)
        and "| optimizer steps run | 21 |" in (out / "README.md").read_text()
    )


def test_runs_on_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    done = _run("--num_train_epochs", "1", "--output_dir", str(out), processes=2)
    assert "eval_accuracy: " in done.stdout
    card = (out / "README.md").read_text()
    assert "| num_devices | 2 |" in card


def test_a_bad_flag_is_refused():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpointing_steps", "often"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "--checkpointing_steps 'often' is invalid" in done.stderr
