"""The z-score filter of ZSAM: which gradient entries survive, found by O(n) selection.

``docs/algorithm.md`` keeps the entries of a weight tensor whose |z| = |g - mean g| / (std g + eps)
is strictly above the Q_p quantile of |z| (linear interpolation between order statistics,
the definition of ``torch.quantile``). z is a positive rescaling of g - mean g and the
interpolated quantile commutes with positive rescaling, so everything here works on the
deviation d = |g - mean g| and the standard deviation is never materialized.

A full selection per tensor (``kthvalue``, ``torch.quantile``, a sort) costs more than the
rest of the step's bookkeeping together, and ``torch.quantile`` refuses tensors of more than
2^24 entries. So each device has its own path to the same exact answer:

* ``cpu.py``: a sampled bound, one collecting pass over cache-sized chunks, a small selection;
* ``fixed_shape.py``: one ``topk`` per tensor, shapes fixed by n and Q_p, no host synchronization
  (accelerators; selectable on the CPU with ``fixed_shape=True``); ``accelerator.py`` turns its
  results into kept entries with one host synchronization per step;
* ``sharded.py``: tensors sliced across ranks (FSDP2), exact without gathering whole tensors;
* ``order_statistics.py``: the quantile's definition and the O(n) selections they share.
"""

from __future__ import annotations

import torch

from .accelerator import kept_and_flags, kept_with_one_sync
from .cpu import kept_on_cpu
from .fixed_shape import FixedKept, candidate_count, kept_fixed_shape, kept_fixed_shape_many
from .order_statistics import (
    Kept,
    adjacent_order_statistics,
    as_float,
    gradient_mean,
    interpolated_quantile,
    quantile_ranks,
)
from .reuse import KeptBuffers
from .sharded import sharded_thresholds

__all__ = [
    "FixedKept",
    "Kept",
    "candidate_count",
    "kept_and_flags",
    "kept_fixed_shape",
    "kept_fixed_shape_many",
    "KeptBuffers",
    "adjacent_order_statistics",
    "gradient_mean",
    "interpolated_quantile",
    "kept_entries_many",
    "kept_entries_sharded",
    "kept_indices",
    "quantile_ranks",
    "zscore_mask",
]


def kept_entries_many(
    grads: list[torch.Tensor],
    quantile: float,
    means: list[torch.Tensor] | None = None,
    buffers: list[KeptBuffers] | None = None,
    fixed_shape: bool | None = None,
) -> list[Kept]:
    """For each gradient tensor, the flat indices the z-score filter keeps and g there.

    ``means`` (from ``gradient_mean``) saves a pass when the caller has them already.
    CPU tensors take the sampled bound (least memory traffic); accelerator tensors the
    fixed-shape path (``fixed_shape.py``: one ``topk`` each, one host synchronization per call).
    ``fixed_shape=True`` takes the accelerator's path on any device. ``buffers`` (one per tensor)
    hold CPU results from step to step (``reuse.py``; a large tensor's indices there are int32); the
    caching allocator already keeps an accelerator's peak steady, so they are not used there.
    """
    if not grads:
        return []
    grads = [g.detach() for g in grads]
    means = [gradient_mean(g) for g in grads] if means is None else means
    if fixed_shape if fixed_shape is not None else grads[0].device.type != "cpu":
        return kept_with_one_sync(grads, quantile, means)
    return kept_on_cpu(grads, quantile, means, buffers)


def kept_entries_sharded(
    grads: list[torch.Tensor], numels: list[int], quantile: float, means: list[torch.Tensor], group=None
) -> list[Kept]:
    """``kept_entries_many`` for tensors sliced across ranks (FSDP2): this rank's kept entries.

    ``grads`` are this rank's slices of full tensors of ``numels`` entries, ``means`` the full
    tensors' means; the threshold of each full tensor comes from ``sharded.sharded_thresholds``
    (collective: every rank calls this with the same tensors). Indices are into the local slice.
    """
    flats = [as_float(g.detach()) for g in grads]
    deviations = [(flat - mean).abs_() for flat, mean in zip(flats, means)]
    thresholds = sharded_thresholds(deviations, numels, quantile, group)
    kept = []
    for g, deviation, threshold in zip(grads, deviations, thresholds):
        if threshold is None:
            indices = torch.empty(0, dtype=torch.long, device=g.device)
        else:
            indices = torch.nonzero(deviation > threshold).squeeze(1)
        kept.append((indices, g.detach().reshape(-1).index_select(0, indices)))
    return kept


def kept_indices(grad: torch.Tensor, quantile: float) -> torch.Tensor:
    """Flat indices of the entries of one gradient tensor that the z-score filter keeps."""
    return kept_entries_many([grad], quantile)[0][0]


def zscore_mask(grad: torch.Tensor, quantile: float) -> torch.Tensor:
    """The z-score filter (docs/algorithm.md) of one gradient tensor: True where |z| > Q_p-quantile of |z|.

    Constant tensors and single entries give an empty mask, since the comparison is strict.
    """
    mask = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
    mask[kept_indices(grad, quantile)] = True
    return mask.view(grad.shape)
