"""The CPU filter's memory-bound loops in C (``entries.c``), compiled at first use; NumPy where it cannot be.

NumPy takes five passes over each chunk to collect a gradient's candidates and runs its positions loop at
1.35 cycles an entry; on a ResNet-18 at 32 px that, with the scattered reads and writes of the kept entries,
was most of what a ZSAM step cost over a SAM step (docs/performance.md). ``entries.c`` does each in one
loop (AVX-512 where the CPU has it, chosen at run time, so one build serves any x86-64 CPU).

At more than one torch thread the loops split each large tensor between the threads (``threads``). The
library is built with OpenMP and loaded into the process beside torch, so its parallel loops run on the
OpenMP runtime torch has already loaded: the worker threads torch's last parallel op left spinning on
the other cores take the work at once. A helper thread of our own would share its core with that spinning
worker and lose (docs/performance.md). Where the library's OpenMP entry point is not torch's (torch built
without OpenMP, or on another runtime than the one the compiler links), the loops run on one thread.

The library is built with the system's C compiler (``cc``, or ``$CC``) into a cache directory
(``$ZSAM_HF_CACHE``, else ``~/.cache/zsam_hf``, else a temporary one), once per source, compiler and
platform (with OpenMP where the compiler has it, else without), and loaded with ctypes, which releases the
GIL during each call. Without a compiler, or with ``ZSAM_HF_KERNEL=0``, every caller takes its NumPy path:
the same results, exactly, more slowly.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("entries.c")
# The loops' dtypes, as NumPy names them and as torch does (``climb`` and ``put`` take tensors too).
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_TORCH_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_library: ctypes.CDLL | None = None
_loaded = False
_parallel = False  # the loops may split work between threads: OpenMP, on torch's runtime
# Work below which one thread runs a loop (measured just after a two-thread torch op, 2-core VM): a pass over
# a gradient gains from two threads from about 400k entries, scattered writes from about 4k, the passes over
# the candidates (in cache) from about 8k.
PARALLEL_SCAN = 1 << 19
PARALLEL_SCATTER = 1 << 12
PARALLEL_CANDIDATES = 1 << 13
# The candidates' flat indices are 32-bit (half the bytes, one vector compress for 16 entries): gradients of
# up to this many entries; larger ones take NumPy's path.
MAX_ENTRIES = 1 << 31
INDEX = np.dtype(np.int32)
# What ``climb`` and ``put`` write through: a flat NumPy array, or a contiguous CPU tensor.
Flat = np.ndarray | torch.Tensor


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cache_dirs() -> list[Path]:
    configured = os.environ.get("ZSAM_HF_CACHE")
    dirs = [Path(configured)] if configured else []
    dirs += [Path.home() / ".cache" / "zsam_hf", Path(tempfile.gettempdir()) / f"zsam_hf-{os.getuid()}"]
    return dirs


def _build(compiler: str, openmp: bool = True) -> Path | None:
    """The shared library for this source, compiler, platform and ``openmp`` flag: from the cache, or built
    into it (None if the compiler fails, e.g. with no OpenMP)."""
    source = SOURCE.read_bytes()
    flags = ["-O3", "-shared", "-fPIC", *(["-fopenmp"] if openmp else [])]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(source + version.encode() + platform.platform().encode() + " ".join(flags).encode())
    name = f"entries-{key.hexdigest()[:16]}.so"
    for directory in _cache_dirs():
        target = directory / name
        if target.exists():
            return target
        partial = directory / f".{name}-{os.getpid()}"  # processes may build at once
        try:
            directory.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [compiler, *flags, "-o", str(partial), str(SOURCE)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(partial, target)
            return target
        except (OSError, subprocess.SubprocessError) as error:
            partial.unlink(missing_ok=True)
            logger.debug(
                "zsam_hf: could not build %s in %s with %s: %s", SOURCE.name, directory, flags, error
            )
    return None


def _shares_torch_runtime(library: ctypes.CDLL) -> bool:
    """Whether ``library``'s parallel loops run on torch's own OpenMP runtime: torch's parallel backend is
    OpenMP, and the entry point both call to start a parallel region (``GOMP_parallel``) resolves to the
    same code. Other runtimes may sit in the process (scikit-learn ships its own libgomp) without mattering;
    a torch on Intel's runtime, or without OpenMP, gives False."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        ours = ctypes.cast(library.GOMP_parallel, ctypes.c_void_p).value
        torchs = ctypes.cast(ctypes.CDLL(torch._C.__file__).GOMP_parallel, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False
    return ours is not None and ours == torchs


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, count, threads, out = (
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int64),
    )
    for suffix, scalar in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        signatures = {  # name: (return type, argument types), as entries.c declares them
            "collect": (count, [pointer, count, count, scalar, scalar, pointer, pointer, count, out]),
            "collect_parts": (
                count,
                [pointer, count, scalar, scalar, pointer, pointer, pointer, threads, out],
            ),
            "count_above": (count, [pointer, count, scalar, pointer, threads]),
            "narrow_pair": (count, [pointer, count, scalar, scalar, count, out, pointer]),
            "deviations_pair": (
                count,
                [
                    pointer,
                    count,
                    scalar,
                    scalar,
                    scalar,
                    count,
                    pointer,
                    pointer,
                    out,
                    out,
                    out,
                    pointer,
                    threads,
                ],
            ),
            "sample_bracket": (
                count,
                [pointer, count, count, count, scalar, count, count, scalar, pointer, pointer, pointer],
            ),
            "narrow_deviations": (
                count,
                [pointer, count, scalar, scalar, count, pointer, pointer, out, pointer],
            ),
            "keep_above_parts": (
                count,
                [pointer, pointer, pointer, count, scalar, pointer, pointer, pointer, threads],
            ),
            "climb": (None, [pointer, pointer, pointer, pointer, count, threads]),
            "put": (None, [pointer, pointer, pointer, count, threads]),
        }
        for name in ("keep_above_parts", "climb", "put"):  # the same loops on 32-bit indices
            signatures[f"{name}32"] = signatures[name]
        for name, (restype, argtypes) in signatures.items():
            function = getattr(library, f"{name}_{suffix}")
            function.restype, function.argtypes = restype, argtypes
    library.zsam_entries_avx512.argtypes = [ctypes.c_int]
    return library


