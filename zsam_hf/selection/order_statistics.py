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

    NumPy's partition is an order of magnitude faster than ``torch.kthvalue`` on the CPU
    but slows down tenfold on heavy ties (the zero taps of a kernel), which its sort
    shrugs off.  ``tied`` says which to run, when the caller knows (the answer is the
    same either way); else a sorted probe of the array decides.  Non-negative floats are
    ordered as their bit patterns read as integers, which NumPy partitions twice as fast.
    """
    keys = arr.view(np.int32 if arr.itemsize == 4 else np.int64) if nonnegative else arr
    if tied is None:
        tied = keys.size <= SORT_ON_CPU or heavily_tied(
            np.sort(keys[:: coprime_stride(keys.size // TIE_PROBE)])
        )
    keys = np.sort(keys) if tied else np.partition(keys, rank)
    upper = keys[rank + 1 :].min() if rank + 1 < keys.size else keys[rank]
    pair = np.array([keys[rank], upper], dtype=keys.dtype).view(arr.dtype)
    return pair[0], pair[1]


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
