"""``trainer.hyperparameter_search`` as the transformers guide writes it, with ``ZSAMTrainer``.

Each trial must train with its own SAM settings (the engine is rebuilt from ``args`` when each
trial's ``train()`` starts), and end at exactly the weights the same configuration reaches when it
is trained alone in a fresh process. Optuna runs trials in this process; Ray Tune in worker
processes, into which the trainer is serialized.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
from checks import assert_identical
from search_helpers import LoggingTrainer, TrialRecorder, model_init, search_args, trial_name
from toy import vector_dataset

from zsam_hf import ZSAMTrainer, with_zsam

HELPERS = Path(__file__).resolve().parent.parent / "helpers"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


def _alone(tmp_path: Path, configurations: list[tuple[str, float]]) -> dict[tuple[str, float], dict]:
    """Each configuration trained by a trainer of its own, in a fresh process (one for all of them)."""
    out = tmp_path / "alone"
    out.mkdir()
    subprocess.run(
        [sys.executable, str(HELPERS / "search_helpers.py"), str(out), *(f"{v}:{r}" for v, r in configurations)],
        env=_env(), check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return {
        (v, r): safetensors.torch.load_file(out / f"{trial_name(v, r)}.safetensors")
        for v, r in configurations
    }


def _check_trials(tmp_path: Path, record_dir: Path, configurations: list[tuple[str, float]]) -> None:
    alone = _alone(tmp_path, configurations)
    for variant, rho in configurations:
        name = trial_name(variant, rho)
        record = json.loads((record_dir / f"{name}.json").read_text())
        if variant == "none":
            assert record["norms"] == []  # no ascent at all
        else:  # ||e|| = rho for SAM and global-normalized ZSAM: each trial climbs its own radius
            assert record["norms"] and record["norms"] == pytest.approx(
                [rho] * len(record["norms"]), rel=1e-5
            )
        trial_weights = safetensors.torch.load_file(record_dir / f"{name}.safetensors")
        assert_identical(trial_weights, alone[(variant, rho)])


def _searchable_trainer(tmp_path: Path, record_dir: Path, trainer_class=ZSAMTrainer) -> ZSAMTrainer:
    """Built as the guide builds it: model_init, a validation set, zsam at rho 0.05 until a trial says otherwise."""
    args = search_args(tmp_path, sam_variant="zsam", sam_rho=0.05)
    return trainer_class(
        model_init=model_init,
        args=trainer_class._zsam_arguments_class(**args.to_dict()),
        train_dataset=vector_dataset(32),
        eval_dataset=vector_dataset(16, seed=5),
        callbacks=[TrialRecorder(str(record_dir))],
    )


def test_optuna_trials_each_train_with_their_own_rho_and_variant(tmp_path):
    import optuna

    configurations = [("zsam", 0.01), ("zsam", 0.2), ("sam", 0.05), ("none", 0.05)]
    record_dir = tmp_path / "trials"
    trainer = _searchable_trainer(tmp_path, record_dir)

    def hp_space(trial):
        variant, rho = configurations[
            trial.suggest_categorical("configuration", list(range(len(configurations))))
        ]
        return {"sam_variant": variant, "sam_rho": rho}

    best = trainer.hyperparameter_search(
        hp_space=hp_space,
        backend="optuna",
        n_trials=len(configurations),
        direction="minimize",
        compute_objective=lambda metrics: metrics["eval_loss"],
        sampler=optuna.samplers.GridSampler({"configuration": list(range(len(configurations)))}),
    )
    assert best.hyperparameters["configuration"] in range(len(configurations))
    _check_trials(tmp_path, record_dir, configurations)


def test_ray_tune_trials_each_train_with_their_own_rho(tmp_path):
    """Through a class ``with_zsam`` made at run time (a user's own Trainer subclass): it must survive Ray's
    serialization into the workers."""
    import ray
    from accelerate.state import AcceleratorState, GradientState
    from ray import tune

    rhos = [0.02, 0.2]
    record_dir = tmp_path / "trials"
    # Upstream: once any Trainer has trained in a process, accelerate's shared GradientState holds a
    # weakref and no Trainer built after it pickles (the plain Trainer alike). A search started in a
    # fresh process, as users run it, has none; the tests before this one trained, so clear it.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    trainer_class, _ = with_zsam(LoggingTrainer)
    assert not hasattr(__import__("zsam_hf.trainer").trainer, trainer_class.__name__)  # made at run time
    trainer = _searchable_trainer(tmp_path, record_dir, trainer_class)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {k: _env()[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")}},
    )
    try:
        best = trainer.hyperparameter_search(
            hp_space=lambda _: {"sam_rho": tune.grid_search(rhos)},
            backend="ray",
            n_trials=1,  # one sample of the grid: one trial per rho
            direction="minimize",
            compute_objective=lambda metrics: metrics["eval_loss"],
            resources_per_trial={"cpu": 1},
            storage_path=str(tmp_path / "ray_results"),
            verbose=0,
        )
    finally:
        ray.shutdown()
    assert best.hyperparameters["sam_rho"] in rhos
    pids = {json.loads((record_dir / f"{trial_name('zsam', rho)}.json").read_text())["pid"] for rho in rhos}
    assert os.getpid() not in pids  # the trials ran in Ray's worker processes
    _check_trials(tmp_path, record_dir, [("zsam", rho) for rho in rhos])
