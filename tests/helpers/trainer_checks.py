"""Shared checks for the with_zsam tests: a plain trainer against its ZSAM pair."""

from __future__ import annotations

import dataclasses

import pytest
import torch

NEGLIGIBLE = dict(sam_variant="sam", sam_rho=1e-9)
COMMON = dict(
    report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, logging_steps=1, save_strategy="no"
)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def logged(trainer, keys) -> list[dict]:
    return [{k: h[k] for k in keys if k in h} for h in trainer.state.log_history if "loss" in h]


def assert_same_logs(ours: list[dict], plain: list[dict], rel: float = 1e-4, abs: float = 1e-6) -> None:
    assert len(ours) == len(plain) and all(set(a) == set(b) for a, b in zip(ours, plain))
    for step, (a, b) in enumerate(zip(ours, plain)):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=abs), (step, key)


def assert_keeps_every_default(plain_class, zsam_class, **required):
    plain, ours = plain_class(**required), zsam_class(**required)
    for f in dataclasses.fields(plain_class):
        assert getattr(ours, f.name) == getattr(plain, f.name), f.name
    assert {f.name for f in dataclasses.fields(zsam_class)} - {f.name for f in dataclasses.fields(plain_class)} >= {
        "sam_variant", "sam_rho", "sam_interval", "sam_start", "zsam_quantile"
    }  # fmt: skip
