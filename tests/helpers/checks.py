"""Assertions shared by the checkpoint tests."""

from __future__ import annotations

import torch

from zsam_hf.checkpoints import load_checkpoint_weights


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the model's state dict."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_identical(a: dict, b: dict) -> None:
    """The same names, and the same tensors bit for bit."""
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max difference {(a[name] - b[name]).abs().max()}"


def assert_reloads_whole(source, target, directory, shard: str | None) -> None:
    """``source`` saved (in one file, or in shards of ``shard`` bytes) fills every tensor of ``target``."""
    source.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    assert (directory / "model.safetensors.index.json").exists() == bool(shard)
    assert any(
        not torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values())
    )
    load_checkpoint_weights(target, str(directory))
    assert_identical(weights(source), weights(target))
