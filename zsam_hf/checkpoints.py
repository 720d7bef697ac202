"""Checkpoints that come back whole: every tensor restored, or an error that names what is not.

transformers 5 restores Trainer checkpoints (``resume_from_checkpoint``,
``load_best_model_at_end``) with ``model.load_state_dict(<raw file>, strict=False)``. Models
whose saved tensor names differ from their module names (transformers converts them when
saving and when loading, e.g. ViT's ``attention.attention.query`` is the module
``attention.q_proj``) then get most of their tensors silently not restored: a logged warning
and a half-loaded model. Here the weights go through the very loader that reads a saved model
(``from_pretrained``, with all of its name conversions, sharded files included), and any
tensor the checkpoint should fill and does not, or holds and the model lacks, is an error.
"""

from __future__ import annotations

import copy
import json
import os

import safetensors.torch
import torch
from transformers import PreTrainedModel
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not match the model's, one for one (the message names them)."""


def _mismatch(checkpoint: str, problems: dict[str, list[str]]) -> CheckpointMismatchError:
    listed = "; ".join(f"{what}: {', '.join(sorted(names))}" for what, names in problems.items() if names)
    return CheckpointMismatchError(
        f"checkpoint {checkpoint!r} does not match the model ({listed}). Nothing was trained on a "
        "half-loaded model: resume from a checkpoint of this model, or start a new --output_dir."
    )


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "load_adapter")


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return safetensors.torch.load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(checkpoint: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory as saved: one file, or the shards an index lists."""
    for index_name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index = os.path.join(checkpoint, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                state.update(_read_file(os.path.join(checkpoint, name)))
            return state
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        if os.path.isfile(os.path.join(checkpoint, name)):
            return _read_file(os.path.join(checkpoint, name))
    raise FileNotFoundError(
        f"checkpoint {checkpoint!r} holds no model weights ({SAFE_WEIGHTS_NAME} or an index)"
    )


def _load_pretrained_model(model: PreTrainedModel, checkpoint: str) -> None:
    """Through ``from_pretrained`` (its name conversions and shard handling), then copied in strictly.

    The loaded copy lives on the CPU only while it is copied into the model's own tensors, so the
    model keeps its device, dtype, wrappers and the optimizer's references to its parameters.
    """
    loaded, info = type(model).from_pretrained(
        checkpoint, config=copy.deepcopy(model.config), output_loading_info=True
    )
    problems = {
        "missing from the checkpoint": list(info.get("missing_keys", ())),
        "not in the model": list(info.get("unexpected_keys", ())),
        "of another shape": [str(k if isinstance(k, str) else k[0]) for k in info.get("mismatched_keys", ())],
        "errors": list(info.get("error_msgs", ())),
    }
    if any(problems.values()):
        raise _mismatch(checkpoint, problems)
    model.load_state_dict(loaded.state_dict(), strict=True)


def _load_plain_module(model: torch.nn.Module, checkpoint: str) -> None:
    """A plain ``nn.Module`` is saved under its own state-dict names: load them strictly.

    The names are compared first, so a mismatched checkpoint leaves the model untouched.
    """
    state = read_state_dict(checkpoint)
    expected = set(model.state_dict())
    problems = {
        "missing from the checkpoint": sorted(expected - set(state)),
        "not in the model": sorted(set(state) - expected),
    }
    if any(problems.values()):
        raise _mismatch(checkpoint, problems)
    model.load_state_dict(state, strict=True)


def check_adapter_checkpoint(model: torch.nn.Module, checkpoint: str) -> None:
    """A PEFT checkpoint holds the adapter alone: it must hold every adapter tensor and nothing else.

    (The frozen base model is not expected there; PEFT's own ``load_adapter`` then loads it.)
    """
    from peft import get_peft_model_state_dict  # only reached with a PEFT model, so peft is installed

    for name in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME):
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path):
            saved = set(_read_file(path))
            break
    else:
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r} holds no adapter weights ({ADAPTER_SAFE_WEIGHTS_NAME})"
        )
    adapter = model.active_adapters[0] if hasattr(model, "active_adapters") else "default"
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter))
    problems = {
        "missing from the checkpoint": sorted(expected - saved),
        "not in the model": sorted(saved - expected),
    }
    if any(problems.values()):
        raise _mismatch(checkpoint, problems)


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """Restore every tensor of ``model`` from a Trainer checkpoint directory, or raise.

    Raises:
        CheckpointMismatchError: a tensor of the model the checkpoint does not fill, or a tensor
            of the checkpoint the model does not take (both named).
        FileNotFoundError: no weights in the directory.
    """
    if isinstance(model, PreTrainedModel):
        _load_pretrained_model(model, checkpoint)
    else:
        _load_plain_module(model, checkpoint)
