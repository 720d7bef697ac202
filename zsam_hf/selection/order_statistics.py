"""Order statistics and the linearly interpolated quantile, exactly as ``torch.quantile`` defines it.

The building blocks every selection path shares: which two order statistics a quantile
interpolates, how to find them in O(n) on the CPU (NumPy) or with torch ops alone (an
accelerator, no host synchronization), and the float view of a gradient the filter works on.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Beyond this many entries the accelerator path selects instead of sorting (sort memory).
SORT_SIZE_LIMIT = 1 << 24
# Up to this many entries a CPU selection always sorts (cheap, and robust to ties).
SORT_ON_CPU = 1 << 12
# Entries of a larger array sorted to judge whether it has heavy ties.
TIE_PROBE = 1 << 9
# Above this share of tied neighbours in the probe a sort beats NumPy's partition.
TIED_SHARE = 1 / 16
# Above this many entries a CPU partition first narrows to a sampled bracket (``_pair_in_bracket``).
BRACKET_ON_CPU = 1 << 13
# How wide a sampled bracket is: binomial rank deviations of the sample either side of the rank
# (``bracket_ranks``; the CPU filter's bracket of the quantile and ``_pair_in_bracket``).
BRACKET_SIGMAS = 3.5
# Strides of a probe (or sample) avoid these primes, so it never locks onto a kernel's row or tap.
_SMALL_PRIMES = 2 * 3 * 5 * 7

Kept = tuple[torch.Tensor, torch.Tensor]  # flat indices, gradient values there


def quantile_ranks(n: int, q: float) -> tuple[tuple[int, int], float]:
    """The two 0-based order statistics that torch.quantile interpolates, and the weight."""
    pos = q * (n - 1)
    lo = math.floor(pos)
    return (lo, min(lo + 1, n - 1)), pos - lo


def adjacent_on_cpu(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order statistics ``rank`` and ``rank + 1`` through NumPy's vectorized partition or sort
    (which of the two: see ``adjacent_in_array``)."""
    exact = values if values.dtype in (torch.float32, torch.float64) else values.float()
    lower, upper = adjacent_in_array(exact.contiguous().numpy(), rank)
    pair = torch.tensor([lower, upper], dtype=exact.dtype).to(values.dtype)
    return pair[0], pair[1]


def adjacent_in_array(
    arr: np.ndarray, rank: int, nonnegative: bool = False, tied: bool | None = None
) -> tuple[np.floating, np.floating]:
    """``adjacent_on_cpu`` on a float32 or float64 NumPy array, returning NumPy scalars.

    NumPy's partition is faster than ``torch.kthvalue`` on the CPU but slows down tenfold
    on heavy ties (the zero taps of a kernel), which its sort shrugs off.  ``tied`` says
    which to run, when the caller knows (the answer is the same either way); else a sorted
    probe of the array decides.  Both ranks go to one partition, so no pass for the smallest
    value above ``rank`` follows (and at 9k-37k entries NumPy's two-rank partition was faster
    than its one-rank one in most of our runs).  Non-negative floats are ordered as their
    bit patterns read as integers, which NumPy partitions faster.
    """
    keys = integer_keys(arr) if nonnegative else arr
    if tied is None:
        tied = keys.size <= SORT_ON_CPU or probe_is_tied(keys)
    upper_rank = min(rank + 1, keys.size - 1)
    if tied:
        ordered = np.sort(keys)
        lower, upper = ordered[rank], ordered[upper_rank]
    elif keys.size > BRACKET_ON_CPU:
        lower, upper = _pair_in_bracket(keys, rank, upper_rank)
    else:
        lower, upper = _partitioned_pair(keys, rank, upper_rank)
    pair = np.array([lower, upper], dtype=keys.dtype).view(arr.dtype)
    return pair[0], pair[1]


def integer_keys(arr: np.ndarray) -> np.ndarray:
    """Non-negative floats viewed as integers of their width: the same order, partitioned faster."""
    return arr.view(np.int32 if arr.itemsize == 4 else np.int64)


