"""Every example the docs pages include runs here, as a user would run it (offline, tiny models).

The pages show these files through pymdownx.snippets, so the code on the site is the code tested.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def test_quickstart_trainer_trains_with_zsam(tmp_path):
    trainer = _load("quickstart_trainer").main(str(tmp_path / "out"))
    norms = _logged(trainer, "perturbation_norm")
    assert norms and norms == pytest.approx([0.05] * len(norms), rel=1e-5)
    assert _logged(trainer, "zsam_kept_fraction")[0] == pytest.approx(0.05, abs=0.01)
    assert type(trainer).__name__ == "ZSAMTrainer"


def test_custom_trainer_keeps_its_loss_and_takes_the_two_pass_step(tmp_path):
    module = _load("custom_trainer")
    trainer = module.main(str(tmp_path / "out"))
    assert isinstance(trainer, module.LabelSmoothingTrainer)
    assert _logged(trainer, "perturbation_norm") == pytest.approx([0.05] * 3, rel=1e-5)


def test_own_loop_learns_and_climbs_rho():
    losses = _load("own_loop").main()
    assert losses[-1] < 0.5 * losses[0]


def test_captured_step_learns_with_the_capturable_ascent():
    """On the CPU the step runs eagerly (no CUDA graphs here); ``tests/gpu`` captures the same step."""
    losses = _load("captured_step").main()
    assert losses[-1] < 0.5 * losses[0]


def test_accelerate_loop_learns():
    assert _load("accelerate_loop").main() > 0.7


def test_resume_run_twice_resumes_and_takes_no_step(tmp_path):
    module = _load("resume")
    out = tmp_path / "out"
    first = module.main(str(out))
    weights = safetensors.torch.load_file(out / "final" / "model.safetensors")
    again = module.main(str(out))  # the same command again: the job had finished
    assert again.state.global_step == first.state.global_step == 8
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    for name, tensor in safetensors.torch.load_file(out / "final" / "model.safetensors").items():
        assert (tensor == weights[name]).all()


def test_tuning_search_returns_a_rho_in_its_range(tmp_path):
    best = _load("tuning").main(str(tmp_path / "out"), 2)
    assert 0.01 <= best.hyperparameters["sam_rho"] <= 0.5


def test_ddp_example_runs_on_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "ddp.py"), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "world_size 2" in done.stdout and "perturbation_norm" in done.stdout
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_lightning_loop_learns():
    assert _load("lightning_loop").main() > 0.7


def test_trl_sft_takes_the_two_pass_step_and_keeps_sfts_metrics(tmp_path):
    trainer = _load("trl_sft").main(str(tmp_path / "out"))
    assert type(trainer).__name__ == "ZSAMSFTTrainer"
    assert _logged(trainer, "perturbation_norm") == pytest.approx([0.05] * 3, rel=1e-5)
    assert _logged(trainer, "num_tokens") and _logged(trainer, "mean_token_accuracy")
