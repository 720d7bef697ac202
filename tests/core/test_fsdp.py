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
            deviation = (full - full.mean()).abs()
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