def library() -> ctypes.CDLL | None:
    """The compiled loops, or None (no compiler, a failed build, ``ZSAM_HF_KERNEL=0``, or not Linux/macOS)."""
    global _library, _loaded, _parallel
    if os.environ.get("ZSAM_HF_KERNEL", "1") == "0":
        return None
    if not _loaded:
        _loaded = True
        compiler = _compiler() if sys.platform != "win32" else None
        try:
            built = compiler and (_build(compiler, openmp=True) or _build(compiler, openmp=False))
            _library = _declare(ctypes.CDLL(str(built))) if built else None
        except (OSError, subprocess.SubprocessError, AttributeError) as error:
            logger.debug("zsam_hf: the compiled loops are unavailable: %s", error)
            _library = None
        if _library is None:
            logger.info("zsam_hf: no C compiler built %s; the CPU filter uses NumPy (slower)", SOURCE.name)
        _parallel = _can_split(_library)
    return _library


def _can_split(library: ctypes.CDLL | None) -> bool:
    """Whether ``library``'s loops can split work between torch's threads: built with OpenMP, on torch's
    runtime."""
    return library is not None and bool(library.zsam_entries_openmp()) and _shares_torch_runtime(library)


def threads(entries: int, least: int = PARALLEL_SCATTER) -> int:
    """How many threads the loops split ``entries`` entries of work between: torch's thread count for at
    least ``least`` entries (``PARALLEL_SCAN`` for a pass over a gradient, ``PARALLEL_SCATTER`` for scattered
    writes, ``PARALLEL_CANDIDATES`` for a pass over the candidates), where the loops run on torch's OpenMP
    runtime (``use_threads``); else 1."""
    if entries < least or not _parallel:  # _parallel: the library is loaded, on torch's runtime
        return 1
    return max(1, torch.get_num_threads())


def use_threads(allow: bool = True) -> bool:
    """Let the loops split large work between torch's threads (``allow``, where they can), or keep them on
    one thread; returns whether they now may split it."""
    global _parallel
    _parallel = allow and _can_split(library())
    return _parallel


def use_avx512(allow: bool = True) -> bool:
    """Let the compiled loops that have an AVX-512 version (the collecting pass, the candidates' deviations,
    the buckets' counts and moves, the kept entries' copy) run it where the CPU has it (``allow``), or make
    them take the portable loops (the same results, bit for bit); returns whether they now run AVX-512."""
    lib = library()
    return bool(lib is not None and lib.zsam_entries_avx512(int(allow)))


