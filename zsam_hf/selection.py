"""The z-score filter of ZSAM: which gradient entries survive, found by O(n) selection.

SPEC.md keeps the entries of a weight tensor whose |z| = |g - mean g| / (std g + eps) is
strictly above the Q_p quantile of |z| (linear interpolation between order statistics,
the definition of ``torch.quantile``).  z is a positive rescaling of g - mean g and the
interpolated quantile commutes with positive rescaling, so everything here works on the
deviation d = |g - mean g| and the standard deviation is never materialized.

A full selection per tensor (``kthvalue``, ``torch.quantile``, a sort) costs more than
the rest of the step's bookkeeping together, and ``torch.quantile`` refuses tensors of
more than 2^24 entries.  Instead, for each large tensor:

1. a fixed pseudo-random sample of d gives a bracket [low, high] that holds the
   quantile with overwhelming probability;
2. one pass collects the candidates d >= low (the kept entries plus the thin bracket),
   which also tells how many entries lie below the bracket;
3. the quantile's two order statistics are selected exactly among the candidates inside
   the bracket, and the kept entries are the candidates above the quantile.

If a bracket misses, an exact full selection takes over for that tensor: the answer
never depends on the sample.
"""

from __future__ import annotations

import functools
import math

import torch

# Sample size used to bracket a quantile; tensors up to SMALL_TENSOR take an exact selection.
SAMPLE_SIZE = 16384
BRACKET_SIGMAS = 3.5
SMALL_TENSOR = 4 * SAMPLE_SIZE
SORT_LIMIT = 2048
# Entries of |g - mean| materialized at a time (a cache-sized scratch buffer).
CHUNK = 1 << 20
# Beyond this many entries the accelerator path selects instead of sorting (sort memory).
SORT_SIZE_LIMIT = 1 << 24
# Odd multiplier (Knuth's golden-ratio hash) spreading sample positions over a tensor
# without touching any random-number generator (training stays reproducible).
_HASH_MULTIPLIER = 2654435761


def quantile_ranks(n: int, q: float) -> tuple[tuple[int, int], float]:
    """The two 0-based order statistics that torch.quantile interpolates, and the weight."""
    pos = q * (n - 1)
    lo = math.floor(pos)
    return (lo, min(lo + 1, n - 1)), pos - lo


