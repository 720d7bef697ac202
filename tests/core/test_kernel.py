"""The compiled loops of the CPU filter (``zsam_hf/selection/entries.c``, loaded by ``kernel.py``).

Each loop against NumPy doing the same thing, on the entries that break comparisons (NaN, infinities,
signed zeros, subnormals, entries equal to a bound), at lengths around the 16-entry vector, with output
buffers small enough to stop the pass many times; the collecting loop in its AVX-512 version and its
portable one; split between threads (parts whose room fills, resumed on one thread) and on one. Then the
whole filter and the engine with the loops and without them (``ZSAM_HF_KERNEL=0``, or a compiler that
fails), and with the loops on torch's threads and on one: the same kept entries and the same weights, bit
for bit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from reference import reference_mask

from zsam_hf.perturbation import SharpnessPerturbation
from zsam_hf.selection import cpu, kept_entries_many, kernel


@pytest.fixture
def on_torch_threads():
    """The loops split large work between torch's two threads (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield kernel.use_threads(True)
    kernel.use_threads(True)
    torch.set_num_threads(threads)


@pytest.fixture(params=["avx512", "portable"])
def vector_loops(request):
    """The loops that have an AVX-512 version (collect, the deviations, the buckets' counts and moves, keep)
    run it, or the portable one: each test that takes this runs both."""
    if request.param == "avx512" and not kernel.use_avx512(True):
        pytest.skip("this CPU has no AVX-512: the portable loop is the one that runs")  # both run on CI's
    yield kernel.use_avx512(request.param == "avx512")
    kernel.use_avx512(True)


def test_the_loops_are_built_where_there_is_a_c_compiler():
    assert shutil.which("cc") or shutil.which("gcc"), "this machine has no C compiler"
    assert kernel.library() is not None


def _awkward(n: int, dtype, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n).astype(dtype)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, np.finfo(dtype).smallest_subnormal, 1.5, -1.5])
    where = rng.integers(0, max(n, 1), size=min(n, 40))
    g[where] = rng.choice(specials.astype(dtype), size=where.size)
    return g


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 1000, 262_147])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bounds", [(-1.5, 1.5), (-np.inf, np.inf), (0.0, -0.0), (-0.01, 0.01)])
def test_collect_finds_what_numpy_finds(vector_loops, n, dtype, bounds):
    """Bounds equal to entries (1.5), at the infinities (only infinities qualify), crossed (every entry
    qualifies) and narrow; NaN never qualifies. Buffers of 37 entries make the pass stop and resume."""
    g = _awkward(n, dtype, seed=n)
    lower, upper = (dtype(b) for b in bounds)
    want = np.flatnonzero((g >= upper) | (g <= lower))
    indices, values = np.empty(37, dtype=np.int32), np.empty(37, dtype=dtype)
    found_indices, found_values, start = [], [], 0
    while True:
        written, start = kernel.collect(g, start, lower, upper, indices, values)
        found_indices.append(indices[:written].copy())
        found_values.append(values[:written].copy())
        if start >= n:
            break
    np.testing.assert_array_equal(np.concatenate(found_indices), want)
    np.testing.assert_array_equal(np.concatenate(found_values), g[want])  # NaN-free: want has no NaN


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("room", [100_000, 700, 37])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_collect_in_parts_finds_what_numpy_finds(vector_loops, parts, room, dtype):
    """Each part collected on its own thread, then moved to follow the one before. With room for all, the
    pass ends at the end; with little room, it ends where the first part that filled stopped, and one
    thread resumes from there, as the filter does."""
    n = 20_011
    g = _awkward(n, dtype, seed=parts)
    lower, upper = dtype(-1.5), dtype(1.5)
    want = np.flatnonzero((g >= upper) | (g <= lower))
    indices, values = np.empty(room * parts, dtype=np.int32), np.empty(room * parts, dtype=dtype)
    count, start = kernel.collect_parts(g, lower, upper, indices, values, [room] * parts)
    if room * parts > want.size:
        assert start == n and count == want.size
    else:
        assert start < n and count <= room * parts
    assert count == np.searchsorted(want, start)  # everything before where it stopped, nothing after
    np.testing.assert_array_equal(indices[:count], want[:count])
    np.testing.assert_array_equal(values[:count], g[want[:count]])
    found_indices, found_values = [indices[:count].copy()], [values[:count].copy()]
    while start < n:
        written, start = kernel.collect(g, start, lower, upper, indices, values)
        found_indices.append(indices[:written].copy())
        found_values.append(values[:written].copy())
    np.testing.assert_array_equal(np.concatenate(found_indices), want)
    np.testing.assert_array_equal(np.concatenate(found_values), g[want])


def test_collect_in_parts_refuses_buffers_smaller_than_the_room_given():
    g = np.zeros(100, dtype=np.float32)
    with pytest.raises(ValueError, match="cannot hold capacities"):
        kernel.collect_parts(g, -1.0, 1.0, np.empty(10, np.int32), np.empty(10, np.float32), [6, 6])


def test_the_loops_refuse_indices_of_another_width():
    """The collecting loops write 32-bit indices, and the kept entries' copy reads them and writes 32- or
    64-bit ones: a buffer of another width is refused, not misread."""
    g = np.zeros(100, dtype=np.float32)
    values = np.empty(100, dtype=np.float32)
    with pytest.raises(ValueError, match="int32 indices"):
        kernel.collect(g, 0, -1.0, 1.0, np.empty(100, np.int64), values)
    with pytest.raises(ValueError, match="int32 indices"):
        kernel.collect_parts(g, -1.0, 1.0, np.empty(100, np.int64), values, [50, 50])
    d, out = np.ones(100, dtype=np.float32), np.empty(100, dtype=np.float32)
    with pytest.raises(ValueError, match="reads int32 indices and writes int32 or int64"):
        kernel.keep_above(np.arange(100, dtype=np.int64), values, d, 0.5, np.empty(100, np.int64), out)
    for width in (np.int16, np.uint32):
        with pytest.raises(ValueError, match="reads int32 indices and writes int32 or int64"):
            kernel.keep_above(np.arange(100, dtype=np.int32), values, d, 0.5, np.empty(100, width), out)