def _loop(name: str, dtype: np.dtype | torch.dtype):
    """The compiled loop ``name`` for ``dtype``, NumPy's or torch's (the library loaded first, if no caller
    has loaded it). Callers have asked ``supports`` (which reads ``ZSAM_HF_KERNEL``) first: the environment
    is not read again (a ResNet-18 step read it 351 times, at 0.6 µs a read)."""
    suffix = _SUFFIX[dtype] if isinstance(dtype, np.dtype) else _TORCH_SUFFIX[dtype]
    return getattr(_library if _library is not None else library(), f"{name}_{suffix}")


def supports_dtype(dtype: np.dtype | torch.dtype) -> bool:
    """Whether the compiled loops take entries of ``dtype`` (NumPy's or torch's name for it): the library is
    there, and ``dtype`` is float32 or float64. For callers that have checked the layout themselves."""
    return dtype in (_SUFFIX if isinstance(dtype, np.dtype) else _TORCH_SUFFIX) and library() is not None


def supports(*arrays: np.ndarray) -> bool:
    """Whether the compiled loops take these arrays: the library is there, all float32 or all float64,
    each contiguous (the loops walk raw pointers)."""
    if library() is None or arrays[0].dtype not in _SUFFIX:
        return False
    dtype = arrays[0].dtype
    return all(a.dtype == dtype and a.flags.c_contiguous for a in arrays)


_from_buffer, _addressof = ctypes.c_char.from_buffer, ctypes.addressof


def _address(array: np.ndarray | torch.Tensor) -> int:
    """The address of a contiguous array's (or CPU tensor's) first entry, as ``array.ctypes.data`` gives it,
    at a third of the cost: a ResNet-18 step passes about 450 arrays to the loops, and ``ctypes.data`` builds
    a Python object for each (0.75 µs against 0.25). Read-only or empty arrays, which ctypes cannot map, take
    ``ctypes.data``."""
    if isinstance(array, torch.Tensor):
        return array.data_ptr()
    try:
        return _addressof(_from_buffer(array))
    except (TypeError, ValueError):
        return array.ctypes.data


def _check_indices(gradient: np.ndarray, indices: np.ndarray) -> None:
    """The collecting loops write 32-bit flat indices: ``indices`` must be ``INDEX``, ``gradient`` at most
    ``MAX_ENTRIES`` entries."""
    if indices.dtype != INDEX or gradient.size > MAX_ENTRIES:
        raise ValueError(
            f"the collecting loops write {INDEX} indices of at most {MAX_ENTRIES} entries, "
            f"not {indices.dtype} indices of {gradient.size}"
        )


def collect(
    gradient: np.ndarray, start: int, lower, upper, indices: np.ndarray, values: np.ndarray
) -> tuple[int, int]:
    """Candidates of ``gradient[start:]`` (g <= lower or g >= upper) into ``indices`` (``INDEX``) and
    ``values`` from their first entry, until they are full; returns (how many were written, where the pass
    stopped)."""
    _check_indices(gradient, indices)
    stop = ctypes.c_int64()
    function = _loop("collect", gradient.dtype)
    written = function(
        _address(gradient), start, gradient.size, lower, upper,
        _address(indices), _address(values), min(indices.size, values.size), ctypes.byref(stop),
    )  # fmt: skip
    return written, stop.value


def collect_parts(
    gradient: np.ndarray, lower, upper, indices: np.ndarray, values: np.ndarray, capacities: list[int]
) -> tuple[int, int]:
    """``collect`` from the start of ``gradient``, split into ``len(capacities)`` equal parts, one thread
    each: part t writes into room for ``capacities[t]`` entries, then the parts are moved to follow one
    another. Returns (how many were written, where the pass stopped: the end, or where the first part
    that filled its room stopped; resume from there with ``collect``)."""
    _check_indices(gradient, indices)
    room = np.array(capacities, dtype=np.int64)
    if room.sum() > min(indices.size, values.size):
        raise ValueError(
            f"buffers of {min(indices.size, values.size)} entries cannot hold capacities {capacities}"
        )
    stop = ctypes.c_int64()
    written = _loop("collect_parts", gradient.dtype)(
        _address(gradient), gradient.size, lower, upper, _address(indices), _address(values),
        _address(room), room.size, ctypes.byref(stop),
    )  # fmt: skip
    return written, stop.value


