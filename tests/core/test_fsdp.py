"""ZSAM under FSDP2 on the CPU (gloo): the sharded threshold, and the Trainer's FSDP2 path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPERS = Path(__file__).resolve().parent.parent / "helpers"


def torchrun(script: str, nproc: int, *args: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(HELPERS) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HELPERS / script), *args]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_threshold_equals_torch_quantile_of_the_full_tensor(tmp_path, world):
    sys.path.insert(0, str(HELPERS))
    from quantile_worker import full_gradients

    torchrun("quantile_worker.py", world, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    fulls = full_gradients()
    for q in ranks[0]["results"]:
        for name, full in fulls.items():
            mean = ranks[0]["results"][q][name][
                "mean"
            ]  # the ranks' mean (a reduction's rounding depends on threads)
            deviation = (full - mean).abs()
            slices = [r["results"][q][name]["slice"] for r in ranks]
            assert torch.equal(torch.cat(slices), full) and (
                name != "small" or world < 3 or slices[-1].numel() == 0
            )
            thresholds = [r["results"][q][name]["threshold"] for r in ranks]
            if full.numel() < 2:
                assert all(t is None for t in thresholds)
                continue
            expected = torch.quantile(deviation.double(), q).float()
            assert all(torch.equal(t, thresholds[0]) for t in thresholds)  # every rank agrees
            torch.testing.assert_close(thresholds[0], expected, rtol=1e-6, atol=0)
            # the kept entries, put together, are the full tensor's mask (with the exact interpolation)
            exact = torch.lerp(*torch.sort(deviation).values[_ranks(full.numel(), q)], _frac(full.numel(), q))
            offsets = torch.tensor([0, *torch.cumsum(torch.tensor([s.numel() for s in slices]), 0).tolist()])
            kept = torch.cat([r["results"][q][name]["kept"] + offsets[i] for i, r in enumerate(ranks)])
            assert torch.equal(kept, torch.nonzero(deviation > exact).squeeze(1)), (q, name)
            values = torch.cat([r["results"][q][name]["values"] for r in ranks])
            assert torch.equal(values, full[kept])


def _ranks(n: int, q: float) -> list[int]:
    lo = int(q * (n - 1))
    return [lo, min(lo + 1, n - 1)]


def _frac(n: int, q: float) -> float:
    return q * (n - 1) - int(q * (n - 1))


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def fsdp_records(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"fsdp{request.param}")
    torchrun("fsdp_worker.py", request.param, str(out))
    return torch.load(out / "records.pt", weights_only=False)


@pytest.mark.parametrize("run", ["zsam-global", "zsam-tensor", "sam", "asam", "fsam", "zsam-k2"])
def test_fsdp2_run_ends_at_the_ddp_weights_with_synchronized_ascent(fsdp_records, run):
    fsdp, ddp = fsdp_records["records"][("fsdp", run)], fsdp_records["records"][("ddp", run)]
    largest = max(t.abs().max() for t in ddp["final"].values())
    for name, weight in ddp["final"].items():  # the same weights at the end, to rounding
        assert (fsdp["final"][name] - weight).abs().max() <= 1e-5 * largest, name
    assert any(not torch.equal(fsdp["final"][n], fsdp["start"][0][n]) for n in fsdp["final"])  # it trained


@pytest.mark.parametrize("run", ["zsam-global", "zsam-tensor", "sam", "asam", "fsam"])
def test_fsdp2_gradient_handed_to_the_optimizer_equals_an_independent_computation(fsdp_records, run):
    from fsdp_worker import RUNS, STEPS, ShardedNet
    from reference import clipped, synced_sam_gradient

    fsdp = fsdp_records["records"][("fsdp", run)]
    world = fsdp_records["world"]
    settings = RUNS[run]
    ema: dict = {}
    for step in range(STEPS):  # the gradient handed to the optimizer, against an independent computation
        micro = [[b for s, b, _ in fsdp["batches"][r] if s == step] for r in range(world)]
        by_micro_batch = [list(per_rank) for per_rank in zip(*micro)]
        assert len(by_micro_batch) == 2
        expected = synced_sam_gradient(
            ShardedNet(), fsdp["start"][step], by_micro_batch, settings["sam_variant"], 0.5,
            normalization=settings.get("zsam_normalization", "global"), ema=ema,
        )  # fmt: skip
        expected = clipped(expected, 0.5)
        for name in expected:
            torch.testing.assert_close(
                fsdp["grads"][step][name], expected[name], rtol=2e-4, atol=1e-6, msg=name
            )


@pytest.mark.parametrize("run", ["zsam-global", "fsam"])
def test_resume_from_an_fsdp2_checkpoint_ends_at_the_uninterrupted_weights(fsdp_records, run):
    straight = fsdp_records["records"][("straight", run)]["final"]
    resumed = fsdp_records["records"][("resumed", run)]["final"]
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_fsdp2_logs_carry_the_sharpness_metrics(fsdp_records):
    logs = [h for h in fsdp_records["records"][("fsdp", "zsam-global")]["logs"] if "loss" in h]
    assert logs and all(h["perturbation_norm"] == pytest.approx(0.05, rel=1e-4) for h in logs)
    assert all(0 < h["zsam_kept_fraction"] < 0.2 and h["sam_steps_fraction"] == 1 for h in logs)


def test_fsdp2_bf16_mixed_precision_trains_like_fp32_to_bf16_precision(fsdp_records):
    bf16, fp32 = (
        fsdp_records["records"][("bf16", "zsam-global")],
        fsdp_records["records"][("fsdp", "zsam-global")],
    )
    largest = max(t.abs().max() for t in fp32["final"].values())
    differences = [(bf16["final"][n] - w).abs().max() for n, w in fp32["final"].items()]
    assert max(differences) > 0  # the passes really ran in bf16
    assert max(differences) <= 2e-3 * largest
    assert all(
        t.dtype == torch.float32 and torch.isfinite(t).all() for t in bf16["final"].values()
    )  # fp32 slices
    logs = [h for h in bf16["logs"] if "loss" in h]
    assert all(h["perturbation_norm"] == pytest.approx(0.05, rel=1e-3) for h in logs)
