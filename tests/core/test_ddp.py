"""Criterion 5: two-process gloo DDP, per-replica and synchronized ascent."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from checks import random_control_masks
from reference import loss_by_hand, reference_offsets
from toy import TinyClassifier

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")


@pytest.fixture(scope="module")
def ddp_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(HELPERS, "ddp_worker.py"),
        str(out),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {
        mode: [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        for mode in ("sync0", "sync1", "random", "sam-tensor", "capturable")
    }


def _grads(model, params: dict, batch) -> list[torch.Tensor]:
    leaves = {n: t.clone().requires_grad_() for n, t in params.items()}
    return list(torch.autograd.grad(loss_by_hand(model, leaves, batch, False, 1.0), list(leaves.values())))


def ddp_gradient_by_hand(
    w0: dict,
    batches: list[dict],
    sync: bool,
    variant: str = "zsam",
    normalization: str = "global",
    step: int = 0,
) -> dict:
    """Mean over ranks of grad L_r(w0 + e_r); e_r from rank r's own g, or from the mean g. The random
    control's masks are those of (seed 0, ``step``) on every rank."""
    model, names = TinyClassifier(), list(w0)
    ascent = [_grads(model, w0, b) for b in batches]
    if sync:
        mean = [sum(gs) / len(gs) for gs in zip(*ascent)]
        ascent = [mean] * len(batches)
    total = [torch.zeros_like(w0[n]) for n in names]
    for batch, g in zip(batches, ascent):
        masks = random_control_masks(g, step) if variant == "random" else None
        e = reference_offsets(variant, names, [w0[n] for n in names], g, 0.05, normalization=normalization,
                              masks=masks)  # fmt: skip
        w = {n: (w0[n].double() + torch.from_numpy(ei)).float() for n, ei in zip(names, e)}
        total = [t + d / len(batches) for t, d in zip(total, _grads(model, w, batch))]
    return dict(zip(names, total))


@pytest.mark.parametrize("mode, sync", [("sync0", 0), ("sync1", 1), ("capturable", 0)])
def test_ddp_gradient_is_mean_of_replica_sam_gradients(ddp_records, mode, sync):
    """Per-replica and synchronized ascent, and the capturable one (sam_capturable: each parameter pointed
    at its w + e buffer and back while DDP holds it), against the hand computation."""
    ranks = ddp_records[mode]
    assert ranks[0]["world_size"] == 2
    for step in range(3):
        for key in ("start", "pre_step", "end"):  # identical weights on every rank, restored exactly
            assert all(
                torch.equal(ranks[0][key][step][n], ranks[1][key][step][n]) for n in ranks[0][key][step]
            )
        w0 = ranks[0]["start"][step]
        batches = [[b for s, b, _ in r["batches"] if s == step][0] for r in ranks]
        assert not torch.equal(batches[0]["x"], batches[1]["x"])  # each rank saw its own data
        expected = ddp_gradient_by_hand(w0, batches, bool(sync))
        other = ddp_gradient_by_hand(w0, batches, not sync)
        for n in expected:
            for r in ranks:
                np.testing.assert_allclose(r["grads"][step][n], expected[n], rtol=2e-4, atol=1e-6, err_msg=n)
        assert any(not torch.allclose(expected[n], other[n], rtol=1e-3, atol=1e-5) for n in expected)


@pytest.mark.parametrize("mode, variant", [("random", "random"), ("sam-tensor", "sam")])
def test_ddp_controls_average_each_replicas_own_ascent(ddp_records, mode, variant):
    """The controls under DDP: the random control (the same masks on every rank, each rank's own g) and
    SAM split per tensor, per-replica ascent, against the hand computation."""
    ranks = ddp_records[mode]
    for step in range(3):
        assert all(
            torch.equal(ranks[0]["end"][step][n], ranks[1]["end"][step][n]) for n in ranks[0]["end"][step]
        )
        w0 = ranks[0]["start"][step]
        batches = [[b for s, b, _ in r["batches"] if s == step][0] for r in ranks]
        expected = ddp_gradient_by_hand(w0, batches, False, variant, "tensor", step)
        for n in expected:
            for r in ranks:
                np.testing.assert_allclose(r["grads"][step][n], expected[n], rtol=2e-4, atol=1e-6, err_msg=n)
