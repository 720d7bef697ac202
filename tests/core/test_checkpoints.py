"""Checkpoints come back whole, and the ascent gradient works whatever the forward does."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from checks import assert_identical, assert_reloads_whole, weights
from toy import TinyClassifier, image_dataset, make_args, text_dataset, tiny_bert, tiny_vit, vector_dataset

import zsam_hf
from zsam_hf import ZSAMTrainer
from zsam_hf.checkpoint_dirs import MANIFEST_NAME, write_manifest
from zsam_hf.checkpoints import CheckpointMismatchError

HELPERS = Path(__file__).resolve().parent.parent / "helpers"


# ---- resume after SIGKILL ----------------------------------------------------------------
def _worker(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(HELPERS) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, str(HELPERS / "resume_worker.py"), str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_vit_killed_after_a_checkpoint_resumes_to_the_uninterruptedweights(tmp_path):
    straight = _worker(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _worker(tmp_path / "killed", "--kill-after-step", "4")
    assert killed.returncode == -9  # SIGKILL, right after checkpoint-4 was written
    assert (tmp_path / "killed" / "checkpoint-4").is_dir() and not (tmp_path / "killed" / "final").exists()
    resumed = _worker(tmp_path / "killed")  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "were not used" not in resumed.stderr and "missing" not in resumed.stderr.lower()
    final = [
        safetensors.torch.load_file(tmp_path / d / "final" / "model.safetensors")
        for d in ("straight", "killed")
    ]
    assert_identical(*final)


# ---- load_best_model_at_end --------------------------------------------------------------
def test_load_best_model_at_end_restores_the_best_evaluation(tmp_path):
    model = tiny_vit(seed=1)
    args = make_args(
        tmp_path,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        optim="adamw_torch",
        learning_rate=0.3,
    )
    trainer = ZSAMTrainer(
        model=model,
        args=args,
        train_dataset=image_dataset(64, seed=1),
        eval_dataset=image_dataset(32, seed=2),
    )
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 8 and min(evals) < evals[-1]  # the best is not the last: loading matters
    assert trainer.state.best_metric == min(evals)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(min(evals), rel=1e-6, abs=1e-7)


# ---- a checkpoint that does not match is an error before training ----------------------------
def _checkpoint_of(tmp_path, model, dataset) -> Path:
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    ZSAMTrainer(model=model, args=args, train_dataset=dataset).train()
    return tmp_path / "out" / "checkpoint-2"


def _editweights(checkpoint: Path, edit) -> None:
    """Make ``checkpoint`` a complete checkpoint of another model (its manifest written anew)."""
    path = checkpoint / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    (checkpoint / MANIFEST_NAME).unlink()
    write_manifest(str(checkpoint))


@pytest.mark.parametrize("kind", ["vit", "module"])
@pytest.mark.parametrize("edit", ["missing", "foreign"])
def test_resume_from_a_mismatched_checkpoint_fails_before_training_naming_the_tensor(tmp_path, kind, edit):
    make_model, data = (
        (tiny_vit, image_dataset(16)) if kind == "vit" else (TinyClassifier, vector_dataset(16))
    )
    checkpoint = _checkpoint_of(tmp_path, make_model(), data)
    saved = safetensors.torch.load_file(checkpoint / "model.safetensors")
    victim = sorted(saved)[-1]
    if edit == "missing":
        _editweights(checkpoint, lambda t: t.pop(victim))
        expected = f"missing from the checkpoint: {victim}"
    else:
        _editweights(checkpoint, lambda t: t.update({"stray.weight": torch.zeros(2, 2)}))
        expected = "not in the model: stray.weight"
    model = make_model()
    before = weights(model)
    trainer = ZSAMTrainer(model=model, args=make_args(tmp_path / "again", max_steps=4), train_dataset=data)
    with pytest.raises(CheckpointMismatchError, match=expected.replace(".", r"\.")):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0
    assert_identical(before, weights(model))  # nothing half-loaded


# ---- sharded files -------------------------------------------------------------------------
@pytest.mark.parametrize("shard", [None, "2KB"])
def test_checkpoint_weights_load_whole_from_one_file_or_shards(tmp_path, shard):
    assert_reloads_whole(tiny_vit(seed=0), tiny_vit(seed=1), tmp_path, shard)


# ---- PEFT: the adapter alone, resumed exactly --------------------------------------------------
def _lora_bert():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    return get_peft_model(tiny_bert(seed=0), lora)


def test_peft_lora_run_resumes_exactly(tmp_path):
    def run(out: Path, resume=None):
        model = _lora_bert()
        args = make_args(
            tmp_path,
            output_dir=str(out),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            optim="adamw_torch",
            learning_rate=0.01,
        )
        ZSAMTrainer(model=model, args=args, train_dataset=text_dataset(32)).train(
            resume_from_checkpoint=resume
        )
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight = run(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (
        checkpoint / "model.safetensors"
    ).exists()
    assert_identical(straight, run(tmp_path / "resumed", resume=str(checkpoint)))


def test_peft_checkpoint_missing_an_adapter_tensor_is_refused(tmp_path):
    model = _lora_bert()
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    ZSAMTrainer(model=model, args=args, train_dataset=text_dataset(16)).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    path = checkpoint / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    victim = sorted(k for k in tensors if "lora_A" in k)[0]
    del tensors[victim]
    safetensors.torch.save_file(tensors, path)
    (checkpoint / MANIFEST_NAME).unlink()
    write_manifest(str(checkpoint))  # complete as files go, but an adapter tensor short
    trainer = ZSAMTrainer(
        model=_lora_bert(), args=make_args(tmp_path / "b", max_steps=4), train_dataset=text_dataset(16)
    )
    with pytest.raises(CheckpointMismatchError, match=victim.replace(".", r"\.")):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# ---- reentrant activation checkpointing inside the model --------------------------------------
class CheckpointedMLP(nn.Module):
    """A custom model that checkpoints its middle block itself, the reentrant way."""

    def __init__(self, checkpointing: bool):
        super().__init__()
        torch.manual_seed(0)
        self.checkpointing = checkpointing
        self.fc_in = nn.Linear(6, 12)
        self.block = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12))
        self.fc_out = nn.Linear(12, 3)

    def forward(self, x, labels=None):
        h = torch.tanh(self.fc_in(x))
        h = (
            torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=True)
            if self.checkpointing
            else self.block(h)
        )
        logits = self.fc_out(torch.tanh(h))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("variant", ["zsam", "sam"])
def test_custom_reentrant_checkpointing_trains_like_no_checkpointing(tmp_path, accumulation, variant):
    results = []
    for checkpointing in (False, True):
        model = CheckpointedMLP(checkpointing)
        args = make_args(tmp_path, max_steps=3, gradient_accumulation_steps=accumulation, sam_variant=variant)
        ZSAMTrainer(model=model, args=args, train_dataset=vector_dataset(32)).train()
        results.append(weights(model))
    assert any(
        not torch.equal(results[0][n], CheckpointedMLP(False).state_dict()[n]) for n in results[0]
    )  # trained
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("reentrant", [True, False])
def test_transformers_gradient_checkpointing_both_modes_and_no_warning_from_us(
    tmp_path, reentrant, accumulation
):
    results = []
    for checkpointing in (False, True):
        model = tiny_vit()
        args = make_args(
            tmp_path,
            max_steps=2,
            gradient_accumulation_steps=accumulation,
            gradient_checkpointing=checkpointing,
            learning_rate=0.01,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant} if checkpointing else None,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ZSAMTrainer(model=model, args=args, train_dataset=image_dataset(16)).train()
        assert model.is_gradient_checkpointing == checkpointing
        ours = [w for w in caught if str(Path(zsam_hf.__file__).parent) in str(w.filename)]
        assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6)
