"""The z-score filter with shapes that depend on n and Q_p alone, and no host synchronization.

For a tensor of n entries the interpolated Q_p quantile of d = |g - mean g| lies between the order
statistics at ascending ranks lo = floor(Q_p (n - 1)) and lo + 1 (``quantile_ranks``). Every entry
strictly above the threshold is strictly above x_(lo), so it is among the n - 1 - lo largest: one
``topk`` of k = n - lo deviations (a multi-block radix select on CUDA, with no host synchronization)
holds both order statistics (its two smallest) and every kept entry (its k - 1 largest). The result
has k - 1 slots whatever the data; a slot whose deviation is not above the threshold (entries tied at
it, or a constant tensor) is marked invalid and carries a zero instead of leaving the shape. The kept
set is exactly the reference's, ties included: the same deviations, the same two order statistics,
the same ``torch.lerp``, the same strict comparison.

No ``nonzero``, no boolean indexing, no ``.item()``: the function runs under
``torch.compile(fullgraph=True)`` and inside CUDA graph capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .order_statistics import as_float, quantile_ranks


@dataclass
class FixedKept:
    """Candidates of one weight tensor: ``indices`` (flat, k - 1 of them), ``values`` (g there, zero where
    ``valid`` is False) and ``valid`` (the deviation is above the threshold: the entry is kept)."""

    indices: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    def count(self) -> torch.Tensor:
        """How many entries are kept, as a device tensor."""
        return self.valid.sum()


def candidate_count(numel: int, q: float) -> int:
    """The slots of a tensor of ``numel`` entries: n - 1 - floor(q (n - 1)) (0 for a single entry)."""
    (lo, _), _ = quantile_ranks(numel, q)
    return numel - 1 - lo


def kept_fixed_shape(grad: torch.Tensor, q: float, mean: torch.Tensor | None = None) -> FixedKept:
    """The z-score filter of one gradient tensor in ``candidate_count(grad.numel(), q)`` slots."""
    flat = as_float(grad.detach())
    n = flat.numel()
    slots = candidate_count(n, q)
    if slots == 0:  # a single entry: its deviation is 0, never above the quantile
        empty = torch.empty(0, dtype=torch.long, device=grad.device)
        return FixedKept(
            empty, grad.detach().reshape(-1)[:0], torch.empty(0, dtype=torch.bool, device=grad.device)
        )
    mean = flat.mean() if mean is None else mean
    deviation = (flat - mean).abs_()
    (_, _), frac = quantile_ranks(n, q)
    top = torch.topk(deviation, slots + 1, sorted=True)  # descending: ranks n - 1 ... lo
    lower, upper = top.values[slots], top.values[slots - 1]  # x_(lo), x_(lo + 1)
    threshold = torch.lerp(lower, upper, frac)
    indices = top.indices[:slots]
    valid = top.values[:slots] > threshold
    values = grad.detach().reshape(-1).index_select(0, indices)
    values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return FixedKept(indices, values, valid)


def kept_fixed_shape_many(
    grads: list[torch.Tensor], q: float, means: list[torch.Tensor] | None = None
) -> list[FixedKept]:
    """``kept_fixed_shape`` of each gradient (one ``topk`` each; no host synchronization)."""
    means = [None] * len(grads) if means is None else means
    return [kept_fixed_shape(g, q, m) for g, m in zip(grads, means)]
