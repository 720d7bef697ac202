"""The z-score filter on an accelerator: sort-based thresholds, one flat mask, two host syncs."""

from __future__ import annotations

import torch

from .order_statistics import Kept, adjacent_by_kthvalue, as_float, quantile_ranks


def kept_with_few_syncs(grads: list[torch.Tensor], q: float, means: list[torch.Tensor]) -> list[Kept]:
    """Kept entries of all tensors with two host synchronizations in total (for GPUs).

    On a GPU every host round trip stalls the stream, so each tensor's threshold comes
    from torch ops alone (``adjacent_by_kthvalue``), the masks go into one flat buffer,
    and a single ``nonzero`` plus one count per tensor split it back.  Exactly the same
    answer as the CPU path.
    """
    device = grads[0].device
    sizes = [g.numel() for g in grads]
    mask = torch.zeros(sum(sizes), dtype=torch.bool, device=device)
    start = 0
    for g, mean, n in zip(grads, means, sizes):
        if n > 1:
            deviation = (as_float(g) - mean).abs_()
            (lo, _), frac = quantile_ranks(n, q)
            threshold = torch.lerp(*adjacent_by_kthvalue(deviation, lo), frac)
            torch.gt(deviation, threshold, out=mask[start : start + n])
        start += n
    kept = torch.nonzero(mask).squeeze(1)
    ends = torch.tensor(sizes, device=device).cumsum(0)
    counts = torch.bincount(torch.searchsorted(ends, kept, right=True), minlength=len(sizes)).tolist()
    starts = [0, *ends.tolist()[:-1]]
    results = []
    for g, part, offset in zip(grads, torch.split(kept, counts), starts):
        indices = part - offset
        results.append((indices, g.reshape(-1).index_select(0, indices)))
    return results
