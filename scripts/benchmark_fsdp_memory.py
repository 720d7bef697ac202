#!/usr/bin/env python
"""Memory kept between the two passes under FSDP2, per rank, against that rank's parameter slice.

    torchrun --nproc_per_node 2 scripts/benchmark_fsdp_memory.py            # CPU (gloo): ViT-B/16, ~1 minute
    torchrun --nproc_per_node 8 scripts/benchmark_fsdp_memory.py --device cuda

A ViT-B/16 (transformers, random weights) is sharded with ``fully_shard``; one ascent gradient is
taken, and each variant's perturbation is applied to every rank's slices exactly as ZSAMTrainer
does under FSDP2, then restored. What a rank keeps to restore its slices (sparse entries for ZSAM,
dense copies for SAM) is divided by the bytes of its parameter slice.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import ViTConfig, ViTForImageClassification

from zsam_hf.perturbation import SharpnessPerturbation
from zsam_hf.sharding import Shards, end_process_group

VARIANTS = {
    "ZSAM (global)": dict(variant="zsam", normalization="global"),
    "ZSAM (tensor)": dict(variant="zsam", normalization="tensor"),
    "SAM": dict(variant="sam"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(
        args.device, int(os.environ.get("LOCAL_RANK", 0)) if args.device == "cuda" else None
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(num_labels=1000)).to(device)  # ViT-B/16 at 224 px
    fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
    gen = torch.Generator().manual_seed(rank)
    pixels = torch.randn(args.batch_size, 3, 224, 224, generator=gen).to(device)
    labels = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
    model(pixel_values=pixels, labels=labels).loss.backward()

    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    names = [n for n, _ in named]
    with torch.no_grad():  # plain tensors sharing the slices' storage, written in place as the trainer does
        slices = [p.to_local() for _, p in named]
    numels = [p.numel() for _, p in named]
    slice_bytes = sum(t.numel() * t.element_size() for t in slices)
    rows = {}
    for label, settings in VARIANTS.items():
        grads = [p.grad.to_local().clone() for _, p in named]
        before = [t.clone() for t in slices]
        applied, stats = SharpnessPerturbation(**settings).perturb(names, slices, grads, Shards(), numels)
        rows[label] = (applied.extra_bytes(), float(stats.norm))
        applied.restore()
        assert all(torch.equal(a, b) for a, b in zip(before, slices)), "weights not restored exactly"
    report = torch.tensor([[rows[k][0] for k in VARIANTS] + [slice_bytes]], dtype=torch.float64)
    gathered = [torch.zeros_like(report) for _ in range(world)]
    dist.all_gather(gathered, report)
    if rank == 0:
        total = sum(numels)
        print(f"ViT-B/16, {total / 1e6:.1f}M parameters sharded over {world} ranks ({device.type})")
        print(f"{'rank':<6}{'slice (MB)':>12}" + "".join(f"{k + ' / slice':>22}" for k in VARIANTS))
        for r, row in enumerate(gathered):
            values = row[0].tolist()
            ratios = "".join(f"{v / values[-1]:>22.3f}" for v in values[:-1])
            print(f"{r:<6}{values[-1] / 1e6:>12.1f}{ratios}")
        print("||e|| per variant: " + ", ".join(f"{k} {rows[k][1]:.4f}" for k in VARIANTS))


if __name__ == "__main__":
    main()
    end_process_group()  # after main() dropped the sharded model
