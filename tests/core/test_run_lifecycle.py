"""A run's life around its steps: SAM settings read when training starts, a rerun of a finished job,
checkpoints changed after their save, the Trainer's own error words, one writer per output directory.

Each test is a behaviour a user (or transformers' own Trainer tests) meets through ``train()``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from checks import assert_identical
from toy import TinyClassifier, image_dataset, make_args, tiny_vit, vector_dataset
from transformers import Trainer, TrainerCallback

from zsam_hf import ZSAM, IncompleteCheckpointError, ZSAMTrainer, with_zsam
from zsam_hf.checkpoint_dirs import sorted_checkpoints
from zsam_hf.run_lock import LOCK_NAME, OutputDirInUseError, this_process


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []
        self.train_ends = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**(logs or {}), "step": state.global_step})

    def on_train_end(self, args, state, control, **kwargs):
        self.train_ends += 1


def _trainer(tmp_path, cls=ZSAMTrainer, model=None, eval_dataset=None, **overrides) -> ZSAMTrainer:
    args = make_args(tmp_path, **overrides)
    if cls is not ZSAMTrainer:
        args = cls._zsam_arguments_class(**args.to_dict())
    return cls(
        model=model or TinyClassifier(),
        args=args,
        train_dataset=vector_dataset(32),
        eval_dataset=eval_dataset,
    )


def _norms(recorder: LogRecorder) -> list[float]:
    return [log["perturbation_norm"] for log in recorder.logs if "perturbation_norm" in log]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the SAM settings are the ones args holds when training starts ------------------------------
def test_sam_settings_changed_on_args_after_construction_take_effect(tmp_path):
    trainer = _trainer(tmp_path / "changed", sam_variant="zsam", sam_rho=0.05, max_steps=3)
    trainer.args.sam_rho = 0.2
    trainer.args.sam_variant = "sam"
    recorder = LogRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    assert _norms(recorder) == pytest.approx([0.2] * 3, rel=1e-5)  # SAM's ||e|| is rho exactly
    fresh = _trainer(tmp_path / "fresh", sam_variant="sam", sam_rho=0.2, max_steps=3)
    fresh.train()
    assert_identical(_weights(trainer.model), _weights(fresh.model))


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("sam_rho", -1.0, "expected a finite number > 0"),
        ("zsam_quantile", 1.5, r"expected a number in \[0, 1\)"),
        ("sam_variant", "zsharp", "expected one of"),
        ("sam_interval", 0, "expected a whole number >= 1"),
    ],
)
def test_an_invalid_value_set_on_args_is_refused_before_any_step(tmp_path, field, value, allowed):
    trainer = _trainer(tmp_path)
    before = _weights(trainer.model)
    setattr(trainer.args, field, value)
    with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid: {allowed}"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert_identical(_weights(trainer.model), before)


def test_a_second_train_starts_afresh_fsam_average_and_meters(tmp_path):
    """Two train() calls on one trainer: the second equals a fresh trainer's run from the same weights,
    FSAM's average is rebuilt, and sam_steps_fraction counts only the second call's steps."""
    trainer = _trainer(tmp_path / "twice", sam_variant="fsam", max_steps=4, logging_steps=4)
    trainer.train()
    start = _weights(trainer.model)
    recorder = LogRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    fractions = [log["sam_steps_fraction"] for log in recorder.logs if "sam_steps_fraction" in log]
    assert fractions == [1.0]
    model = TinyClassifier()
    model.load_state_dict(start)
    fresh = _trainer(tmp_path / "fresh", model=model, sam_variant="fsam", max_steps=4, logging_steps=4)
    fresh.train()
    assert_identical(_weights(trainer.model), _weights(fresh.model))


def test_sam_steps_fraction_counts_from_the_resumed_step(tmp_path):
    first = _trainer(tmp_path, max_steps=10, logging_steps=5, save_strategy="steps", save_steps=5)
    first.train()
    resumed = _trainer(tmp_path, max_steps=10, logging_steps=5, save_strategy="steps", save_steps=5)
    recorder = LogRecorder()
    resumed.add_callback(recorder)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    fractions = [
        (log["step"], log["sam_steps_fraction"]) for log in recorder.logs if "sam_steps_fraction" in log
    ]
    assert fractions == [(10, 1.0)]


# ---- a rerun of a job that already reached max_steps ---------------------------------------------
class _Subclassed(Trainer):
    """A user's own Trainer subclass, given the two-pass step through with_zsam."""


