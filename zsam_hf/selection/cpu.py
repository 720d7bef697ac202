"""The z-score filter on the CPU: a sampled bound, one collecting pass, a small exact selection.

For each large tensor:

1. an evenly strided sample of d = |g - mean g| gives a bound ``low`` that lies just below
   the quantile with overwhelming probability;
2. one pass over cache-sized chunks collects the candidates d >= low (the kept entries
   plus a thin margin) with their gradient values.  It compares g itself with two bounds
   a few rounding errors outside mean -/+ low, so no d is materialized; the few extra
   entries this lets in are told apart by the candidates' exact d, which also tells how
   many entries lie below the bound;
3. the quantile's two order statistics are selected exactly among the candidates, and
   the kept entries are the candidates above the quantile.

If the bound misses (lies above the quantile), an exact full selection takes over for that
tensor: the answer never depends on the sample. Where a C compiler built the loops (``kernel.py``,
``entries.c``), order statistics are found by buckets of their bit patterns, narrowed again until a
handful are left to sort: the sample's bracket in the same call that draws the sample, and the kept set's
two in the band of candidates under the sample's upper bound, in the call that writes their deviations.
Only the threshold between those two goes through torch (``torch.lerp``, which ``torch.quantile``
interpolates with). The collecting pass, the deviations and the kept entries' copy are split between
torch's threads when large. Where ties leave the buckets too many entries, and without the loops,
selections go through NumPy's ``partition`` (both ranks at once, narrowed first by a sample:
``order_statistics.adjacent_in_array``), and NumPy finds positions through ``np.flatnonzero`` on a
padded mask (``_set_positions``; faster than ``torch.nonzero``, and than any word-by-word scheme at every
density from 0.5% to 30%, on NumPy 2.0 and 2.4).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from . import kernel
from .order_statistics import (
    BRACKET_SIGMAS,
    Kept,
    adjacent_in_array,
    as_float,
    bracket_ranks,
    coprime_stride,
    heavily_tied,
    integer_keys,
    partitioned,
    probe_is_tied,
    quantile_ranks,
)
from .reuse import KeptBuffers

# Largest sample drawn to bracket a quantile; tensors up to SMALL_TENSOR take an exact selection.
MAX_SAMPLE = 1 << 16
SMALL_TENSOR = 1 << 16
# Entries compared at a time: the chunk and its masks stay in a core's L2 cache for the gathers.
CHUNK = 1 << 17


def positions_above(values: torch.Tensor, bound, inclusive: bool = False, buffer: np.ndarray | None = None):
    """Positions where ``values > bound`` (``>=`` if inclusive), for a CPU tensor."""
    return torch.from_numpy(_positions_above(values.numpy(), bound, inclusive, buffer))


def _positions_above(arr: np.ndarray, bound, inclusive: bool = False, buffer: np.ndarray | None = None):
    """``positions_above`` on a NumPy array; ``buffer`` (see ``_mask_buffer``) is reused when large enough."""
    buffer = _mask_buffer(arr.size, buffer)
    (np.greater_equal if inclusive else np.greater)(arr, arr.dtype.type(bound), out=buffer[: arr.size])
    return _set_positions(buffer, arr.size)


def _padding(size: int) -> int:
    """Set entries appended to a mask of ``size`` so that at least a tenth of the padded mask is set."""
    return size // 9 + 1


def _mask_buffer(size: int, buffer: np.ndarray | None = None) -> np.ndarray:
    """A byte buffer that holds a mask of ``size`` entries and its padding (``_set_positions``):
    ``buffer`` when it is large enough."""
    needed = size + _padding(size)
    return buffer if buffer is not None and buffer.size >= needed else np.empty(needed, dtype=bool)


def _set_positions(buffer: np.ndarray, size: int) -> np.ndarray:
    """``np.flatnonzero(buffer[:size])``, through NumPy's branch-free loop.

    NumPy (2.0 to 2.4) finds the set entries of a mask by skipping runs of unset ones when
    fewer than a tenth are set, and with a branch-free loop otherwise. Around ZSAM's 5-6%
    the skips cost 0.9 ns an entry (a mispredicted branch every ~16 entries) against 0.5 ns
    for the loop, so set entries are appended after the mask until a tenth of it is set, and
    their positions (all at or after ``size``) are cut off the result.
    """
    pad = _padding(size)
    buffer[size : size + pad] = True
    return np.flatnonzero(buffer[: size + pad])[:-pad]


def _round_toward(value: float, dtype: np.dtype, direction: float) -> np.floating:
    """``value`` rounded to ``dtype`` toward ``direction`` (-inf or +inf)."""
    if abs(value) <= np.finfo(dtype).max:
        rounded = dtype.type(value)
    else:  # beyond the dtype's largest value: may round to an infinity, which NumPy warns of
        with np.errstate(over="ignore"):
            rounded = dtype.type(value)
    if rounded > value if direction < 0 else rounded < value:
        rounded = np.nextafter(rounded, dtype.type(direction))
    return rounded


def _outside_bounds(mean: float, low: float, dtype: np.dtype) -> tuple[np.floating, np.floating]:
    """``lower``, ``upper`` in ``dtype`` such that |g - mean| >= low, as ``dtype`` arithmetic computes
    it, implies g <= lower or g >= upper.

    Rounding g - mean moves it by at most half an ulp (relative) or, among subnormals, half
    the smallest one; the bounds give away several times that, rounded outwards, so
    comparing g itself (no subtraction pass) finds every candidate and at most a few more,
    which the candidates' exact |g - mean| then sets aside.
    """
    info = np.finfo(dtype)
    slack = 4 * float(info.eps) * (abs(mean) + low) + 4 * float(info.smallest_subnormal)
    return (
        _round_toward(mean - low + slack, dtype, math.inf),
        _round_toward(mean + low - slack, dtype, -math.inf),
    )


def _quantile_of_deviations(d: np.ndarray, rank: int, frac: float, tied: bool | None = None) -> float:
    """The kept entries' bound (``_kept_bound``) at the quantile between order statistics ``rank`` and
    ``rank + 1`` of |g - mean| (``tied``: see ``adjacent_in_array``)."""
    return _kept_bound(np.array(adjacent_in_array(d, rank, nonnegative=True, tied=tied)), frac)


# Rounding errors of any evaluation of torch.lerp's formula (two or three roundings in the tensor's type or a
# wider one, fused or not, the weight rounded to the type first) stay within about 3 units in the last place
# of the upper order statistic; the margin is twice that and more.
_LERP_MARGIN_ULPS = 8


def _kept_bound(pair: np.ndarray, frac: float) -> float:
    """A bound whose kept set (the deviations above it) is the one above the quantile that ``torch.quantile``
    interpolates between its two order statistics ``pair`` (a <= b, adjacent: no deviation lies between).

    That quantile, t = ``torch.lerp(a, b, frac)``, keeps {d >= b} when a <= t < b, so a itself is then the
    bound: where a == b or frac == 0 (t is a exactly), and where the exact a + frac (b - a) lies more than
    ``_LERP_MARGIN_ULPS`` units in the last place of b inside (a, b), which no rounding of the formula
    crosses. Otherwise (b a few units above a, frac near 0 or 1) t is ``torch.lerp``'s own value, rounded
    as the reference rounds it. In the step this skips a torch call for most tensors (docs/performance.md).
    """
    lower, upper = float(pair[0]), float(pair[1])
    if lower == upper or frac == 0:
        return lower
    step = upper - lower
    margin = _LERP_MARGIN_ULPS * _ulp(upper, pair.dtype)
    if frac * step > margin and (1 - frac) * step > margin:
        return lower
    pair = torch.from_numpy(pair)
    return torch.lerp(pair[0], pair[1], frac).item()


def _ulp(value: float, dtype: np.dtype) -> float:
    """The unit in the last place of a non-negative finite ``value`` in ``dtype`` (float32 or float64), at
    least the smallest subnormal's."""
    if dtype == np.float64:
        return math.ulp(value)
    info = np.finfo(np.float32)
    return max(math.ulp(value) * 2.0**29, float(info.smallest_subnormal))


