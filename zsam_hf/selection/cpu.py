"""The z-score filter on the CPU: a sampled bound, one collecting pass, a small exact selection.

For each large tensor:

1. an evenly strided sample of d = |g - mean g| gives a bound ``low`` that lies just below
   the quantile with overwhelming probability;
2. one pass over cache-sized chunks collects the candidates d >= low (the kept entries
   plus a thin margin) with their gradient values, which also tells how many entries
   lie below the bound;
3. the quantile's two order statistics are selected exactly among the candidates, and
   the kept entries are the candidates above the quantile.

If the bound misses (lies above the quantile), an exact full selection takes over for that
tensor: the answer never depends on the sample. Selections go through NumPy's ``partition``
(vectorized, an order of magnitude faster than ``torch.kthvalue`` on a CPU); comparisons
that feed ``nonzero`` go through NumPy too, for the same reason.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .order_statistics import Kept, adjacent_order_statistics, as_float, quantile_ranks

# Largest sample drawn to bracket a quantile; tensors up to SMALL_TENSOR take an exact selection.
MAX_SAMPLE = 1 << 16
BRACKET_SIGMAS = 3.5
SMALL_TENSOR = 1 << 16
# Entries of |g - mean| materialized at a time (a buffer that stays in cache).
CHUNK = 1 << 18
# Sample strides avoid these primes, so a sample never locks onto a kernel's row or tap.
_SMALL_PRIMES = 2 * 3 * 5 * 7


def positions_above(values: torch.Tensor, bound, inclusive: bool = False, buffer: np.ndarray | None = None):
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
    kept = positions_above(deviation, threshold)
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
    straddles the quantile.  The sample is sorted (see ``adjacent_on_cpu`` on ties).
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
        found = positions_above(deviation, low, inclusive=not tie, buffer=work.mask)
        values.append(part.index_select(0, found))
        indices.append(found.add_(start))
    indices, values = _concat(indices), _concat(values)
    deviation = (values - mean).abs_()  # the very numbers the chunks compared
    if tie:  # candidates are the entries above the tied value; two counts place the quantile
        at_most_high = n - indices.numel()
        below = sum(
            int(np.count_nonzero(d.numpy() < low)) for _, _, d in _deviation_chunks(flat, mean, scratch)
        )
        if below <= lo and hi < at_most_high:
            return indices, values
        return _kept_exact(flat, mean, q)
    below = n - indices.numel()
    if below > lo:
        return _kept_exact(flat, mean, q)  # the bound missed the quantile: select exactly
    threshold = torch.lerp(*adjacent_order_statistics(deviation, lo - below), frac)
    keep = positions_above(deviation, threshold)
    return indices.index_select(0, keep), values.index_select(0, keep)


def kept_on_cpu(grads: list[torch.Tensor], q: float, means: list[torch.Tensor]) -> list[Kept]:
    work = None
    results = []
    for g, mean in zip(grads, means):
        flat = as_float(g)
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
