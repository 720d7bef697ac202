"""The z-score filter of ZSAM: which gradient entries survive, found by O(n) selection.

SPEC.md keeps the entries of a weight tensor whose |z| = |g - mean g| / (std g + eps) is
strictly above the Q_p quantile of |z| (linear interpolation between order statistics,
the definition of ``torch.quantile``).  z is a positive rescaling of g - mean g and the
interpolated quantile commutes with positive rescaling, so everything here works on the
deviation d = |g - mean g| and the standard deviation is never materialized.

A full selection per tensor (``kthvalue``, ``torch.quantile``, a sort) costs more than
the rest of the step's bookkeeping together, and ``torch.quantile`` refuses tensors of
more than 2^24 entries.  Instead, on the CPU, for each large tensor:

1. an evenly strided sample of d gives a bound ``low`` that lies just below the
   quantile with overwhelming probability;
2. one pass over cache-sized chunks collects the candidates d >= low (the kept entries
   plus a thin margin) with their gradient values, which also tells how many entries
   lie below the bound;
3. the quantile's two order statistics are selected exactly among the candidates, and
   the kept entries are the candidates above the quantile.

If the bound misses (lies above the quantile), an exact full selection takes over for
that tensor: the answer never depends on the sample.  Selections on the CPU go through NumPy's ``partition``
(vectorized, an order of magnitude faster than ``torch.kthvalue`` there); comparisons
that feed ``torch.nonzero`` go through NumPy too, for the same reason.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Largest sample drawn to bracket a quantile; tensors up to SMALL_TENSOR take an exact selection.
MAX_SAMPLE = 1 << 16
BRACKET_SIGMAS = 3.5
SMALL_TENSOR = 1 << 16
# Entries of |g - mean| materialized at a time (a buffer that stays in cache).
CHUNK = 1 << 18
# Beyond this many entries the accelerator path selects instead of sorting (sort memory).
SORT_SIZE_LIMIT = 1 << 24
# Up to this many entries a CPU selection sorts (robust to ties) instead of partitioning.
SORT_ON_CPU = 1 << 16
# Sample strides avoid these primes, so a sample never locks onto a kernel's row or tap.
_SMALL_PRIMES = 2 * 3 * 5 * 7

Kept = tuple[torch.Tensor, torch.Tensor]  # flat indices, gradient values there


def quantile_ranks(n: int, q: float) -> tuple[tuple[int, int], float]:
    """The two 0-based order statistics that torch.quantile interpolates, and the weight."""
    pos = q * (n - 1)
    lo = math.floor(pos)
    return (lo, min(lo + 1, n - 1)), pos - lo


def _adjacent_on_cpu(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order statistics ``rank`` and ``rank + 1`` through NumPy's vectorized sort or partition.

    NumPy's partition is an order of magnitude faster than ``torch.kthvalue`` on the CPU
    but slows down twentyfold on heavy ties (the zero taps of a kernel), which its sort
    shrugs off: arrays up to SORT_ON_CPU entries (samples, small tensors) are sorted.
    """
    exact = values if values.dtype in (torch.float32, torch.float64) else values.float()
    arr = exact.contiguous().numpy()
    arr = np.sort(arr) if arr.size <= SORT_ON_CPU else np.partition(arr, rank)
    upper = arr[rank + 1 :].min() if rank + 1 < arr.size else arr[rank]
    pair = torch.tensor([arr[rank], upper], dtype=exact.dtype).to(values.dtype)
    return pair[0], pair[1]