def _kept_exact(flat: torch.Tensor, mean: torch.Tensor, q: float) -> Kept:
    """A full selection on |g - mean|: small tensors without the compiled loops, and the fallback when a
    bound misses."""
    deviation = (flat - mean).abs_()
    (lo, _), frac = quantile_ranks(flat.numel(), q)
    kept = positions_above(deviation, _quantile_of_deviations(deviation.numpy(), lo, frac))
    return kept, flat.take(kept)


def _kept_small(flat: torch.Tensor, mean: torch.Tensor, q: float, work: _Workspace) -> Kept:
    """``_kept_exact`` of a small tensor (up to SMALL_TENSOR entries) in three compiled calls, where the
    loops take it.

    One loop writes every |g - mean| (as torch's subtract and abs compute it) and counts them into buckets of
    their bit patterns; a second moves the few in the buckets that hold the quantile's two order statistics
    aside, where they are narrowed again until a handful are left to sort (``kernel.narrow_deviations``); the
    entries above the threshold between the two are counted and copied out in two more loops. Where NumPy
    and torch take two dozen calls, this saves little in the step (docs/performance.md): each call there
    waits for its code and data to come back after the pass over a large gradient before it.
    """
    gradient = flat.numpy()
    n = gradient.size
    (lo, _), frac = quantile_ranks(n, q)
    if not kernel.supports(gradient) or lo + 1 >= n:
        return _kept_exact(flat, mean, q)
    d, band, _ = work.deviations(gradient.dtype, n)
    narrowed = kernel.narrow_deviations(gradient, float(mean), lo, d, band)
    if narrowed is None:  # an infinite or NaN deviation, which the buckets cannot place
        return _kept_exact(flat, mean, q)
    threshold = _threshold(band, lo, frac, *narrowed)
    return _candidates_above(work.positions(n), gradient, d, threshold, None, None)