@pytest.mark.parametrize("front_door", ["ZSAMTrainer", "with_zsam"])
@pytest.mark.parametrize("best_at_end", [False, True])
def test_a_rerun_after_max_steps_takes_no_step_and_writes_no_checkpoint(tmp_path, front_door, best_at_end):
    cls = ZSAMTrainer if front_door == "ZSAMTrainer" else with_zsam(_Subclassed)[0]
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch")
    if best_at_end:
        settings.update(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)

    def build():
        return _trainer(tmp_path, cls=cls, eval_dataset=vector_dataset(8, seed=3), **settings)

    first = build()
    first.train()
    first.save_model(str(tmp_path / "final"))
    finished = _weights(first.model)
    recorder = LogRecorder()
    rerun = build()
    rerun.add_callback(recorder)
    result = rerun.train(resume_from_checkpoint=True)
    rerun.save_model(str(tmp_path / "final"))  # what a script does after train()
    names = [Path(p).name for p in sorted_checkpoints(str(tmp_path / "out"))]
    assert names == ["checkpoint-2", "checkpoint-4"]
    assert result.global_step == 4 and rerun.state.global_step == 4
    assert recorder.train_ends == 1  # the end of training still happened
    assert_identical(_weights(rerun.model), finished)
    saved = safetensors.torch.load_file(tmp_path / "final" / "model.safetensors")
    assert_identical(saved, finished)