def probe_is_tied(keys: np.ndarray) -> bool:
    """Whether a strided probe of TIE_PROBE entries says ``keys`` is heavily tied (a sort then beats a partition)."""
    return heavily_tied(np.sort(keys[:: coprime_stride(keys.size // TIE_PROBE)]))


def bracket_ranks(m: int, share: float, sigmas: float = BRACKET_SIGMAS) -> tuple[int, int]:
    """Ranks of a sample of ``m`` entries ``sigmas`` binomial rank deviations (and 2 more) either side of
    ``share`` (m - 1), unclamped: the order statistics there bound the array's ``share`` quantile with
    overwhelming probability."""
    centre = share * (m - 1)
    margin = int(sigmas * math.sqrt(m * share * (1 - share))) + 2
    return math.floor(centre) - margin, math.ceil(centre) + margin


def partitioned(keys: np.ndarray, rank: int, upper_rank: int) -> np.ndarray:
    """A copy of ``keys`` partitioned at ``rank`` and ``upper_rank`` (>= rank) at once."""
    return np.partition(keys, (rank, upper_rank) if upper_rank > rank else rank)


def _partitioned_pair(keys: np.ndarray, rank: int, upper_rank: int) -> tuple[np.generic, np.generic]:
    """Order statistics ``rank`` and ``upper_rank`` (= rank or rank + 1) of ``keys``: one partition at both."""
    part = partitioned(keys, rank, upper_rank)
    return part[rank], part[upper_rank]


def _pair_in_bracket(keys: np.ndarray, rank: int, upper_rank: int) -> tuple[np.generic, np.generic]:
    """``_partitioned_pair`` of an untied array, partitioning only the entries inside a sampled bracket.

    NumPy's partition costs 5-7 ns an entry at the sizes the filter meets (10k-40k entries);
    Floyd and Rivest's narrowing (a strided sample of n^(2/3) entries bounds the two ranks,
    then two comparison passes count the entries below the bound and keep those inside) leaves
    a twentieth of them to partition. The answer never depends on the sample: when the
    bracket misses either rank (or holds most of the array: ties), the whole array is partitioned.
    """
    n = keys.size
    stride = coprime_stride(n // int(n ** (2 / 3)))
    sample = keys[stride // 2 :: stride]
    m = sample.size
    first, last = bracket_ranks(m, rank / (n - 1))
    if first <= 0 and last >= m - 1:  # the bracket would hold the whole sample
        return _partitioned_pair(keys, rank, upper_rank)
    # A bracket reaching an end of the sample is open there: no entry lies outside it on that side.
    low, high = _partitioned_pair(sample, max(first, 0), min(last, m - 1))
    at_least_low = keys >= low if first > 0 else None
    inside = at_least_low if last >= m - 1 else keys <= high
    if at_least_low is not None and inside is not at_least_low:
        np.logical_and(inside, at_least_low, out=inside)
    below = n - int(np.count_nonzero(at_least_low)) if at_least_low is not None else 0
    inside = np.compress(inside, keys)
    if below <= rank and upper_rank - below < inside.size <= n // 2:
        return _partitioned_pair(inside, rank - below, upper_rank - below)
    return _partitioned_pair(keys, rank, upper_rank)


def heavily_tied(ordered: np.ndarray) -> bool:
    """Whether a sorted sample of an array has so many equal neighbours that a sort beats a partition."""
    return np.count_nonzero(ordered[1:] == ordered[:-1]) > TIED_SHARE * ordered.size


def coprime_stride(stride: int) -> int:
    """The first stride >= ``stride`` (and >= 1) sharing no factor with 2, 3, 5 or 7."""
    stride = max(stride, 1)
    while math.gcd(stride, _SMALL_PRIMES) != 1:
        stride += 1
    return stride


def adjacent_by_kthvalue(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order statistics ``rank`` and ``rank + 1`` with torch ops only (no host synchronization).

    On an accelerator a sort is cheap up to SORT_SIZE_LIMIT entries.  Beyond, one
    selection finds the lower; the upper is the same value when it is repeated enough,
    else the smallest value above it: two reductions instead of a second selection and
    no tensor-sized sort buffers.
    """
    n = values.numel()
    if n <= SORT_SIZE_LIMIT:
        ordered = torch.sort(values).values
        return ordered[rank], ordered[min(rank + 1, n - 1)]
    lower = torch.kthvalue(values, rank + 1).values
    if rank + 1 >= n:
        return lower, lower
    at_most_lower = torch.count_nonzero(values <= lower)
    smallest_above = torch.where(values > lower, values, torch.inf).min()
    return lower, torch.where(at_most_lower > rank + 1, lower, smallest_above)


def adjacent_order_statistics(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order statistics at 0-based ranks ``rank`` and ``rank + 1`` (clamped), O(n)."""
    if values.device.type == "cpu":
        return adjacent_on_cpu(values, rank)
    return adjacent_by_kthvalue(values, rank)


def interpolated_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor, as torch.quantile/numpy.quantile define it, in O(n).

    With pos = q (n - 1): lerp(x_(floor pos), x_(floor pos + 1), pos - floor pos).
    Any size, any floating dtype.
    """
    (lo, _), frac = quantile_ranks(values.numel(), q)
    return torch.lerp(*adjacent_order_statistics(values, lo), frac)


def as_float(grad: torch.Tensor) -> torch.Tensor:
    """Flattened, in float32 at least (half-precision means and differences are too coarse)."""
    flat = grad.reshape(-1)
    return flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat


def gradient_mean(grad: torch.Tensor) -> torch.Tensor:
    """mean g as the filter computes it (in float32 for half-precision gradients)."""
    return as_float(grad).mean()
