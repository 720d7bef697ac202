"""The z-score filter on an accelerator: fixed-shape selections, then one host synchronization.

Each tensor's candidates come from ``fixed_shape.kept_fixed_shape`` (one ``topk``, no host
synchronization). The engine still decides on the host which tensors kept nothing (they fall back
to SAM's e_p, a dense offset), so the kept counts of all tensors are read in one transfer. The slots
are in descending order of deviation, so the kept ones are a prefix: with the counts known, each
tensor's kept entries are its first ``count`` slots, a view, with no further synchronization.
"""

from __future__ import annotations

import torch

from .fixed_shape import kept_fixed_shape_many
from .order_statistics import Kept


def kept_with_one_sync(grads: list[torch.Tensor], q: float, means: list[torch.Tensor]) -> list[Kept]:
    """Kept entries of every tensor, exactly those of the CPU path (in another order)."""
    return kept_and_flags(grads, q, means, [])[0]


def kept_and_flags(
    grads: list[torch.Tensor], q: float, means: list[torch.Tensor], flags: list[torch.Tensor]
) -> tuple[list[Kept], list[bool]]:
    """``kept_with_one_sync``, with ``flags`` (0-d device booleans, such as "the gradient is finite")
    read in the same transfer: a step's one host synchronization, as SAM's finiteness check is its."""
    found = kept_fixed_shape_many(grads, q, means)
    read = [*(f.to(torch.long).reshape(()) for f in flags), *(k.count() for k in found)]
    values = torch.stack(read).tolist() if read else []  # the one synchronization
    counts = values[len(flags) :]
    kept = [(k.indices[:count], k.values[:count]) for k, count in zip(found, counts)]
    return kept, [bool(v) for v in values[: len(flags)]]