def part_starts(size: int, parts: int) -> list[int]:
    """Where each of ``parts`` near-equal parts of ``size`` entries starts, and ``size`` last."""
    return [size * t // parts for t in range(parts + 1)]


# At most this many entries left after narrowing, the loops sort out the two order statistics themselves
# (PAIR_SORT in entries.c).
PAIR_SORT = 32


def _narrowed(left: int, below: ctypes.c_int64, pair: np.ndarray) -> tuple[int, int, np.ndarray | None]:
    """A narrowing loop's result: how many entries it left, how many lie below them, and the two order
    statistics where it sorted them out (at most ``PAIR_SORT`` left), else None."""
    return left, below.value, pair if left <= PAIR_SORT else None


def deviations_pair(
    values: np.ndarray, center, low, high, rank: int, d: np.ndarray, band: np.ndarray, threads: int = 1
) -> tuple[int, int, tuple[int, int, np.ndarray | None] | None]:
    """``d = |values - center|`` (as NumPy's subtract and abs compute it; split between ``threads``), the
    ``d < high`` in order into ``band``, then ``narrow_pair`` over the band between ``low`` and ``high`` where
    it holds order statistics ``rank`` and ``rank + 1``, in one call: what a large tensor's selection does
    between collecting its candidates and keeping them. Returns (how many ``d >= low``, how many went to
    ``band``, what ``narrow_pair`` returns, or None where the band was too short to narrow, rank < 0
    included)."""
    if min(d.size, band.size) < values.size:
        raise ValueError(f"buffers of {min(d.size, band.size)} entries cannot hold {values.size} deviations")
    in_band, left, below = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
    pair = np.empty(2, dtype=values.dtype)
    at_least_low = _loop("deviations_pair", values.dtype)(
        _address(values), values.size, center, low, high, rank, _address(d), _address(band),
        ctypes.byref(in_band), ctypes.byref(left), ctypes.byref(below), _address(pair), threads,
    )  # fmt: skip
    return at_least_low, in_band.value, None if left.value < 0 else _narrowed(left.value, below, pair)


def narrow_pair(band: np.ndarray, low, high, rank: int) -> tuple[int, int, np.ndarray | None]:
    """Order statistics ``rank`` and ``rank + 1`` of ``band`` (non-negative and finite) without a selection
    in NumPy: the entries of the buckets of [``low``, ``high``] that hold the two (buckets of their bit
    patterns) are moved, in order, to the front of ``band``, and narrowed again between their least and
    greatest until at most ``PAIR_SORT`` are left, which are sorted. Returns (how many entries are left at
    the front, how many lie below them, the two order statistics) or, where ties the buckets cannot split
    leave more, the third None: the two are then the left entries' order statistics ``rank - below`` and
    ``rank + 1 - below``, and the left entries are the band's between their least and greatest, in order."""
    if not 0 <= rank < band.size - 1:
        raise ValueError(f"order statistics {rank} and {rank + 1} of {band.size} entries")
    below, pair = ctypes.c_int64(), np.empty(2, dtype=band.dtype)
    left = _loop("narrow_pair", band.dtype)(
        _address(band), band.size, low, high, rank, ctypes.byref(below), _address(pair)
    )
    return _narrowed(left, below, pair)


def sample_bracket(
    gradient: np.ndarray,
    start: int,
    stride: int,
    center,
    first: int,
    last: int,
    sample: np.ndarray,
    work: np.ndarray,
) -> np.ndarray | None:
    """``sample[k] = |gradient[start + k stride] - center|`` for every entry of ``sample`` (as NumPy's
    subtract and abs compute it), then the sample's order statistics ``first`` and ``last``: narrowed by
    buckets between its least and greatest entries into ``work`` (as many entries) and sorted out there, in
    the same call, where torch and NumPy take a dozen (a strided slice, a subtraction, a partition, a sort).
    None where a sampled deviation is infinite or NaN, or ties leave more entries than the loop sorts (select
    them another way: the sample is written either way)."""
    m = sample.size
    if not 0 <= first <= last < m or m < 2:
        raise ValueError(f"order statistics {first} and {last} of {m} entries")
    if start < 0 or stride < 1 or start + (m - 1) * stride >= gradient.size:
        raise ValueError(f"{m} entries from {start} by {stride} are not all in {gradient.size}")
    if work.size < m:
        raise ValueError(f"a buffer of {work.size} entries cannot hold {m}")
    out = np.empty(2, dtype=gradient.dtype)
    found = _loop("sample_bracket", gradient.dtype)(
        _address(gradient), start, stride, m, center, first, last, np.finfo(gradient.dtype).max,
        _address(sample), _address(work), _address(out),
    )  # fmt: skip
    return out if found == 0 else None


def narrow_deviations(
    gradient: np.ndarray, center, rank: int, d: np.ndarray, band: np.ndarray
) -> tuple[int, int, np.ndarray | None] | None:
    """``d = |gradient - center|`` (as ``deviations_pair`` computes it), then ``narrow_pair``'s result for a
    band that is all of ``d``, on one thread, with no pass to write that band and read it back: the deviations
    are counted into buckets as they are written, and those near order statistics ``rank`` and ``rank + 1``
    moved into ``band`` (``d`` is left intact). Returns what ``narrow_pair`` returns, or None if a deviation
    is infinite or NaN."""
    n = gradient.size
    if not 0 <= rank < n - 1:
        raise ValueError(f"order statistics {rank} and {rank + 1} of {n} entries")
    if min(d.size, band.size) < n:
        raise ValueError(f"buffers of {min(d.size, band.size)} entries cannot hold {n} deviations")
    below, pair = ctypes.c_int64(), np.empty(2, dtype=gradient.dtype)
    left = _loop("narrow_deviations", gradient.dtype)(
        _address(gradient), n, center, np.finfo(gradient.dtype).max, rank, _address(d), _address(band),
        ctypes.byref(below), _address(pair),
    )  # fmt: skip
    return None if left < 0 else _narrowed(left, below, pair)


def count_above(d: np.ndarray, bound, parts: int = 1) -> np.ndarray:
    """How many entries of ``d`` are above ``bound`` in each of ``parts`` near-equal parts (``part_starts``),
    one thread each."""
    counts = np.empty(parts, dtype=np.int64)
    _loop("count_above", d.dtype)(_address(d), d.size, bound, _address(counts), parts)
    return counts


def keep_above(
    indices: np.ndarray,
    values: np.ndarray,
    d: np.ndarray,
    bound,
    indices_out: np.ndarray,
    values_out: np.ndarray,
    counts: np.ndarray | None = None,
) -> int:
    """The ``indices`` (the collecting loops' ``INDEX``) and ``values`` where ``d > bound``, in order, into
    the outputs (the indices as they are, or widened to int64, as torch indexes: ``indices_out``'s
    dtype); returns how many.

    ``counts`` (``count_above``'s for the same ``d`` and ``bound``) splits the work into as many parts, one
    thread each, each writing where the parts before it end. The loops write none past the outputs' room
    (nor past a part's count): more than fit, or counts that are not ``d``'s, is an error."""
    if indices.dtype != INDEX or indices_out.dtype not in _INDEX_WIDTH:
        raise ValueError(
            f"keep_above reads {INDEX} indices and writes int32 or int64, not {indices.dtype} and "
            f"{indices_out.dtype}"
        )
    room = min(indices_out.size, values_out.size)
    rooms = np.array([room] if counts is None else counts, dtype=np.int64)  # one part: all the room
    expected = int(rooms.sum())
    if expected > room:
        raise ValueError(f"outputs of {room} entries cannot hold the {expected} counted")
    function = _loop(f"keep_above_parts{_INDEX_WIDTH[indices_out.dtype]}", values.dtype)
    kept = function(
        _address(indices), _address(values), _address(d), d.size, bound,
        _address(indices_out), _address(values_out), _address(rooms), rooms.size,
    )  # fmt: skip
    if kept > room:
        raise ValueError(f"outputs of {room} entries cannot hold the {kept} kept")
    if counts is not None and kept != expected:
        raise ValueError(f"counts {rooms.tolist()} are not those of d above {bound}: {kept} are")
    return kept


# The loops' names for each index dtype: "climb" takes int64 indices, "climb32" int32 ones.
_INDEX_WIDTH = {np.dtype(np.int64): "", INDEX: "32", torch.long: "", torch.int32: "32"}


def climb(weights: Flat, indices: Flat, offsets: Flat, saved: Flat, threads: int = 1) -> None:
    """``saved = weights[indices]; weights[indices] = offsets + saved`` in one loop (distinct int64 or int32
    flat indices, split between ``threads``); ``saved`` may be ``offsets`` itself. NumPy arrays or contiguous
    CPU tensors (a parameter's own, whose autograd version the caller then bumps), of one dtype."""
    function = _loop(f"climb{_INDEX_WIDTH[indices.dtype]}", weights.dtype)
    function(_address(weights), _address(indices), _address(offsets), _address(saved), len(indices), threads)


def put(weights: Flat, indices: Flat, values: Flat, threads: int = 1) -> None:
    """``weights[indices] = values`` in one loop (distinct int64 or int32 flat indices, split between
    ``threads``); arrays or tensors, as ``climb`` takes them."""
    function = _loop(f"put{_INDEX_WIDTH[indices.dtype]}", weights.dtype)
    function(_address(weights), _address(indices), _address(values), len(indices), threads)