def _adjacent_by_kthvalue(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        return _adjacent_on_cpu(values, rank)
    return _adjacent_by_kthvalue(values, rank)


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


def gradient_mean(grad: torch.Tensor) -> torch.Tensor:
    """mean g as the filter computes it (in float32 for half-precision gradients)."""
    return _as_float(grad).mean()


def _positions_above(values: torch.Tensor, bound, inclusive: bool = False, buffer: np.ndarray | None = None):
    """Positions where ``values > bound`` (``>=`` if inclusive), for a CPU tensor.

    NumPy compares into a byte mask several times faster than torch does, and its
    ``nonzero`` runs a branch-free loop once more than a tenth of the bytes are set (a
    branchy one, slower than torch's, below that).  Sparser masks (the candidates are
    ~5%) are read in two branch-free steps: the 8-byte words holding any set byte (a
    run of set words appended lifts their density above a tenth), then the set bytes
    inside those words (at least one in eight, by construction).
    """
    arr = values.numpy()
    size = arr.size
    whole, pad = size // 8, size // 64 + 1  # 8-byte words, set words appended
    if buffer is None or buffer.size < size + whole + pad:
        buffer = np.empty(size + whole + pad, dtype=bool)
    mask = buffer[:size]
    (np.greater_equal if inclusive else np.greater)(arr, arr.dtype.type(bound), out=mask)
    if 10 * np.count_nonzero(mask) > size:  # dense already: one branch-free pass
        return torch.from_numpy(np.flatnonzero(mask))
    words = mask[: whole * 8].view(np.uint64)
    word_set = buffer[size : size + whole + pad]
    np.not_equal(words, 0, out=word_set[:whole])
    word_set[whole:] = True
    hit = np.flatnonzero(word_set)[:-pad]
    inside = np.flatnonzero(words[hit].view(bool))
    positions = hit[inside >> 3] * 8 + (inside & 7)
    if size > whole * 8:
        positions = np.concatenate([positions, whole * 8 + np.flatnonzero(mask[whole * 8 :])])
    return torch.from_numpy(positions)


def _kept_exact(flat: torch.Tensor, mean: torch.Tensor, q: float) -> Kept:
    """A full selection on |g - mean|: small tensors, and the fallback when a bound misses."""
    deviation = (flat - mean).abs_()
    (lo, _), frac = quantile_ranks(flat.numel(), q)
    threshold = torch.lerp(*adjacent_order_statistics(deviation, lo), frac)
    kept = _positions_above(deviation, threshold)
    return kept, flat.index_select(0, kept)


class _Workspace:
    """Chunk-sized buffers reused for every tensor of a step.

    On the CPU a fresh tensor-sized allocation costs more in page faults than the
    arithmetic, and a chunk that stays in cache makes each pass over it cheap.
    """

    def __init__(self):
        self.mask = np.empty(CHUNK + CHUNK // 8 + CHUNK // 64 + 1, dtype=bool)
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def scratch(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._scratch:
            self._scratch[dtype] = torch.empty(CHUNK, dtype=dtype)
        return self._scratch[dtype]


def _deviation_chunks(flat: torch.Tensor, mean: torch.Tensor, scratch: torch.Tensor):
    """Yield (start, gradient chunk, |chunk - mean|) over consecutive chunks, |.| in ``scratch``."""
    step = scratch.numel()
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        yield start, part, torch.sub(part, mean, out=scratch[: part.numel()]).abs_()


def _coprime_stride(stride: int) -> int:
    """The first stride >= ``stride`` sharing no factor with 2, 3, 5 or 7."""
    stride = max(stride, 1)
    while math.gcd(stride, _SMALL_PRIMES) != 1:
        stride += 1
    return stride


def _sample(flat: torch.Tensor, mean: torch.Tensor) -> np.ndarray:
    """|g - mean| at evenly strided positions: (4n)^(2/3) of them, at most MAX_SAMPLE.

    That size balances the selection on the sample against the extra candidates that
    the bound's safety margin (shrinking as 1/sqrt(sample)) lets in; strided reads are
    prefetched, unlike scattered ones, and the stride is coprime with small kernel sizes.
    """
    n = flat.numel()
    stride = _coprime_stride(n // min(MAX_SAMPLE, int((4 * n) ** (2 / 3))))
    return (flat[stride // 2 :: stride] - mean).abs_().numpy()


def _bracket(sample: np.ndarray, q: float):
    """Sample order statistics BRACKET_SIGMAS binomial rank deviations either side of q.

    The lower one bounds the quantile from below; both equal means a run of tied values
    straddles the quantile.  The sample is sorted (see ``_adjacent_on_cpu`` on ties).
    """
    m = sample.size
    centre = q * (m - 1)
    margin = int(BRACKET_SIGMAS * math.sqrt(m * q * (1 - q))) + 2
    ordered = np.sort(sample)
    return ordered[max(0, math.floor(centre) - margin)], ordered[min(m - 1, math.ceil(centre) + margin)]


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _kept_bracketed(flat: torch.Tensor, mean: torch.Tensor, q: float, work: _Workspace) -> Kept:
    """Kept entries of a large tensor: a sampled bound, one collecting pass, a small selection."""
    n = flat.numel()
    (lo, hi), frac = quantile_ranks(n, q)
    low, high = _bracket(_sample(flat, mean), q)
    tie = bool(low == high)  # e.g. the zero taps of 3x3 kernels on 1x1 feature maps
    scratch = work.scratch(flat.dtype)
    indices, values = [], []
    for start, part, deviation in _deviation_chunks(flat, mean, scratch):
        found = _positions_above(deviation, low, inclusive=not tie, buffer=work.mask)
        values.append(part.index_select(0, found))
        indices.append(found.add_(start))
    indices, values = _concat(indices), _concat(values)
    deviation = (values - mean).abs_()  # the very numbers the chunks compared
    if tie:  # candidates are the entries above the tied value; two counts place the quantile
        at_most_high = n - indices.numel()
        below = sum(int(np.count_nonzero(d.numpy() < low)) for _, _, d in _deviation_chunks(flat, mean, scratch))
        if below <= lo and hi < at_most_high:
            return indices, values
        return _kept_exact(flat, mean, q)
    below = n - indices.numel()
    if below > lo:
        return _kept_exact(flat, mean, q)  # the bound missed the quantile: select exactly
    threshold = torch.lerp(*adjacent_order_statistics(deviation, lo - below), frac)
    keep = _positions_above(deviation, threshold)
    return indices.index_select(0, keep), values.index_select(0, keep)


def _kept_on_cpu(grads: list[torch.Tensor], q: float, means: list[torch.Tensor]) -> list[Kept]:
    work = None
    results = []
    for g, mean in zip(grads, means):
        flat = _as_float(g)
        if flat.numel() <= 1:
            kept = torch.empty(0, dtype=torch.long), flat[:0]
        elif flat.numel() <= SMALL_TENSOR:
            kept = _kept_exact(flat, mean, q)
        else:
            work = work or _Workspace()
            kept = _kept_bracketed(flat, mean, q, work)
        indices, values = kept
        results.append((indices, values.to(g.dtype)))
    return results


def _kept_with_few_syncs(grads: list[torch.Tensor], q: float, means: list[torch.Tensor]) -> list[Kept]:
    """Kept entries of all tensors with two host synchronizations in total (for GPUs).

    On a GPU every host round trip stalls the stream, so each tensor's threshold comes
    from torch ops alone (``_adjacent_by_kthvalue``), the masks go into one flat buffer,
    and a single ``nonzero`` plus one count per tensor split it back.  Exactly the same
    answer as the CPU path.
    """
    device = grads[0].device
    sizes = [g.numel() for g in grads]
    mask = torch.zeros(sum(sizes), dtype=torch.bool, device=device)
    start = 0
    for g, mean, n in zip(grads, means, sizes):
        if n > 1:
            deviation = (_as_float(g) - mean).abs_()
            (lo, _), frac = quantile_ranks(n, q)
            threshold = torch.lerp(*_adjacent_by_kthvalue(deviation, lo), frac)
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


def kept_entries_many(
    grads: list[torch.Tensor], quantile: float, means: list[torch.Tensor] | None = None
) -> list[Kept]:
    """For each gradient tensor, the flat indices the z-score filter keeps and g there.

    ``means`` (from ``gradient_mean``) saves a pass when the caller has them already.
    CPU tensors take the sampled bound (least memory traffic); accelerator tensors the
    sort-based path with two host synchronizations per call.
    """
    if not grads:
        return []
    grads = [g.detach() for g in grads]
    means = [gradient_mean(g) for g in grads] if means is None else means
    if grads[0].device.type != "cpu":
        return _kept_with_few_syncs(grads, quantile, means)
    return _kept_on_cpu(grads, quantile, means)


def kept_indices(grad: torch.Tensor, quantile: float) -> torch.Tensor:
    """Flat indices of the entries of one gradient tensor that the z-score filter keeps."""
    return kept_entries_many([grad], quantile)[0][0]


def zscore_mask(grad: torch.Tensor, quantile: float) -> torch.Tensor:
    """SPEC.md's z-score filter of one gradient tensor: True where |z| > Q_p-quantile of |z|.

    Constant tensors and single entries give an empty mask, since the comparison is strict.
    """
    mask = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
    mask[kept_indices(grad, quantile)] = True
    return mask.view(grad.shape)