# ---- a checkpoint whose weights were changed after its save --------------------------------------
def _reshard(checkpoint: Path) -> None:
    """Split model.safetensors into two shards and an index, as a user re-sharding a checkpoint would."""
    state = safetensors.torch.load_file(checkpoint / "model.safetensors")
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, half in enumerate(halves, start=1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        safetensors.torch.save_file(
            {k: state[k].contiguous() for k in half}, checkpoint / shard, {"format": "pt"}
        )
        weight_map.update({k: shard for k in half})
    (checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (checkpoint / "model.safetensors").unlink()


@pytest.mark.parametrize("model_kind", ["module", "vit"])
def test_a_resharded_checkpoint_resumes_exactly(tmp_path, model_kind):
    def build(out):
        model = TinyClassifier() if model_kind == "module" else tiny_vit()
        data = vector_dataset(32) if model_kind == "module" else image_dataset(32)
        args = make_args(out, max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch")
        return ZSAMTrainer(model=model, args=args, train_dataset=data)

    straight = build(tmp_path / "straight")
    straight.train()
    build(tmp_path / "killed").train()
    checkpoint = tmp_path / "killed" / "out" / "checkpoint-2"
    _reshard(checkpoint)
    resumed = build(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_identical(_weights(resumed.model), _weights(straight.model))


def test_a_resharded_checkpoint_with_a_shard_lost_is_refused(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    _reshard(checkpoint)
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"model\.safetensors is missing"):
        _trainer(tmp_path / "again", max_steps=4).train(resume_from_checkpoint=str(checkpoint))


# ---- the Trainer's own error words, and ours after them -------------------------------------------
def test_the_trainers_messages_are_kept(tmp_path):
    trainer = _trainer(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"Can't find a valid checkpoint at {missing}") as err:
        trainer.train(resume_from_checkpoint=str(missing))
    assert "does not exist" in str(err.value)
    output_dir = trainer.args.output_dir
    with pytest.raises(
        ValueError, match=rf"No valid checkpoint found in output directory \({output_dir}\)"
    ) as err:
        trainer.train(resume_from_checkpoint=True)
    assert "holds no complete checkpoint" in str(err.value)


def test_a_zsam_optimizer_given_to_a_plain_trainer_says_how_to_use_it(tmp_path):
    model = TinyClassifier()
    optimizer = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    args = make_args(tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=vector_dataset(16), optimizers=(optimizer, None))
    with pytest.raises(RuntimeError) as err:
        trainer.train()
    message = str(err.value)
    assert "ZSAMTrainer" in message and "with_zsam" in message and "closure" in message


# ---- one writer per output directory --------------------------------------------------------------
_FSDP2_ON_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: ViTLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
"""
_LAUNCHED = """\
import sys
from toy import TinyClassifier, vector_dataset
from zsam_hf import ZSAMTrainer, ZSAMTrainingArguments
args = ZSAMTrainingArguments(output_dir=sys.argv[1], max_steps=2, report_to=[], disable_tqdm=True)
ZSAMTrainer(model=TinyClassifier(), args=args, train_dataset=vector_dataset(16)).train()
print(f"TRAINED world_size={args.world_size} process_index={args.process_index}", flush=True)
from zsam_hf import end_process_group
end_process_group()
"""


def test_a_launch_of_several_processes_without_a_process_group_is_refused(tmp_path):
    """The README's FSDP2 config with use_cpu and 2 processes. Current accelerate starts two processes
    (WORLD_SIZE=2) but joins them in no process group, so each Trainer sees world_size 1 and would write
    output_dir alone: refused. Older accelerate (the oldest supported) joins them in one gloo group: one job.
    Either way, never two writers."""
    (tmp_path / "fsdp2.yaml").write_text(_FSDP2_ON_CPU)
    (tmp_path / "launched.py").write_text(_LAUNCHED)
    helpers = Path(__file__).resolve().parent.parent / "helpers"
    env = {**os.environ, "PYTHONPATH": f"{helpers}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp2.yaml"),
         str(tmp_path / "launched.py"), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode == 0:  # accelerate before 1.1x joined such processes in one gloo group: one job, fine
        trained = sorted(line for line in done.stdout.splitlines() if line.startswith("TRAINED"))
        assert trained == ["TRAINED world_size=2 process_index=0", "TRAINED world_size=2 process_index=1"], (
            done.stdout + done.stderr
        )
        return
    assert "launched as one of WORLD_SIZE=2 processes, but the Trainer sees world_size=1" in done.stderr
    assert "--multi_gpu --use_cpu" in done.stderr and "torchrun" in done.stderr
    assert sorted_checkpoints(str(tmp_path / "out")) == []


def test_a_second_live_job_on_the_same_output_dir_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = None
        for _ in range(100):  # the holder's start time, as the lock records it
            with open(f"/proc/{holder.pid}/stat") as f:
                started = int(f.read().rsplit(")", 1)[1].split()[19])
            break
        out = tmp_path / "out"
        out.mkdir()
        owner = {"pid": holder.pid, "host": socket.gethostname(), "started": started}
        (out / LOCK_NAME).write_text(json.dumps(owner))
        trainer = _trainer(tmp_path)
        with pytest.raises(OutputDirInUseError, match=rf"pid {holder.pid} on host"):
            trainer.train()
        assert trainer.state.global_step == 0
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_job_is_taken_over_and_released(tmp_path, caplog):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    out = tmp_path / "out"
    out.mkdir()
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": 1}
    (out / LOCK_NAME).write_text(json.dumps(stale))

    class SeesLock(TrainerCallback):
        held = None

        def on_step_end(self, args, state, control, **kwargs):
            SeesLock.held = json.loads((out / LOCK_NAME).read_text())

    trainer = _trainer(tmp_path)
    trainer.add_callback(SeesLock())
    trainer.train()
    assert SeesLock.held == this_process()  # held by this process while it trained
    assert not (out / LOCK_NAME).exists()  # and released after
    assert "is gone" in caplog.text


def test_the_lock_never_reaches_a_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    assert not any(LOCK_NAME in files for _, _, files in os.walk(tmp_path / "out" / "checkpoint-2"))