class _Workspace:
    """Buffers reused for every tensor of every step (one workspace per thread).

    On the CPU a fresh tensor-sized allocation costs more in page faults than the
    arithmetic, and a chunk that stays in cache makes each pass over it cheap.  The
    candidate buffers grow to the most candidates one tensor has had (about 6% of the
    largest gradient's bytes) and are never handed out: results are copies.
    """

    def __init__(self):
        self.mask = _mask_buffer(CHUNK)  # g >= upper, then the union
        self.low_side = np.empty(CHUNK, dtype=bool)  # g <= lower
        self._candidates: dict[tuple[np.dtype, np.dtype], tuple[np.ndarray, np.ndarray]] = {}
        self._deviations: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {}
        self._positions = np.empty(0, dtype=kernel.INDEX)
        self._samples: dict[np.dtype, np.ndarray] = {}
        self._scratch: dict[np.dtype, np.ndarray] = {}

    def candidates(
        self, dtype: np.dtype, needed: int, kept: int, index: np.dtype = np.dtype(np.int64)
    ) -> tuple[np.ndarray, np.ndarray]:
        """Index (of type ``index``) and value buffers of at least ``needed`` entries, the first ``kept``
        preserved. They grow by a quarter at least, not double: they stay resident between steps, and count
        in the step's peak."""
        indices, values = self._candidates.get(
            (dtype, index), (np.empty(0, dtype=index), np.empty(0, dtype=dtype))
        )
        if values.size < needed:
            size = max(needed, values.size + values.size // 4)
            grown = np.empty(size, dtype=index), np.empty(size, dtype=dtype)
            grown[0][:kept], grown[1][:kept] = indices[:kept], values[:kept]
            indices, values = self._candidates[(dtype, index)] = grown
        return indices, values

    def positions(self, size: int) -> np.ndarray:
        """0, 1, ..., size - 1 as the collecting loops' indices (``kernel.INDEX``): a small tensor's every
        entry as a candidate (``_kept_small``)."""
        if self._positions.size < size:
            self._positions = np.arange(max(size, SMALL_TENSOR), dtype=kernel.INDEX)
        return self._positions[:size]

    def sample(self, dtype: np.dtype, size: int) -> np.ndarray:
        """A buffer for a sample of ``size`` entries (about MAX_SAMPLE at most)."""
        return self._sized(self._samples, dtype, size)

    def scratch(self, dtype: np.dtype, size: int) -> np.ndarray:
        """A buffer of ``size`` entries (a sample's) for the compiled loops to narrow in."""
        return self._sized(self._scratch, dtype, size)

    @staticmethod
    def _sized(buffers: dict[np.dtype, np.ndarray], dtype: np.dtype, size: int) -> np.ndarray:
        buffer = buffers.get(dtype)
        if buffer is None or buffer.size < size:
            buffer = buffers[dtype] = np.empty(max(size, MAX_SAMPLE), dtype=dtype)
        return buffer[:size]

    def deviations(self, dtype: np.dtype, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Buffers for ``size`` deviations and for the band of them near the quantile, and a mask buffer
        (``_mask_buffer``) for as many."""
        d, band, mask = self._deviations.get(dtype, (np.empty(0, dtype=dtype), None, None))
        if d.size < size:
            d, band, mask = self._deviations[dtype] = (
                np.empty(size, dtype=dtype),
                np.empty(size, dtype=dtype),
                _mask_buffer(size),
            )
        return d[:size], band, mask


_workspaces = threading.local()


def _workspace() -> _Workspace:
    if not hasattr(_workspaces, "work"):
        _workspaces.work = _Workspace()
    return _workspaces.work


def _sample_stride(n: int) -> int:
    """The stride of ``_sample``'s positions (the first is at stride // 2)."""
    return coprime_stride(n // min(MAX_SAMPLE, max(1024, int(n ** (2 / 3)) // 2)))


def _sample(flat: torch.Tensor, mean: torch.Tensor) -> np.ndarray:
    """|g - mean| at evenly strided positions (``_sample_stride``): n^(2/3) / 2 of them, at least 1024 and
    at most MAX_SAMPLE.

    n^(2/3) balances drawing and sorting the sample (each strided read its own cache line) against
    the extra candidates that the bound's safety margin (shrinking as 1/sqrt(sample)) lets in. In
    the step, where each read of a cold gradient also walks its page table, a sample costs about
    three times what it costs repeated, so the balance sits at half the size that suited repeated
    runs (ResNet-18: 0.3 ms a step less; docs/performance.md). Strided reads are prefetched,
    unlike scattered ones, and the stride is coprime with small kernel sizes.
    """
    stride = _sample_stride(flat.numel())
    return (flat[stride // 2 :: stride] - mean).abs_().numpy()


def _sampled_bracket(
    flat: torch.Tensor, mean: torch.Tensor, q: float, work: _Workspace
) -> tuple[np.ndarray, tuple[np.floating, np.floating, bool | None]]:
    """``_sample`` and its ``_bracket`` (the tie judgement None: not made, as a later selection that needs it
    probes for itself): in one compiled call where the loops take the gradient, the sample then in
    ``work``'s buffer, valid until the next tensor's."""
    gradient = flat.numpy()
    if not kernel.supports(gradient):
        sample = _sample(flat, mean)
        return sample, _bracket(sample, q)
    n, stride = gradient.size, _sample_stride(gradient.size)
    m = (n - 1 - stride // 2) // stride + 1  # the positions stride // 2, stride // 2 + stride, ... below n
    sample = work.sample(gradient.dtype, m)
    first, last = _bracket_ranks(m, q)
    scratch = work.scratch(gradient.dtype, m)
    found = kernel.sample_bracket(gradient, stride // 2, stride, float(mean), first, last, sample, scratch)
    return sample, (_bracket(sample, q) if found is None else (found[0], found[1], None))


def _expected_candidates(in_sample: np.ndarray, n: int, parts: int) -> list[int]:
    """How many candidates each of ``parts`` equal parts of a tensor of ``n`` entries holds, as the sample
    has them (``in_sample``: which sampled entries are candidates). Each part is counted on its own
    sampled entries, so a tensor whose candidates crowd into one part (a layer's few loud channels) sizes
    that part's room by them."""
    stride = _sample_stride(n)
    starts = kernel.part_starts(n, parts)
    # The first sampled position at or after each part's start.
    first = [min(in_sample.size, max(0, -(-(start - stride // 2) // stride))) for start in starts]
    expected = []
    for t in range(parts):
        sampled = first[t + 1] - first[t]
        hits = int(np.count_nonzero(in_sample[first[t] : first[t + 1]]))
        expected.append((starts[t + 1] - starts[t]) * hits // max(sampled, 1))
    return expected


def _bracket_ranks(m: int, q: float) -> tuple[int, int]:
    """The ranks of a sample of ``m`` entries that bracket the q quantile: BRACKET_SIGMAS binomial rank
    deviations either side of it, within the sample."""
    first, last = bracket_ranks(m, q, BRACKET_SIGMAS)
    return max(0, first), min(m - 1, last)


def _bracket(sample: np.ndarray, q: float) -> tuple[np.floating, np.floating, bool]:
    """Sample order statistics BRACKET_SIGMAS binomial rank deviations either side of q (``_bracket_ranks``),
    and whether the sample at and above the lower one is heavily tied, through NumPy.

    The lower one bounds the quantile from below; both equal means a run of tied values
    straddles the quantile.  One partition at both ranks places them (a sort of the whole
    sample cost 5x more); only the part from the lower bound up, the few percent above the
    quantile, is sorted, to say whether the candidates are tied.  A sample that is tied
    almost everywhere (a partition's worst case, see ``adjacent_in_array``) is sorted whole.
    """
    first, last = _bracket_ranks(sample.size, q)
    keys = integer_keys(sample)  # non-negative: ordered as integers
    if probe_is_tied(keys):
        ordered = np.sort(keys)
    else:
        ordered = partitioned(keys, first, last)
        ordered[first:].sort()
    ordered = ordered.view(sample.dtype)
    return ordered[first], ordered[last], heavily_tied(ordered[first:])


def _candidates(
    gradient: np.ndarray, mean: float, low: float, work: _Workspace, in_sample: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every entry with |g - mean| >= low (and at most a few more): flat indices and g there.
    ``in_sample`` (which sampled entries are candidates) sizes the compiled loop's buffers.

    One compiled loop (``kernel.py``) compares g itself with the two ``_outside_bounds``, split between
    torch's threads on a large tensor, and writes 32-bit indices (``kernel.INDEX``; a gradient of more than
    ``kernel.MAX_ENTRIES`` entries takes NumPy's path). Without it, one pass of NumPy over cache-sized
    chunks, on one thread (a helper thread of our own, sharing a core with torch's spinning OpenMP worker,
    made it slower: docs/performance.md), with 64-bit indices.
    """
    lower, upper = _outside_bounds(mean, low, gradient.dtype)
    if kernel.supports(gradient) and gradient.size <= kernel.MAX_ENTRIES:
        parts = kernel.threads(gradient.size, kernel.PARALLEL_SCAN)
        expected = _expected_candidates(in_sample, gradient.size, parts)
        return _candidates_compiled(gradient, lower, upper, work, expected)
    count = 0
    indices, values = work.candidates(gradient.dtype, 0, 0)
    for start in range(0, gradient.size, CHUNK):
        part = gradient[start : start + CHUNK]
        size = part.size
        np.greater_equal(part, upper, out=work.mask[:size])
        np.less_equal(part, lower, out=work.low_side[:size])
        np.bitwise_or(work.mask[:size], work.low_side[:size], out=work.mask[:size])
        found = _set_positions(work.mask, size)
        end = count + found.size
        if end > values.size:
            indices, values = work.candidates(gradient.dtype, end, count)
        np.add(found, start, out=indices[count:end])
        np.take(part, found, out=values[count:end], mode="clip")
        count = end
    return indices[:count], values[:count]


def _room(expected: int, parts: int) -> int:
    """Room for a part's candidates: the sample's estimate, plus several times its error (relative error
    about 1/sqrt(hits), larger for a part's fewer sampled entries) and a fixed margin."""
    return expected + expected * parts // 32 + 4096


def _candidates_compiled(
    gradient: np.ndarray, lower, upper, work: _Workspace, expected: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``_candidates`` in one compiled loop (``kernel.py``), into the workspace's buffers: each of
    ``len(expected)`` parts (one thread each) with room for its expected count (``_room``). A part that
    fills its room ends the parallel pass there; the buffers grow and one thread resumes where it stopped."""
    parts = len(expected)
    capacities = [_room(e, parts) for e in expected]
    indices, values = work.candidates(gradient.dtype, sum(capacities), 0, kernel.INDEX)
    if parts > 1:
        count, start = kernel.collect_parts(gradient, lower, upper, indices, values, capacities)
    else:
        count, start = kernel.collect(gradient, 0, lower, upper, indices, values)
    while start < gradient.size:
        indices, values = work.candidates(gradient.dtype, values.size + 1024, count, kernel.INDEX)
        written, start = kernel.collect(gradient, start, lower, upper, indices[count:], values[count:])
        count += written
    return indices[:count], values[:count]


def _kept_bracketed(
    flat: torch.Tensor, mean: torch.Tensor, q: float, work: _Workspace, out: KeptBuffers | None = None
) -> Kept:
    """Kept entries of a large tensor: a sampled bound, one collecting pass, a small selection
    (written into ``out`` when given)."""
    n = flat.numel()
    (lo, hi), frac = quantile_ranks(n, q)
    sample, (low, high, tied) = _sampled_bracket(flat, mean, q, work)
    gradient, center = flat.numpy(), mean.numpy()
    # A constant gradient (e.g. zero, behind a zero-initialized norm scale): every |g - mean| is equal,
    # none is above the quantile.
    if low == high and _constant(gradient):
        return torch.empty(0, dtype=torch.long), flat[:0]
    indices, values = _candidates(gradient, float(center), float(low), work, sample >= low)
    d, band, mask = work.deviations(gradient.dtype, values.size)
    # The few extra candidates (under the bound) sort first, so ranks count from n - candidates.
    rank = lo - (n - d.size)
    # |g - mean| exactly as a full pass computes it; the entries under the bound, exactly; the band under
    # the sample's upper bound (``_near_the_quantile``), narrowed in the same call to the two order statistics
    narrowed = None
    if kernel.supports(values, d):
        threads = kernel.threads(values.size, kernel.PARALLEL_CANDIDATES)
        at_least_low, in_band, narrowed = kernel.deviations_pair(
            values, float(center), low, high, rank, d, band, threads
        )
        below, band = n - at_least_low, band[:in_band]
    else:
        np.abs(np.subtract(values, center, out=d), out=d)
        below, band = n - int(np.count_nonzero(d >= low)), None
    if low == high:  # a run of ties straddles the quantile (e.g. the zero taps of 3x3 kernels on 1x1 maps)
        at_most_high = n - int(np.count_nonzero(d > low))
        if below <= lo and hi < at_most_high:  # both order statistics are the tied value
            return _candidates_above(indices, values, d, low, mask, out)
        return _kept_exact(flat, mean, q)
    if below > lo:
        return _kept_exact(flat, mean, q)  # the bound missed the quantile: select exactly
    if narrowed is not None:  # the compiled band, narrowed to the two order statistics
        threshold = _threshold(band, rank, frac, *narrowed)
    else:
        threshold = _quantile_of_deviations(_near_the_quantile(d, rank, high, mask, band), rank, frac, tied)
    return _candidates_above(indices, values, d, threshold, mask, out)


def _threshold(
    band: np.ndarray, rank: int, frac: float, left: int, below: int, pair: np.ndarray | None
) -> float:
    """The kept entries' bound (``_kept_bound``) from a compiled narrowing of ``band`` (``kernel.narrow_pair``):
    from its two order statistics, or, where ties left more entries than the loop sorts, selected among those
    left."""
    if pair is not None:
        return _kept_bound(pair, frac)
    return _quantile_of_deviations(band[:left], rank - below, frac)


def _near_the_quantile(
    d: np.ndarray, rank: int, high, mask: np.ndarray, band: np.ndarray | None = None
) -> np.ndarray:
    """The deviations under the sample's upper bound ``high`` (``band``, when the compiled loop wrote them),
    when both order statistics ``rank`` and ``rank + 1`` of ``d`` lie there (they are then the same order
    statistics of the band); else ``d``.

    The candidates are the kept ~5% plus the band up to ``high``, a tenth of that size: selecting
    in the band alone costs a comparison pass over the candidates instead of a partition of them.
    """
    if band is None:
        band = np.compress(np.less(d, high, out=mask[: d.size]), d)  # twice as fast as d[mask]
    return band if band.size > rank + 1 else d


def _constant(gradient: np.ndarray) -> bool:
    """Whether every entry is the same value: one pass, where collecting the candidates would gather all of
    them (the sample's bracket is tied, and every entry is then a candidate)."""
    return bool(gradient.min() == gradient.max())


def _candidates_above(
    indices: np.ndarray, values: np.ndarray, d: np.ndarray, bound, mask: np.ndarray, out: KeptBuffers | None
) -> Kept:
    """The candidates whose |g - mean| is above ``bound``, copied out of the workspace (into ``out``)."""
    if kernel.supports(values, d) and indices.dtype == kernel.INDEX and indices.flags.c_contiguous:
        return _candidates_above_compiled(indices, values, d, bound, out)
    keep = _positions_above(d, bound, buffer=mask)
    if out is None:
        return torch.from_numpy(indices.take(keep)), torch.from_numpy(values.take(keep))
    held_indices, held_values = out.hold(keep.size, torch.from_numpy(values[:0]).dtype, torch.device("cpu"))
    np.take(indices, keep, out=held_indices.numpy(), mode="clip")  # "clip": no buffered copy; keep is valid
    np.take(values, keep, out=held_values.numpy(), mode="clip")
    return held_indices, held_values


# The compiled loops' value dtypes as torch names them (cheaper than asking torch.from_numpy).
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _candidates_above_compiled(
    indices: np.ndarray, values: np.ndarray, d: np.ndarray, bound, out: KeptBuffers | None
) -> Kept:
    """``_candidates_above`` in the compiled loops: a count, then one loop that keeps the entries (each split
    between torch's threads when there are enough candidates). Into ``out``, the indices stay 32-bit, as
    collected: the engine's climb and restore read them in the compiled loops too, so each pass over the
    kept entries reads half the index bytes, and the buffers hold a third less between the passes."""
    counts = kernel.count_above(d, bound, kernel.threads(d.size, kernel.PARALLEL_CANDIDATES))
    count, dtype = int(counts.sum()), _TORCH_DTYPES[values.dtype]
    if out is None:
        kept = torch.empty(count, dtype=torch.long), torch.empty(count, dtype=dtype)
    else:
        kept = out.hold(count, dtype, torch.device("cpu"), torch.int32)
    kernel.keep_above(indices, values, d, bound, kept[0].numpy(), kept[1].numpy(), counts)
    return kept


def kept_on_cpu(
    grads: list[torch.Tensor], q: float, means: list[torch.Tensor], buffers: list[KeptBuffers] | None = None
) -> list[Kept]:
    """Kept entries of each CPU gradient. With ``buffers`` (one per gradient), a large float32 or
    float64 gradient's results are views of its buffers, their indices int32 where the compiled loops
    took it; small tensors' results (a few KB) and the rare exact fallback are fresh tensors, which do
    not move the resident peak, with int64 indices."""
    results = []
    for i, (g, mean) in enumerate(zip(grads, means)):
        flat = as_float(g)
        out = None if buffers is None else buffers[i]
        if flat.numel() <= 1:
            kept = torch.empty(0, dtype=torch.long), flat[:0]
        elif flat.numel() <= SMALL_TENSOR:
            kept = _kept_small(flat, mean, q, _workspace())
        else:
            kept = _kept_bracketed(flat, mean, q, _workspace(), out)
        indices, values = kept
        results.append((indices, values.to(g.dtype)))
    return results
