"""The z-score filter of tensors sharded across ranks (FSDP2), exact, without gathering whole tensors.

Each rank holds a slice of every weight gradient. The threshold of a tensor is the Q_p quantile of
|g - mean g| over the *full* tensor, so the ranks must agree on it; gathering every tensor onto every
rank would cost the memory sharding saves. Instead, for all tensors of a step at once:

1. each rank samples its slice at a stride set by the full tensor's size; the samples (a few
   thousand entries per tensor) are gathered, and every rank derives the same bracket [low, high]
   around the quantile from them, as the CPU path does;
2. the counts of entries below ``low`` and at most ``high`` are summed over ranks (one all-reduce):
   they tell whether the bracket holds the two order statistics the quantile interpolates, and at
   which ranks among the bracket's entries they sit;
3. the entries inside the bracket (a thin band around the quantile) are gathered and the two
   order statistics selected exactly among them. A bracket of one tied value needs no gather; a
   bracket that misses (rare) gathers that tensor's entries whole, so the answer never depends on
   the sample.

Four small collectives per step, whatever the number of tensors; every rank then keeps the entries
of its own slice above the threshold. The result is the single-process filter's, bit for bit,
given the same means.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .order_statistics import adjacent_order_statistics, bracket_ranks, quantile_ranks

SAMPLE_PER_TENSOR = 4096
BRACKET_SIGMAS = 4.0


def _all_gather_varlen(local: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's 1-D ``local`` tensor (lengths may differ), in rank order."""
    world = dist.get_world_size(group)
    length = torch.tensor([local.numel()], dtype=torch.long, device=local.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(n) for n in lengths]
    padded = torch.zeros(max(sizes), dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [g[:n] for g, n in zip(gathered, sizes)]


def _split_per_rank(gathered: list[torch.Tensor], counts: torch.Tensor) -> list[list[torch.Tensor]]:
    """Cut each rank's concatenation into per-tensor pieces: result[t] = the pieces of tensor t."""
    per_tensor: list[list[torch.Tensor]] = [[] for _ in range(counts.shape[1])]
    for rank_data, rank_counts in zip(gathered, counts):
        for t, piece in enumerate(torch.split(rank_data, rank_counts.tolist())):
            per_tensor[t].append(piece)
    return per_tensor


def _stride(n: int) -> int:
    return max(1, n // SAMPLE_PER_TENSOR)


def _bracket(sample: torch.Tensor, q: float) -> tuple[float, float]:
    """Sample order statistics BRACKET_SIGMAS binomial rank deviations either side of q."""
    m = sample.numel()
    if m == 0:
        return -math.inf, math.inf
    first, last = bracket_ranks(m, q, BRACKET_SIGMAS)
    ordered = torch.sort(sample).values
    return float(ordered[max(0, first)]), float(ordered[min(m - 1, last)])


def sharded_thresholds(
    deviations: list[torch.Tensor], numels: list[int], q: float, group=None
) -> list[torch.Tensor | None]:
    """The Q_p-quantile of each full tensor's |g - mean|, from each rank's slice of it.

    ``deviations[t]`` is this rank's slice of tensor t's |g - mean| (flat, float32 or wider),
    ``numels[t]`` the full tensor's size. Collective: every rank calls it with the same tensors
    in the same order. Tensors of fewer than two entries get None (nothing is kept).
    """
    device = deviations[0].device if deviations else torch.device("cpu")
    dtype = deviations[0].dtype if deviations else torch.float32

    # 1. samples -> the same bracket on every rank
    samples = [d[_stride(n) // 2 :: _stride(n)] for d, n in zip(deviations, numels)]
    counts = _gathered_counts([s.numel() for s in samples], device, group)
    gathered = _all_gather_varlen(
        torch.cat(samples) if samples else torch.empty(0, dtype=dtype, device=device), group
    )
    brackets = [_bracket(torch.cat(pieces), q) for pieces in _split_per_rank(gathered, counts)]

    # 2. counts below low and at most high, summed over ranks
    local_counts = torch.tensor(
        [[int((d < low).sum()), int((d <= high).sum())] for d, (low, high) in zip(deviations, brackets)],
        dtype=torch.long,
        device=device,
    ).reshape(-1, 2)
    dist.all_reduce(local_counts, group=group)

    # 3. the band between the bounds (or everything, where a bracket missed), gathered; exact selection
    plans, bands = [], []
    for d, n, (low, high), (below, at_most_high) in zip(deviations, numels, brackets, local_counts.tolist()):
        (lo, hi), frac = quantile_ranks(n, q) if n >= 2 else ((0, 0), 0.0)
        holds = below <= lo and hi < at_most_high
        if n < 2:
            plans.append(None)
            bands.append(d[:0])
        elif holds and low == high:  # a run of one tied value holds both order statistics
            plans.append(("tied", low))
            bands.append(d[:0])
        elif holds:
            plans.append(("band", lo - below, frac))
            bands.append(d[(d >= low) & (d <= high)])
        else:
            plans.append(("all", lo, frac))
            bands.append(d)
    counts = _gathered_counts([b.numel() for b in bands], device, group)
    gathered = _all_gather_varlen(
        torch.cat(bands) if bands else torch.empty(0, dtype=dtype, device=device), group
    )
    thresholds: list[torch.Tensor | None] = []
    for plan, pieces in zip(plans, _split_per_rank(gathered, counts)):
        if plan is None:
            thresholds.append(None)
        elif plan[0] == "tied":
            thresholds.append(torch.tensor(plan[1], dtype=dtype, device=device))
        else:
            _, rank, frac = plan
            lower, upper = adjacent_order_statistics(torch.cat(pieces), rank)
            thresholds.append(torch.lerp(lower, upper, frac))
    return thresholds


def _gathered_counts(counts: list[int], device, group) -> torch.Tensor:
    """[world, len(counts)]: every rank's per-tensor counts."""
    local = torch.tensor(counts, dtype=torch.long, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return torch.stack(gathered)
