"""Sums over the slices of tensors sharded across ranks (FSDP2), for the perturbation's reductions.

Every reduction the perturbation needs (a norm over all tensors, each tensor's mean, each tensor's
norm, a finiteness check, kept counts) is a sum of per-rank partial sums: one all-reduce of a few
numbers each. On one process (``shards=None`` everywhere) the same code takes the whole tensors.
Also here: the two front doors' replica average of the ascent gradients, and the end of a launched
run's process group.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .selection.order_statistics import as_float


@dataclass
class Shards:
    """The ranks a step's tensors are sliced across (their process group; None: the default one)."""

    group: object = None

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (in place); one all-reduce."""
        dist.all_reduce(values, group=self.group)
        return values

    def squared_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """||t||^2 of each full tensor, from the local slices (float32 at least)."""
        if not tensors:
            return torch.zeros(0)
        local = torch.stack(torch._foreach_norm(tensors)).float() ** 2
        return self.sum(local)

    def means(self, tensors: list[torch.Tensor], numels: list[int]) -> list[torch.Tensor]:
        """mean of each full tensor of ``numels`` entries (float32 at least), from the local slices' sums."""
        if not tensors:
            return []
        sums = torch.stack([as_float(t).sum() for t in tensors])  # half precision summed in float32
        sums = self.sum(sums)
        return [s / n for s, n in zip(sums.unbind(), numels)]

    def all_finite(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every entry of every full tensor is finite (one all-reduce, one host sync)."""
        if not tensors:
            return True
        return bool(
            torch.isfinite(
                self.sum(torch.stack(torch._foreach_norm([t.reshape(-1) for t in tensors])).float())
            ).all()
        )


def all_reduce_mean(grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average the ascent gradients over replicas in one flat all-reduce (gloo has no AVG).

    Used by both front doors (the Trainer mixin and the ZSAM optimizer) for a synchronized ascent.
    """
    filled = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    flat = torch.cat([g.reshape(-1) for g in filled])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    chunks = torch.split(flat, [g.numel() for g in filled])
    return [chunk.view_as(g).to(g.dtype) for chunk, g in zip(chunks, filled)]


def end_process_group() -> None:
    """Destroy the process group a launched run joined, once no model wrapper holds it.

    Call it after the Trainer, the accelerator and the wrapped model are dropped (return from the
    function that held them). Two torch hazards meet here. Gloo's worker threads left to interpreter
    exit can abort a finished process (pytorch/pytorch#179291), hence the destroy. And a DDP wrapper
    alive after it holds the group's last reference: freeing it later runs gloo's destructor, which
    joins the worker threads while holding the GIL, and a worker still freeing the tensors of the last
    collective waits for that GIL: a deadlock (seen on torch 2.13 after a barrier: once in a CI run
    and once in 25 runs of the two-process test worker; not in 20 runs on torch 2.14). Collecting the
    garbage first frees wrappers kept only by reference cycles while the group's registry still holds
    it, so the group's last reference goes with the destroy, which releases the GIL.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
