"""Run by test_fsdp.py under torchrun: the sharded threshold of full tensors split across the ranks.

Every rank builds the same full gradients, takes its slice (uneven, sometimes empty), and asks for
the thresholds together; each rank writes its thresholds and local masks for the test to check.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from checks import end_distributed_run

from zsam_hf.selection import kept_entries_sharded
from zsam_hf.selection.sharded import sharded_thresholds


def full_gradients() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    heavy = torch.randn(200_000, generator=gen) / torch.rand(200_000, generator=gen).clamp_min(
        1e-4
    )  # Cauchy-like
    taps = torch.zeros(4096, 9)
    taps[:, 4] = torch.randn(4096, generator=gen)  # 8 of 9 taps tied at zero
    return {
        "random": torch.randn(300_001, generator=gen),
        "small": torch.randn(37, generator=gen),
        "tied": torch.randint(-2, 3, (50_000,), generator=gen).float(),
        "heavy": heavy,
        "taps": taps.reshape(-1),
        "constant": torch.full((1000,), 0.25),
        "two": torch.tensor([1.0, -1.0]),
        "one": torch.tensor([3.0]),
    }


def slice_for(full: torch.Tensor, rank: int, world: int, name: str) -> torch.Tensor:
    """Uneven slices; for 'small' the last rank's slice is empty, as torch.chunk leaves it."""
    if name == "small":
        bounds = [0, 30, 37, 37][: world + 1] if world > 1 else [0, 37]
        bounds[-1] = 37
        return full[bounds[rank] : bounds[rank + 1]] if rank + 1 < len(bounds) else full[:0]
    cuts = [full.numel() * (2 * r + 1) // (2 * world + 1) for r in range(world)] + [full.numel()]
    cuts[0] = 0
    return full[cuts[rank] : cuts[rank + 1]]


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    fulls = full_gradients()
    for q in (0.0, 0.5, 0.95, 0.99):
        means = {name: g.mean() for name, g in fulls.items()}
        slices = {name: slice_for(g, rank, world, name) for name, g in fulls.items()}
        deviations = [(slices[n] - means[n]).abs() for n in fulls]
        thresholds = sharded_thresholds(deviations, [g.numel() for g in fulls.values()], q)
        kept = kept_entries_sharded(
            list(slices.values()), [g.numel() for g in fulls.values()], q, list(means.values())
        )
        results[q] = {
            name: {"threshold": t, "kept": k[0], "values": k[1], "slice": slices[name], "mean": means[name]}
            for name, t, k in zip(fulls, thresholds, kept)
        }
    torch.save({"results": results, "world": world}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_distributed_run()