def test_a_gradient_beyond_32_bit_indices_takes_numpys_path(monkeypatch):
    """A gradient of more than ``kernel.MAX_ENTRIES`` entries (2^31: made small here) is collected by NumPy
    with 64-bit indices and its kept entries copied by NumPy: the same kept entries as the compiled loops."""
    g = torch.randn(300_000, generator=torch.Generator().manual_seed(8)).reshape(300, 1000)
    compiled = _kept([g], 0.95)[0]
    collected = []
    original = cpu._candidates

    def spy(*args):
        indices, values = original(*args)
        collected.append(indices.dtype)
        return indices, values

    monkeypatch.setattr(kernel, "MAX_ENTRIES", 299_999)
    monkeypatch.setattr(cpu, "_candidates", spy)
    beyond = _kept([g], 0.95)[0]
    assert collected == [np.dtype(np.int64)]
    np.testing.assert_array_equal(beyond[0], compiled[0])
    np.testing.assert_array_equal(beyond[1], compiled[1])
    np.testing.assert_array_equal(compiled[0], np.flatnonzero(reference_mask(g, 0.95)))


def _per_part(mask: np.ndarray, parts: int) -> list[int]:
    """How many entries of ``mask`` are set in each of ``parts`` near-equal parts (``kernel.part_starts``)."""
    starts = kernel.part_starts(mask.size, parts)
    return [int(np.count_nonzero(mask[starts[t] : starts[t + 1]])) for t in range(parts)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [0, 1, 15, 16, 17, 33, 5000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deviations_and_the_band_are_numpys(vector_loops, m, dtype, threads):
    """``deviations_pair``: |values - center| bit for bit as NumPy's subtract and abs (-0.0 becomes +0.0,
    subnormals stay), the count at or above ``low`` and the band under ``high`` in order, against NumPy doing
    each; split between threads, the parts' bands follow one another in order."""
    values = _awkward(m, dtype, seed=m)
    values = values[np.isfinite(values)]  # the candidates are finite: the finite check comes first
    if values.size:
        values[0] = dtype(0.25)  # an entry at the center: a deviation of +0.0
    values[1::7], values[2::7], values[3::11] = 0.75, 1.75, -0.25  # deviations of exactly low and high
    center, low, high = dtype(0.25), dtype(0.5), dtype(1.5)
    want = np.abs(np.subtract(values, center))
    d, band = np.full(values.size + 3, np.nan, dtype=dtype), np.full(values.size + 3, np.nan, dtype=dtype)
    at_least_low, in_band, narrowed = kernel.deviations_pair(values, center, low, high, -1, d, band, threads)
    assert narrowed is None  # no rank: the band is left as written
    assert d[: values.size].tobytes() == want.tobytes()
    assert at_least_low == np.count_nonzero(want >= low)
    assert band[:in_band].tobytes() == want[want < high].tobytes()
    if values.size:
        with pytest.raises(ValueError, match="cannot hold"):
            kernel.deviations_pair(values, center, low, high, -1, d[: values.size - 1], band, threads)
    # with a rank: the same deviations, count and band, narrowed as narrow_pair narrows a copy of it, where
    # the band holds the two order statistics, and untouched where it does not
    for rank in (-1, 0, in_band // 2, in_band - 2, in_band - 1):
        d2, band2 = np.full_like(d, np.nan), np.full_like(band, np.nan)
        got = kernel.deviations_pair(values, center, low, high, rank, d2, band2, threads)
        assert got[:2] == (at_least_low, in_band) and d2.tobytes() == d.tobytes()
        if 0 <= rank < in_band - 1:
            copy = band[:in_band].copy()
            left, below, pair = kernel.narrow_pair(copy, low, high, rank)
            assert got[2][:2] == (left, below) and band2[:left].tobytes() == copy[:left].tobytes()
            assert (got[2][2] is None) == (pair is None)
            assert pair is None or got[2][2].tolist() == pair.tolist()
        else:
            assert got[2] is None and band2[:in_band].tobytes() == band[:in_band].tobytes()


def _bands(dtype) -> dict[str, tuple[np.ndarray, float, float]]:
    """Non-negative bands with their bounds: spread over the bounds, some entries under ``low`` (the
    candidates the rounding slack lets in) and over ``high``, runs of ties, subnormals and zeros, one value
    throughout, bounds that are equal, and bounds far wider and far narrower than the entries."""
    rng = np.random.default_rng(5)
    spread = (1.9 + 0.2 * rng.random(30_000)).astype(dtype)
    spread[:40] = dtype(1.85)  # under low
    spread[40:60] = dtype(2.2)  # over high
    tied = np.repeat(np.array([1.0, 2.0, 2.0, 2.0, 3.0], dtype=dtype), 2_000)
    rng.shuffle(tied)
    tiny = np.abs(rng.standard_normal(3_000)).astype(dtype) * np.finfo(dtype).smallest_subnormal * 7
    tiny[::5] = 0
    # every key from 1.0's to 3.0's on a multiple of the bucket width there (2048 buckets span [1, 3]), each
    # twice, shuffled: a move must take a bucket's first key and leave the next bucket's
    keys = np.uint32 if dtype == np.float32 else np.uint64
    width = 1 << (13 if dtype == np.float32 else 42)
    edges = np.arange(dtype(1.0).view(keys), dtype(3.0).view(keys) + 1, width, dtype=keys)
    edges = np.repeat(edges.view(dtype), 2)
    rng.shuffle(edges)
    return {
        "spread": (spread, 1.9, 2.1),
        "bucket edges": (edges, 1.0, 3.0),
        "tied": (tied, 1.0, 3.0),
        "subnormal": (tiny, 0.0, float(tiny.max())),
        "constant": (np.full(1_000, dtype(0.5)), 0.5, 0.5),
        "wide bounds": (spread, 0.0, float(np.finfo(dtype).max)),
        "narrow bounds": (spread, 2.0, float(np.nextafter(dtype(2.0), dtype(3.0)))),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_narrow_pair_gives_the_two_order_statistics_or_the_few_entries_that_hold_them(vector_loops, dtype):
    """Narrowed until few entries are left, the loop sorts out order statistics ``rank`` and ``rank + 1``
    itself: NumPy's sort's. Where ties the buckets cannot split leave more than ``PAIR_SORT`` (two values,
    many copies of each, straddling the ranks; one value everywhere), it returns those entries instead, and
    they hold the two at ``rank - below`` and ``rank + 1 - below``. Either way the entries left are exactly
    the band's between the least and the greatest left (in the band's order where they were not sorted),
    ``below`` entries lie under them, and a spread band narrows all the way to the two."""
    bands = _bands(dtype)
    bands["two tied values"] = (np.repeat(np.array([1.0, 1000.0], dtype=dtype), 50), 1.0, 1000.0)
    bands["one value"] = (np.full(100, 3.0, dtype=dtype), 0.0, 4.0)
    paired = {}
    for name, (band, low, high) in bands.items():
        ordered = np.sort(band)
        for rank in sorted({0, 1, band.size // 3, band.size // 2 - 1, band.size // 2, band.size - 2}):
            work = band.copy()
            left, below, pair = kernel.narrow_pair(work, low, high, rank)
            expected = ordered[[rank, rank + 1]].tolist()
            near = work[:left]
            inside = band[(band >= near.min()) & (band <= near.max())]
            assert (np.sort(near) if pair is not None else near).tobytes() == (
                np.sort(inside) if pair is not None else inside
            ).tobytes(), (name, rank)
            assert below == np.count_nonzero(band < near.min()), (name, rank)
            if pair is not None:
                assert left <= kernel.PAIR_SORT and pair.dtype == band.dtype, (name, rank)
                assert pair.tolist() == expected, (name, rank)
            else:
                assert left > kernel.PAIR_SORT, (name, rank)
                selected = np.sort(work[:left])[[rank - below, rank + 1 - below]]
                assert selected.tolist() == expected, (name, rank)
            paired[name, rank] = pair is not None
    assert all(paired[name, rank] for name, rank in paired if name == "spread" and 1 < rank < 29_000)
    assert not paired["two tied values", 49] and not paired["one value", 50]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sample_bracket_samples_as_numpy_and_selects_as_a_sort(vector_loops, dtype):
    """The strided sample of |g - centre| is NumPy's, entry for entry; its order statistics at any two ranks
    (equal, at both ends) of spread, subnormal and tied gradients are a sort's, or None where ties leave
    the loop too many entries to sort, or a deviation is infinite or NaN. Ranks outside the sample,
    positions past the gradient, or too small a buffer are refused."""
    rng = np.random.default_rng(11)
    gradients = {
        "spread": rng.standard_normal(90_001),
        "wide": rng.standard_normal(30_000) * np.exp(rng.uniform(-40, 40, size=30_000)),
        "subnormal": rng.standard_normal(20_000) * float(np.finfo(dtype).smallest_subnormal) * 9,
        "few values": rng.integers(-2, 3, size=20_000).astype(np.float64),
        "one value": np.full(15_000, 0.5),
        "two entries": np.array([2.0, 1.0, 7.0]),
    }
    found = {}
    for name, values in gradients.items():
        g = values.astype(dtype)
        center = dtype(g.mean()) if name != "wide" else dtype(0.0)
        stride = 1 if g.size < 10 else 7
        start = stride // 2
        expected = np.abs(g[start::stride] - center)
        ordered, m = np.sort(expected), expected.size
        for first, last in {
            (0, 0),
            (0, m - 1),
            (m - 1, m - 1),
            (m // 2, m // 2),
            (m // 3, m - 2),
            (1, 9 * m // 10),
        }:
            if first > last:
                continue
            sample, work = np.full(m, np.nan, dtype=dtype), np.full(m, np.nan, dtype=dtype)
            pair = kernel.sample_bracket(g, start, stride, center, first, last, sample, work)
            assert sample.tobytes() == expected.tobytes(), name
            if pair is not None:
                assert pair.tolist() == ordered[[first, last]].tolist(), (name, first, last)
            found[name, first, last] = pair is not None
    assert all(
        ok for (name, _, _), ok in found.items() if name in ("spread", "wide", "one value", "two entries")
    )
    # hundreds of copies of each value at both ranks: the loop gives way at least somewhere
    assert not all(ok for (name, _, _), ok in found.items() if name == "few values")
    for bad in (np.inf, np.nan):
        g = np.array([1.0, 2.0, bad, 0.5], dtype=dtype)
        assert kernel.sample_bracket(g, 0, 1, dtype(0), 0, 1, np.empty(4, dtype), np.empty(4, dtype)) is None
    g = np.ones(9, dtype)
    for first, last in ((-1, 2), (2, 1), (0, 4)):
        with pytest.raises(ValueError, match="order statistics"):
            kernel.sample_bracket(g, 0, 2, dtype(0), first, last, np.empty(4, dtype), np.empty(4, dtype))
    with pytest.raises(ValueError, match="not all in"):
        kernel.sample_bracket(g, 1, 3, dtype(0), 0, 1, np.empty(4, dtype), np.empty(4, dtype))
    with pytest.raises(ValueError, match="cannot hold"):
        kernel.sample_bracket(g, 0, 2, dtype(0), 0, 1, np.empty(4, dtype), np.empty(3, dtype))


def test_the_compiled_sample_and_bracket_are_torchs_sample_and_numpys_bracket():
    """On real-sized gradients (a normal one, one with heavy tails, one with the zero taps of kernels on 1x1
    maps): the compiled call's sample is ``_sample``'s, bit for bit, and its bracket ``_bracket``'s."""
    gen = torch.Generator().manual_seed(4)
    taps = torch.zeros(256, 128, 3, 3)
    taps[:, :, 1, 1] = torch.randn(256, 128, generator=gen)
    grads = {
        "normal": torch.randn(512, 256, 3, 3, generator=gen),
        "heavy": torch.randn(700, 400, generator=gen) ** 5,
        "zero taps": taps,
    }
    for name, grad in grads.items():
        flat = grad.reshape(-1)
        mean = flat.mean()
        sample, (low, high, tied) = cpu._sampled_bracket(flat, mean, 0.95, cpu._Workspace())
        want = cpu._sample(flat, mean)
        assert sample.tobytes() == want.tobytes(), name
        want_low, want_high, want_tied = cpu._bracket(want, 0.95)
        assert (low, high) == (want_low, want_high), name
        assert tied is None or tied == want_tied, name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_narrow_deviations_is_the_deviations_then_narrow_pair_over_all_of_them(vector_loops, dtype):
    """One loop writes d = |g - center| as NumPy computes it and counts the buckets, a second moves the
    entries near order statistics ``rank`` and ``rank + 1``, which are then narrowed as ``narrow_pair`` does:
    the same result as ``narrow_pair`` over a copy of NumPy's deviations, over the whole finite range, and
    NumPy's sort's order statistics; a deviation that is infinite or NaN gives None."""
    rng = np.random.default_rng(7)
    gradients = {
        "spread": rng.standard_normal(5000),
        "ties": rng.integers(-3, 4, size=3000).astype(np.float64),
        "wide": rng.standard_normal(2000) * np.exp(rng.uniform(-80, 80, size=2000)),
        "constant": np.full(100, 0.25),
    }
    for name, values in gradients.items():
        g = values.astype(dtype)
        center = dtype(g.mean())
        expected_d = np.abs(g - center)
        ordered = np.sort(expected_d)
        for rank in sorted({0, g.size // 2, g.size - 2}):
            d, band = np.full(g.size, np.nan, dtype=dtype), np.full(g.size + 3, np.nan, dtype=dtype)
            left, below, pair = kernel.narrow_deviations(g, center, rank, d, band)
            assert d.tobytes() == expected_d.tobytes(), (name, rank)
            work = expected_d.copy()
            want_left, want_below, want_pair = kernel.narrow_pair(work, 0.0, np.finfo(dtype).max, rank)
            assert (left, below) == (want_left, want_below), (name, rank)
            assert band[:left].tobytes() == work[:left].tobytes(), (name, rank)
            if name == "spread":
                assert pair is not None, rank
            if pair is None:  # heavy ties at the ranks (the wide one's deviations are mostly |mean|)
                assert want_pair is None and left > kernel.PAIR_SORT, (name, rank)
                pair = np.sort(band[:left])[[rank - below, rank + 1 - below]]
            else:
                assert pair.tolist() == want_pair.tolist(), (name, rank)
            assert pair.tolist() == ordered[[rank, rank + 1]].tolist(), (name, rank)
    for bad in (np.inf, np.nan):
        g = np.array([1.0, bad, 2.0, 3.0], dtype=dtype)
        assert kernel.narrow_deviations(g, dtype(1), 1, np.empty(4, dtype), np.empty(4, dtype)) is None
        g = np.linspace(-1, 1, 40).astype(dtype)
        g[20] = bad  # in a whole block of 16, where the vector loop reads it
        assert kernel.narrow_deviations(g, dtype(0), 5, np.empty(40, dtype), np.empty(40, dtype)) is None
    with pytest.raises(ValueError, match="order statistics"):
        kernel.narrow_deviations(np.ones(4, dtype), dtype(1), 3, np.empty(4, dtype), np.empty(4, dtype))
    with pytest.raises(ValueError, match="cannot hold"):
        kernel.narrow_deviations(np.ones(4, dtype), dtype(1), 1, np.empty(3, dtype), np.empty(4, dtype))


def test_the_vector_loops_narrow_exactly_as_the_portable_ones():
    """The AVX-512 loops (float32's deviations, the buckets' counts, the moves) and the portable ones give
    the same results, byte for byte, where the two could part: entries on bucket edges, deviations of exactly
    ``low`` and ``high``, ties, subnormals (``_bands``; each loop is also checked against NumPy above, on both
    versions). float64 has only the portable loops."""
    if not kernel.use_avx512(True):
        pytest.skip("this CPU has no AVX-512: the portable loops are the ones that run")  # both run on CI's
    dtype = np.float32
    bands = _bands(dtype)

    def both(loop, *args):
        """``loop(*args)`` on the AVX-512 loops, then on the portable ones."""
        vector = loop(*args)
        try:
            kernel.use_avx512(False)
            return vector, loop(*args)
        finally:
            kernel.use_avx512(True)

    for name, (band, low, high) in bands.items():
        for rank in sorted({0, band.size // 3, band.size // 2, band.size - 2}):
            vector, portable = both(_narrowed_copy, band, low, high, rank)
            assert _same(vector, portable), (name, rank)
        center = dtype(low)  # deviations about the band's own values, exactly low and high among them
        values = (band + center).astype(dtype)
        for rank in (-1, values.size // 2):
            vector, portable = both(_deviations_copy, values, center, low, high, rank)
            assert _same(vector, portable), (name, rank)
        for rank in (0, values.size // 2):
            vector, portable = both(_narrow_deviations_copy, values, center, rank)
            assert _same(vector, portable), (name, rank)


def _narrowed_copy(band, low, high, rank):
    """narrow_pair over a copy of ``band``: its result and the entries it left at the front."""
    work = band.copy()
    left, below, pair = kernel.narrow_pair(work, low, high, rank)
    return (left, below, pair), work[:left]


def _deviations_copy(values, center, low, high, rank):
    """deviations_pair over ``values``: its result, the deviations, and the band it wrote (as narrowed)."""
    d, band = np.empty_like(values), np.empty_like(values)
    at_least_low, in_band, narrowed = kernel.deviations_pair(values, center, low, high, rank, d, band, 2)
    return (at_least_low, in_band, narrowed), d, band[: in_band if narrowed is None else narrowed[0]]


def _narrow_deviations_copy(values, center, rank):
    """narrow_deviations over ``values``: its result, the deviations, and the entries it left."""
    d, band = np.empty_like(values), np.empty_like(values)
    result = kernel.narrow_deviations(values, center, rank, d, band)
    return result, d, band[: 0 if result is None else result[0]]


def _same(a, b) -> bool:
    """Equal results of two loops, down to the bytes of their arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.tobytes() == b.tobytes()
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_narrow_refuses_ranks_outside_the_band():
    band = np.ones(10, dtype=np.float32)
    for rank in (-1, 9, 10):
        with pytest.raises(ValueError, match="order statistics"):
            kernel.narrow_pair(band, 0.0, 2.0, rank)


@pytest.mark.parametrize("width", [np.int64, np.int32])
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("m", [0, 1, 15, 16, 17, 40, 5000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keep_above_is_numpys_compress(vector_loops, m, dtype, parts, width):
    """The entries whose deviation is above the bound (not at it), in order; outputs with exactly the room
    needed (the vector loop must not store past it), and too little room refused after writing none past.
    Split into parts (one thread each), each part's count is NumPy's and the parts' outputs follow one
    another in order. The indices come out widened to int64 or as they are (``width``)."""
    rng = np.random.default_rng(m)
    d = rng.integers(0, 8, size=m).astype(dtype)  # many entries equal to the bound
    indices = np.sort(rng.choice(10 * m + 1, size=m, replace=False)).astype(np.int32)
    values = rng.standard_normal(m).astype(dtype)
    bound = dtype(3)
    keep = d > bound
    counts = kernel.count_above(d, bound, parts)
    assert counts.tolist() == _per_part(keep, parts)
    count = int(np.count_nonzero(keep))
    out_i, out_v = np.full(count + 16, -1, dtype=width), np.full(count + 16, -1, dtype=dtype)
    split = counts if parts > 1 else None
    assert kernel.keep_above(indices, values, d, bound, out_i[:count], out_v[:count], split) == count
    np.testing.assert_array_equal(out_i[:count], indices[keep])
    np.testing.assert_array_equal(out_v[:count], values[keep])
    assert (out_i[count:] == -1).all() and (out_v[count:] == -1).all()  # nothing past the room
    if count:
        short_i, short_v = np.full(count + 16, -1, dtype=width), np.full(count + 16, -1, dtype=dtype)
        with pytest.raises(ValueError, match="cannot hold"):
            kernel.keep_above(indices, values, d, bound, short_i[: count - 1], short_v[: count - 1], split)
        assert (short_i[count - 1 :] == -1).all() and (short_v[count - 1 :] == -1).all()


def test_keep_above_in_parts_refuses_counts_that_are_not_the_deviations():
    """Counts one short in the first part: that part writes no more than its count (the second part's
    room is untouched by it), and the result is refused."""
    rng = np.random.default_rng(3)
    d = rng.integers(0, 8, size=4000).astype(np.float32)
    indices, values = np.arange(4000, dtype=np.int32), rng.standard_normal(4000).astype(np.float32)
    bound = 3.0
    counts = kernel.count_above(d, bound, 2)
    wrong = counts - np.array([1, 0])
    out_i, out_v = np.full(counts.sum(), -1, dtype=np.int64), np.full(counts.sum(), -1, dtype=np.float32)
    with pytest.raises(ValueError, match="are not those of d"):
        kernel.keep_above(indices, values, d, bound, out_i, out_v, wrong)
    first = indices[:2000][d[:2000] > bound]
    np.testing.assert_array_equal(out_i[: wrong[0]], first[: wrong[0]])
    second = indices[2000:][d[2000:] > bound]
    np.testing.assert_array_equal(out_i[wrong[0] : wrong[0] + wrong[1]], second)
    assert out_i[-1] == -1  # the entry the first part had no room for was not written anywhere


@pytest.mark.parametrize("width", [np.int64, np.int32])
@pytest.mark.parametrize("tensors", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_climb_and_put_do_what_numpy_indexing_does(dtype, threads, tensors, width):
    """On NumPy arrays, and on torch tensors (the engine passes a parameter's own, a slice of a larger
    storage here: the loops must start at its first entry, not its storage's); with int64 indices (torch's)
    and int32 ones (the CPU selection's)."""
    rng = np.random.default_rng(1)
    storage = rng.standard_normal(5003).astype(dtype)
    w = storage[3:]
    w[7] = -0.0
    indices = np.sort(rng.choice(5000, size=300, replace=False)).astype(width)
    indices[-1] = 4999  # the last entry: an index read at the wrong width would land elsewhere
    indices[0] = 7
    offsets = rng.standard_normal(300).astype(dtype)
    expected = w.copy()
    expected[indices] = offsets + w[indices]
    original, saved = w.copy(), np.empty(300, dtype=dtype)
    front = storage[:3].copy()
    given = torch.from_numpy if tensors else (lambda a: a)  # the same memory, as torch or NumPy holds it
    kernel.climb(given(w), given(indices), given(offsets), given(saved), threads)
    np.testing.assert_array_equal(w, expected)
    np.testing.assert_array_equal(saved, original[indices])
    kernel.put(given(w), given(indices), given(saved), threads)
    assert w.tobytes() == original.tobytes()  # bit for bit, -0.0 included
    in_place = offsets.copy()  # the originals written over the offsets themselves, as the engine does
    kernel.climb(given(w), given(indices), given(in_place), given(in_place), threads)
    np.testing.assert_array_equal(w, expected)
    np.testing.assert_array_equal(in_place, original[indices])
    assert storage[:3].tobytes() == front.tobytes()  # nothing written before the slice


def test_the_loops_are_given_the_address_ctypes_gives():
    """The loops' pointers (``_address``, cheaper than ``ctypes.data``) are ctypes' own: for slices, rows,
    read-only and empty arrays, and for tensors whose storage starts earlier."""
    base = np.arange(24, dtype=np.float32)
    read_only = base.copy()
    read_only.flags.writeable = False
    for array in (base, base[5:], base.reshape(4, 6)[2], read_only, read_only[3:], base[:0], np.empty(0)):
        assert kernel._address(array) == array.ctypes.data
    tensor = torch.arange(24, dtype=torch.float64)[7:]
    assert kernel._address(tensor) == tensor.numpy().ctypes.data == tensor.data_ptr()


def _gradients() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    ties = torch.randint(-3, 4, (600, 300), generator=gen).float()
    heavy = torch.randn(700, 400, generator=gen) ** 5
    return {
        "normal float32": torch.randn(512, 256, 3, 3, generator=gen),
        "float64": torch.randn(300, 400, generator=gen, dtype=torch.float64),
        "few values": ties,
        "heavy tails": heavy,
        "float16 (NumPy path)": torch.randn(300, 300, generator=gen).half(),
        "small (one 3x3 kernel of 64 x 64 channels)": torch.randn(64, 64, 3, 3, generator=gen),
        "small with 8 of 9 taps zero": _centre_taps(torch.randn(64, 16, generator=gen)),
    }


def _centre_taps(centre: torch.Tensor) -> torch.Tensor:
    """3x3 kernels whose only non-zero tap is the centre one (a 3x3 convolution over 1x1 maps)."""
    kernels = torch.zeros(*centre.shape, 3, 3)
    kernels[..., 1, 1] = centre
    return kernels


def _small_gradients() -> dict[str, torch.Tensor]:
    """Tensors up to ``cpu.SMALL_TENSOR`` entries that break a selection: ties at and around the quantile,
    a constant, subnormals, deviations quantized to a few ulps, float64, two and three entries, and
    non-finite entries (which the compiled selection hands to the NumPy one)."""
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(cpu.SMALL_TENSOR, generator=gen)
    taps = _centre_taps(torch.randn(4096, generator=gen))
    with_inf, with_nan = torch.randn(3000, generator=gen), torch.randn(3000, generator=gen)
    with_inf[17], with_nan[17] = float("inf"), float("nan")
    return {
        "normal, SMALL_TENSOR entries": noise,
        "heavy tails": noise[:36_864] / (torch.rand(36_864, generator=gen) + 1e-3),
        "few values": torch.randint(-3, 4, (9408,), generator=gen).float(),
        "8 of 9 taps zero": taps.reshape(-1),
        "constant": torch.full((5120,), 0.25),
        "subnormal": noise[:8192] * 1e-39,
        "large mean, tiny spread": 1e3 + noise[:8192] * 1e-3,
        "float64": noise[:5000].double() * 3 - 1,
        "two entries": torch.tensor([0.5, -1.5]),
        "three entries": torch.tensor([0.5, -1.5, 0.5]),
        "an infinity": with_inf,
        "a NaN": with_nan,
    }


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.95, 0.99, 1.0])
def test_small_tensors_select_in_the_compiled_loops_what_a_full_selection_keeps(quantile, monkeypatch):
    """Up to SMALL_TENSOR entries the filter writes the deviations while it counts them into buckets, moves
    those near the quantile aside and copies the kept entries out in the compiled loops: the same entries,
    bit for bit, as the full selection through NumPy and torch, and as the float64 reference where float64
    rounds as the tensor's type does. The loops run wherever the two order statistics exist and every
    deviation is finite."""
    narrowed = []  # (entries, whether the loop narrowed them) for each call of the small tensors' loop
    narrow = kernel.narrow_deviations

    def counted(*args):
        result = narrow(*args)
        narrowed.append((args[0].size, result is not None))
        return result

    monkeypatch.setattr(kernel, "narrow_deviations", counted)
    for name, flat in _small_gradients().items():
        mean = flat.mean()
        narrowed.clear()
        indices, values = cpu._kept_small(flat, mean, quantile, cpu._Workspace())
        want_indices, want_values = cpu._kept_exact(flat, mean, quantile)
        assert indices.dtype == torch.long and values.dtype == flat.dtype, name
        np.testing.assert_array_equal(indices.numpy(), want_indices.numpy(), err_msg=name)
        np.testing.assert_array_equal(values.numpy(), want_values.numpy(), err_msg=name)
        if name not in ("large mean, tiny spread", "subnormal", "an infinity", "a NaN"):
            expected = np.flatnonzero(reference_mask(flat, quantile))
            np.testing.assert_array_equal(indices.numpy(), expected, err_msg=name)
        # the loop runs wherever both order statistics exist, and gives way where a deviation is not finite
        top_rank = quantile * (flat.numel() - 1) >= flat.numel() - 1
        finite = name not in ("an infinity", "a NaN")
        assert narrowed == ([] if top_rank else [(flat.numel(), finite)]), name


def _kept(grads, quantile):
    return [(i.numpy().copy(), v.float().numpy().copy()) for i, v in kept_entries_many(grads, quantile)]


@pytest.mark.parametrize("quantile", [0.5, 0.95, 0.99])
def test_the_filter_keeps_the_same_entries_with_and_without_the_loops(vector_loops, quantile, monkeypatch):
    grads = list(_gradients().values())
    compiled = _kept(grads, quantile)
    monkeypatch.setenv("ZSAM_HF_KERNEL", "0")
    assert kernel.library() is None
    plain = _kept(grads, quantile)
    for (ci, cv), (pi, pv) in zip(compiled, plain):
        np.testing.assert_array_equal(ci, pi)
        np.testing.assert_array_equal(cv, pv)


def test_the_loops_run_on_torchs_openmp_runtime_and_split_only_large_work(on_torch_threads):
    """torch's CPU wheels run their threads on libgomp; the library links the same runtime, so its loops
    use torch's threads (one OpenMP runtime in the process), and only work worth waking them for."""
    assert "parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert on_torch_threads, "the compiled loops cannot use torch's threads here"
    assert kernel._shares_torch_runtime(kernel.library())
    assert kernel.threads(kernel.PARALLEL_SCATTER) == 2
    assert kernel.threads(kernel.PARALLEL_SCATTER - 1) == 1
    assert kernel.threads(kernel.PARALLEL_SCAN, kernel.PARALLEL_SCAN) == 2
    assert kernel.threads(kernel.PARALLEL_SCAN - 1, kernel.PARALLEL_SCAN) == 1
    assert kernel.threads(kernel.PARALLEL_CANDIDATES, kernel.PARALLEL_CANDIDATES) == 2
    assert kernel.threads(kernel.PARALLEL_CANDIDATES - 1, kernel.PARALLEL_CANDIDATES) == 1
    assert not kernel.use_threads(False) and kernel.threads(1 << 24) == 1


def test_another_openmp_runtime_in_the_process_leaves_the_loops_on_torchs(tmp_path):
    """scikit-learn and others load their own copy of libgomp; the loops still resolve to torch's runtime and
    split work. A fresh process loads the compiler's libgomp from its own file (a second runtime) first."""
    found = subprocess.run(
        [kernel._compiler(), "-print-file-name=libgomp.so.1"], capture_output=True, text=True
    )
    other = os.path.realpath(found.stdout.strip())
    assert os.path.isfile(other), f"the compiler names no libgomp: {found.stdout!r}"
    script = (
        "import ctypes, torch\n"
        f"ctypes.CDLL({other!r})\n"
        "from zsam_hf.selection import kernel\n"
        "maps = {line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line}\n"
        "print(len(maps), kernel.library() is not None, kernel._parallel)\n"
    )
    env = {**os.environ, "ZSAM_HF_CACHE": str(tmp_path), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "True", "True"]  # two runtimes mapped; the loops on torch's


def test_each_part_of_a_tensor_gets_room_for_its_own_candidates():
    """Candidates crowded into the last quarter of a tensor (a layer's few loud output channels): each part's
    room comes from its own sampled entries, within a few percent of its true count."""
    n = 1 << 20
    g = torch.randn(n, generator=torch.Generator().manual_seed(5))
    g[3 * n // 4 :] *= 8
    mean = g.mean()
    sample = cpu._sample(g, mean)
    low = np.quantile(sample, 0.9)
    d = (g - mean).abs().numpy()
    for parts in (1, 2, 4):
        expected = cpu._expected_candidates(sample >= low, n, parts)
        starts = kernel.part_starts(n, parts)
        actual = [int(np.count_nonzero(d[a:b] >= low)) for a, b in zip(starts, starts[1:])]
        assert len(expected) == parts
        for e, a in zip(expected, actual):
            assert abs(e - a) <= 0.06 * a + 50, (parts, expected, actual)
            assert cpu._room(e, parts) >= a  # the room the pass gets holds the part's candidates
        if parts == 4:
            assert actual[3] > 5 * actual[0]


def test_the_filter_keeps_the_same_entries_on_torchs_threads_and_on_one(vector_loops, on_torch_threads):
    assert on_torch_threads
    big = torch.randn(1 << 20, generator=torch.Generator().manual_seed(6)).reshape(1024, 1024)
    big[:, :100] *= 5  # candidates crowd into the columns at every row's start
    grads = [*_gradients().values(), big]
    # the collecting pass, the candidates' deviations and the kept entries' copy all split
    assert kernel.threads(big.numel(), kernel.PARALLEL_SCAN) == 2
    assert kernel.threads(big.numel() // 20, kernel.PARALLEL_CANDIDATES) == 2
    parallel = _kept(grads, 0.95)
    for g, (indices, values) in zip(grads, parallel):  # the definition, in float64
        np.testing.assert_array_equal(indices, np.flatnonzero(reference_mask(g, 0.95)))
        np.testing.assert_array_equal(values, g.reshape(-1).float().numpy()[indices])
    kernel.use_threads(False)
    for (pi, pv), (si, sv) in zip(parallel, _kept(grads, 0.95)):
        np.testing.assert_array_equal(pi, si)
        np.testing.assert_array_equal(pv, sv)


def test_the_engine_climbs_and_restores_the_same_bits_on_torchs_threads_and_on_one(on_torch_threads):
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen) for s in [(512, 512, 3, 3), (64,)]]
    grads = [torch.randn(p.shape, generator=gen) for p in params]

    def climbed() -> list[torch.Tensor]:
        weights = [p.clone() for p in params]
        applied, _ = SharpnessPerturbation().perturb(["a", "b"], weights, [g.clone() for g in grads])
        at = [w.clone() for w in weights]
        applied.restore()
        assert all(
            w.view(-1).numpy().tobytes() == p.view(-1).numpy().tobytes() for w, p in zip(weights, params)
        )
        return at

    assert on_torch_threads and kernel.threads(params[0].numel() // 20) == 2
    parallel = climbed()
    # only the filter's entries move (none has e rounding to 0)
    moved = (parallel[0] != params[0]).reshape(-1).numpy()
    np.testing.assert_array_equal(moved, reference_mask(grads[0], 0.95).reshape(-1))
    assert (parallel[1] != params[1]).all()  # the bias moves everywhere (unfiltered)
    kernel.use_threads(False)
    for a, b in zip(parallel, climbed()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_engine_keeps_a_large_tensors_indices_in_32_bits_and_restores_every_bit(dtype):
    """A large weight's kept entries go from the selection to the climb and the restore as the int32
    indices the loops collected (half the bytes of int64, read in every pass over the kept entries):
    exactly the reference's entries, the parameter at w + e there (and nowhere else), then w bit for bit.
    float32 and float64 weights take the compiled climb; bf16 and fp16 ones torch's ops, on the same
    int32 indices widened."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(400, 300, generator=gen).to(dtype)  # over SMALL_TENSOR: the sampled selection
    grad = torch.randn(400, 300, generator=gen).to(dtype)
    param = weight.clone()
    applied, _ = SharpnessPerturbation(rho=2.0).perturb(["w"], [param], [grad.clone()])  # e above bf16 ulps
    (saved,) = applied.saved
    assert saved.indices.dtype == torch.int32
    expected = np.flatnonzero(reference_mask(grad, 0.95))
    np.testing.assert_array_equal(saved.indices.numpy(), expected)
    moved = np.flatnonzero((param != weight).reshape(-1).numpy())
    assert set(moved) <= set(expected) and moved.size > 0.9 * expected.size  # bf16: some e round away
    applied.restore()
    assert torch.equal(param.view(torch.uint8), weight.view(torch.uint8))  # bit for bit, -0.0 included


def test_the_engine_climbs_and_restores_the_same_bits_with_and_without_the_loops(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    shapes = [(256, 128, 3, 3), (300, 400), (64,), (10, 10)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    names = [f"p{i}" for i in range(len(shapes))]

    def climbed() -> list[torch.Tensor]:
        weights = [p.clone() for p in params]
        applied, _ = SharpnessPerturbation().perturb(names, weights, [g.clone() for g in grads])
        at = [w.clone() for w in weights]
        applied.restore()
        assert all(torch.equal(w, p) for w, p in zip(weights, params))
        return at

    compiled = climbed()
    monkeypatch.setenv("ZSAM_HF_KERNEL", "0")
    for a, b in zip(compiled, climbed()):
        assert torch.equal(a, b)


def test_a_failed_build_falls_back_to_numpy_with_the_same_answer(monkeypatch, tmp_path):
    """A compiler that fails (here ``false``) leaves no library and the NumPy path, not an error."""
    grads = list(_gradients().values())[:2]
    expected = _kept(grads, 0.95)
    monkeypatch.setenv("CC", shutil.which("false"))
    monkeypatch.setenv("ZSAM_HF_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel, "_loaded", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setattr(kernel, "_cache_dirs", lambda: [tmp_path])
    assert kernel.library() is None

    def unused(*args, **kwargs):
        raise AssertionError("the compiled loop ran without a library")

    monkeypatch.setattr(kernel, "collect", unused)
    for (ei, ev), (gi, gv) in zip(expected, _kept(grads, 0.95)):
        np.testing.assert_array_equal(ei, gi)
        np.testing.assert_array_equal(ev, gv)


def test_a_compiler_without_openmp_builds_loops_that_run_on_one_thread(monkeypatch, tmp_path):
    """A compiler that refuses ``-fopenmp`` (clang without libomp, say): the library is built without it, the
    loops run on one thread whatever torch's count, and the filter's answer is the same."""
    grads = list(_gradients().values())[:1] + [
        torch.randn(1 << 20, generator=torch.Generator().manual_seed(8))
    ]
    expected = _kept(grads, 0.95)
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {kernel._compiler()} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setattr(kernel, "_loaded", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setattr(kernel, "_parallel", kernel._parallel)  # restored afterwards, with the library
    monkeypatch.setattr(kernel, "_cache_dirs", lambda: [tmp_path / "cache"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert kernel.library() is not None and not kernel.library().zsam_entries_openmp()
        assert kernel.threads(1 << 24) == 1 and not kernel.use_threads(True)
        for (ei, ev), (gi, gv) in zip(expected, _kept(grads, 0.95)):
            np.testing.assert_array_equal(ei, gi)
            np.testing.assert_array_equal(ev, gv)
    finally:
        torch.set_num_threads(threads)
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # the failed OpenMP build left no partial file


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel, "_cache_dirs", lambda: [tmp_path])
    first = kernel._build(kernel._compiler())
    assert first is not None and first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert kernel._build(kernel._compiler()) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left behind


def test_the_workspace_regrows_when_the_candidates_overflow_it():
    """A gradient whose bounds let every entry in, far more than the 1,000 expected: the first buffer fills,
    grows, and the pass resumes where it stopped, again and again."""
    g = np.random.default_rng(3).standard_normal(300_000).astype(np.float32)
    work = cpu._Workspace()
    for expected in ([1000], [500, 500]):
        indices, values = cpu._candidates_compiled(g, np.float32(np.inf), np.float32(-np.inf), work, expected)
        np.testing.assert_array_equal(indices, np.arange(g.size))
        np.testing.assert_array_equal(values, g)