def adjacent_order_statistics(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order statistics at 0-based ranks ``rank`` and ``rank + 1`` (clamped), O(n).

    One selection finds the lower; the upper is the same value when it is repeated
    enough, else the smallest value above it: two cheap reductions instead of a second
    selection, and no host synchronization.
    """
    n = values.numel()
    if n <= SORT_LIMIT:
        ordered = torch.sort(values).values
        return ordered[rank], ordered[min(rank + 1, n - 1)]
    lower = torch.kthvalue(values, rank + 1).values
    if rank + 1 >= n:
        return lower, lower
    at_most_lower = torch.count_nonzero(values <= lower)
    smallest_above = torch.where(values > lower, values, torch.inf).min()
    return lower, torch.where(at_most_lower > rank + 1, lower, smallest_above)


def interpolated_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor, as torch.quantile/numpy.quantile define it, in O(n).

    With pos = q (n - 1): lerp(x_(floor pos), x_(floor pos + 1), pos - floor pos).
    Any size, any floating dtype.
    """
    (lo, _), frac = quantile_ranks(values.numel(), q)
    return torch.lerp(*adjacent_order_statistics(values, lo), frac)


def _as_float(grad: torch.Tensor) -> torch.Tensor:
    """Flattened, in float32 at least (half-precision means and differences are too coarse)."""
    flat = grad.reshape(-1)
    return flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat


def _deviation_chunks(flat: torch.Tensor, mean: torch.Tensor, scratch: torch.Tensor):
    """Yield (start, |g - mean|) over consecutive chunks of ``flat``, computed into ``scratch``.

    Chunks that fit in cache, in one buffer reused for every tensor of the step: on the
    CPU a fresh tensor-sized allocation costs more in page faults than the arithmetic.
    """
    step = scratch.numel()
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        yield start, torch.sub(part, mean, out=scratch[: part.numel()]).abs_()


def _full_deviation(flat: torch.Tensor) -> torch.Tensor:
    return (flat - flat.mean()).abs_()


def _kept_exact(deviation: torch.Tensor, q: float) -> torch.Tensor:
    return torch.nonzero(deviation > interpolated_quantile(deviation, q)).squeeze(1)


@functools.lru_cache(maxsize=256)
def _sample_positions(n: int, device: torch.device) -> torch.Tensor:
    """SAMPLE_SIZE fixed pseudo-random positions spread over a tensor of n entries."""
    return torch.arange(SAMPLE_SIZE, device=device, dtype=torch.long) * _HASH_MULTIPLIER % n


def _bracket(flat: torch.Tensor, mean: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sample order statistics of |g - mean|, BRACKET_SIGMAS rank deviations either side of q."""
    sample = (flat.index_select(0, _sample_positions(flat.numel(), flat.device)) - mean).abs_()
    centre = q * (SAMPLE_SIZE - 1)
    margin = int(BRACKET_SIGMAS * math.sqrt(SAMPLE_SIZE * q * (1 - q))) + 2
    low_rank = max(0, math.floor(centre) - margin)
    high_rank = min(SAMPLE_SIZE - 1, math.ceil(centre) + margin)
    if SAMPLE_SIZE - low_rank <= SAMPLE_SIZE // 8:  # a high quantile: one partial sort of the top
        top = torch.topk(sample, SAMPLE_SIZE - low_rank, sorted=True).values
        return top[-1], top[SAMPLE_SIZE - 1 - high_rank]
    return torch.kthvalue(sample, low_rank + 1).values, torch.kthvalue(sample, high_rank + 1).values


def _kept_bracketed(flat: torch.Tensor, q: float, scratch: torch.Tensor) -> torch.Tensor:
    """Kept flat indices of a large tensor: sample bracket, one collecting pass, small selection."""
    n = flat.numel()
    (lo, hi), frac = quantile_ranks(n, q)
    mean = flat.mean()
    low, high = _bracket(flat, mean, q)
    tie = bool(low == high)  # e.g. the zero taps of 3x3 kernels on 1x1 feature maps
    candidates, values = [], []
    for start, deviation in _deviation_chunks(flat, mean, scratch):
        found = torch.nonzero(deviation > low if tie else deviation >= low).squeeze(1)
        values.append(deviation.index_select(0, found))
        candidates.append(found.add_(start))
    candidates, values = (candidates[0], values[0]) if len(values) == 1 else (torch.cat(candidates), torch.cat(values))
    if tie:  # candidates are the entries above the tied value; two counts place the quantile
        at_most_high = n - candidates.numel()
        below = sum(int(torch.count_nonzero(d < low)) for _, d in _deviation_chunks(flat, mean, scratch))
        if below <= lo and hi < at_most_high:
            return candidates
        return _kept_exact(_full_deviation(flat), q)
    below = n - candidates.numel()
    in_bracket = values <= high
    n_bracket = int(torch.count_nonzero(in_bracket))
    if not (below <= lo and hi < below + n_bracket):
        return _kept_exact(_full_deviation(flat), q)  # the sample misled us: select exactly
    lower, upper = adjacent_order_statistics(values[in_bracket], lo - below)
    return candidates[values > torch.lerp(lower, upper, frac)]


def _kept_with_few_syncs(grads: list[torch.Tensor], q: float) -> list[torch.Tensor]:
    """Kept flat indices of all tensors with two host synchronizations in total (for GPUs).

    On a GPU a sort is cheap and every host round trip stalls the stream, so each
    tensor's threshold comes from a full sort (a selection beyond ``SORT_SIZE_LIMIT``),
    the masks go into one flat buffer, and a single ``nonzero`` plus one count per
    tensor split it back.  Exactly the same answer as the bracketed path.
    """
    device = grads[0].device
    sizes = [g.numel() for g in grads]
    mask = torch.zeros(sum(sizes), dtype=torch.bool, device=device)
    start = 0
    for g, n in zip(grads, sizes):
        if n > 1:
            deviation = _full_deviation(_as_float(g))
            (lo, hi), frac = quantile_ranks(n, q)
            if n <= SORT_SIZE_LIMIT:
                ordered = torch.sort(deviation).values
                lower, upper = ordered[lo], ordered[hi]
            else:
                lower, upper = adjacent_order_statistics(deviation, lo)
            torch.gt(deviation, torch.lerp(lower, upper, frac), out=mask[start : start + n])
        start += n
    kept = torch.nonzero(mask).squeeze(1)
    ends = torch.tensor(sizes, device=device).cumsum(0)
    counts = torch.bincount(torch.searchsorted(ends, kept, right=True), minlength=len(sizes)).tolist()
    starts = [0, *ends.tolist()[:-1]]
    return [part - offset for part, offset in zip(torch.split(kept, counts), starts)]


def kept_indices_many(grads: list[torch.Tensor], quantile: float) -> list[torch.Tensor]:
    """For each gradient tensor, the flat indices that the z-score filter keeps.

    CPU tensors take the sampled bracket (least memory traffic); accelerator tensors the
    sort-based path with two host synchronizations per call.
    """
    if not grads:
        return []
    if grads[0].device.type != "cpu":
        return _kept_with_few_syncs(grads, quantile)
    results = []
    scratch: torch.Tensor | None = None
    for g in grads:
        n = g.numel()
        if n <= 1:
            results.append(torch.empty(0, dtype=torch.long, device=g.device))
        elif n <= SMALL_TENSOR:
            results.append(_kept_exact(_full_deviation(_as_float(g)), quantile))
        else:
            if scratch is None:
                scratch = torch.empty(CHUNK, dtype=torch.float32)
            results.append(_kept_bracketed(_as_float(g), quantile, scratch))
    return results


def kept_indices(grad: torch.Tensor, quantile: float) -> torch.Tensor:
    """Flat indices of the entries of one gradient tensor that the z-score filter keeps."""
    return kept_indices_many([grad], quantile)[0]


def zscore_mask(grad: torch.Tensor, quantile: float) -> torch.Tensor:
    """SPEC.md's z-score filter of one gradient tensor: True where |z| > Q_p-quantile of |z|.

    Constant tensors and single entries give an empty mask, since the comparison is strict.
    """
    mask = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
    mask[kept_indices(grad, quantile)] = True
    return mask.view(grad.shape)
