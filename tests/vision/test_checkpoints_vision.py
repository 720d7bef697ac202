"""Checkpoints of the vision models come back whole: every family, timm's reentrant checkpointing, the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from checks import assert_identical, assert_reloads_whole
from image_data import cifar10_like
from toy import image_dataset, make_args
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

from zsam_hf import ZSAMTrainer
from zsam_hf.vision.models import Preprocessing, build_model

SCRIPT = Path(__file__).resolve().parent.parent.parent / "scripts" / "train_image_classification.py"


# ---- every model family, sharded files too --------------------------------------------------
def _families():
    prep = Preprocessing(16, (0.5,) * 3, (0.25,) * 3, 3)
    return {
        "small_cnn": lambda seed: (
            torch.manual_seed(seed),
            build_model("cifar_resnet20", ["a", "b"], prep).model,
        )[1],
        "timm": lambda seed: (
            torch.manual_seed(seed),
            TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_vit", num_labels=2)),
        )[1],
    }


@pytest.mark.parametrize("family", ["small_cnn", "timm"])  # a transformers ViT: tests/core
@pytest.mark.parametrize("shard", [None, "2KB"])
def test_checkpoint_weights_load_whole_for_every_family(tmp_path, family, shard):
    make = _families()[family]
    assert_reloads_whole(make(0), make(1), tmp_path, shard)


def test_timm_reentrant_gradient_checkpointing_trains_like_no_checkpointing(tmp_path):
    import timm.layers

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_vit", num_labels=3))
        model.timm_model.set_grad_checkpointing(checkpointing)
        data = image_dataset(16).map(
            lambda columns: {"pixel_values": columns["pixel_values"].repeat(1, 3, 20, 20)}
        )
        args = make_args(tmp_path, max_steps=2, learning_rate=0.01)
        timm.layers.set_reentrant_ckpt(True)
        try:
            ZSAMTrainer(model=model, args=args, train_dataset=data).train()
        finally:
            timm.layers.set_reentrant_ckpt(False)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6)


# ---- the training script: re-running the same command after a SIGKILL ------------------------
KILLED_LAUNCH = """
import os, runpy, signal, sys
from transformers import TrainerCallback
import zsam_hf.trainer

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

original_init = zsam_hf.trainer.ZSAMTrainer.__init__
def init_with_killer(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(KillAfterSave())
zsam_hf.trainer.ZSAMTrainer.__init__ = init_with_killer
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _tiny_vit_checkpoint(root: Path) -> str:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        hidden_dropout_prob=0.1,
    )
    ViTForImageClassification(config).save_pretrained(root)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root)
    return str(root)


@pytest.mark.parametrize("model", ["paper_vit", "transformers_vit"])
def test_script_rerun_after_sigkill_ends_at_the_uninterrupted_weights(tmp_path, model):
    script = str(SCRIPT)
    data = str(cifar10_like(tmp_path / "data"))
    name = model if model == "paper_vit" else _tiny_vit_checkpoint(tmp_path / "vit")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: str) -> list[str]:
        return [
            script,
            "--dataset_name",
            data,
            "--model_name_or_path",
            name,
            "--output_dir",
            out,
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--use_cpu",
            "--disable_tqdm",
            "true",
            "--max_eval_samples",
            "8",
        ]

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
        )

    straight = run(*command(str(tmp_path / "straight")))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run("-c", KILLED_LAUNCH, *command(str(tmp_path / "killed")))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (
        tmp_path / "killed" / "model.safetensors"
    ).exists()
    resumed = run(*command(str(tmp_path / "killed")))  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    final = [safetensors.torch.load_file(tmp_path / d / "model.safetensors") for d in ("straight", "killed")]
    assert_identical(*final)
