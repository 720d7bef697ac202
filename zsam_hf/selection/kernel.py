"""The CPU filter's memory-bound loops in C (``entries.c``), compiled at first use; NumPy where it cannot be.

NumPy takes five passes over each chunk to collect a gradient's candidates and runs its positions loop at
1.35 cycles an entry; on a ResNet-18 at 32 px that, with the scattered reads and writes of the kept entries,
was most of what a ZSAM step cost over a SAM step (docs/performance.md). ``entries.c`` does each in one
loop (AVX-512 where the CPU has it, chosen at run time, so one build serves any x86-64 CPU).

The library is built with the system's C compiler (``cc``, or ``$CC``) into a cache directory
(``$ZSAM_HF_CACHE``, else ``~/.cache/zsam_hf``, else a temporary one), once per source, compiler and
platform, and loaded with ctypes, which releases the GIL during each call. Without a compiler, or with
``ZSAM_HF_KERNEL=0``, every caller takes its NumPy path: the same results, exactly, more slowly.
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

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("entries.c")
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_library: ctypes.CDLL | None = None
_loaded = False


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cache_dirs() -> list[Path]:
    configured = os.environ.get("ZSAM_HF_CACHE")
    dirs = [Path(configured)] if configured else []
    dirs += [Path.home() / ".cache" / "zsam_hf", Path(tempfile.gettempdir()) / f"zsam_hf-{os.getuid()}"]
    return dirs


def _build(compiler: str) -> Path | None:
    """The shared library for this source, compiler and platform: from the cache, or built into it."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(source + version.encode() + platform.platform().encode()).hexdigest()[:16]
    for directory in _cache_dirs():
        target = directory / f"entries-{key}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            partial = directory / f".entries-{key}-{os.getpid()}.so"  # processes may build at once
            subprocess.run(
                [compiler, "-O3", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(partial, target)
            return target
        except (OSError, subprocess.SubprocessError) as error:
            logger.debug("zsam_hf: could not build %s in %s: %s", SOURCE.name, directory, error)
    return None


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, count = ctypes.c_void_p, ctypes.c_int64
    for suffix, scalar in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        collect = getattr(library, f"collect_{suffix}")
        collect.restype = count
        collect.argtypes = [
            pointer,
            count,
            count,
            scalar,
            scalar,
            pointer,
            pointer,
            count,
            ctypes.POINTER(count),
        ]
        getattr(library, f"climb_{suffix}").argtypes = [pointer, pointer, pointer, pointer, count]
        getattr(library, f"put_{suffix}").argtypes = [pointer, pointer, pointer, count]
    library.zsam_entries_avx512.argtypes = [ctypes.c_int]
    return library


def library() -> ctypes.CDLL | None:
    """The compiled loops, or None (no compiler, a failed build, ``ZSAM_HF_KERNEL=0``, or not Linux/macOS)."""
    global _library, _loaded
    if os.environ.get("ZSAM_HF_KERNEL", "1") == "0":
        return None
    if not _loaded:
        _loaded = True
        compiler = _compiler() if sys.platform != "win32" else None
        try:
            built = _build(compiler) if compiler else None
            _library = _declare(ctypes.CDLL(str(built))) if built else None
        except (OSError, subprocess.SubprocessError, AttributeError) as error:
            logger.debug("zsam_hf: the compiled loops are unavailable: %s", error)
            _library = None
        if _library is None:
            logger.info("zsam_hf: no C compiler built %s; the CPU filter uses NumPy (slower)", SOURCE.name)
    return _library


def use_avx512(allow: bool = True) -> bool:
    """Let the compiled collecting loop run its AVX-512 version where the CPU has it (``allow``), or make
    it take the portable loop; returns whether it now runs AVX-512."""
    lib = library()
    return bool(lib is not None and lib.zsam_entries_avx512(int(allow)))


def supports(*arrays: np.ndarray) -> bool:
    """Whether the compiled loops take these arrays: the library is there, all float32 or all float64,
    each contiguous (the loops walk raw pointers)."""
    return (
        library() is not None
        and len({a.dtype for a in arrays}) == 1
        and arrays[0].dtype in _SUFFIX
        and all(a.flags.c_contiguous for a in arrays)
    )


def collect(
    gradient: np.ndarray, start: int, lower, upper, indices: np.ndarray, values: np.ndarray
) -> tuple[int, int]:
    """Candidates of ``gradient[start:]`` (g <= lower or g >= upper) into ``indices`` and ``values`` from
    their first entry, until they are full; returns (how many were written, where the pass stopped)."""
    stop = ctypes.c_int64()
    function = getattr(_library, f"collect_{_SUFFIX[gradient.dtype]}")
    written = function(
        gradient.ctypes.data, start, gradient.size, lower, upper,
        indices.ctypes.data, values.ctypes.data, min(indices.size, values.size), ctypes.byref(stop),
    )  # fmt: skip
    return written, stop.value


def climb(weights: np.ndarray, indices: np.ndarray, offsets: np.ndarray, saved: np.ndarray) -> None:
    """``saved = weights[indices]; weights[indices] = offsets + saved`` in one loop (distinct indices);
    ``saved`` may be ``offsets`` itself."""
    function = getattr(_library, f"climb_{_SUFFIX[weights.dtype]}")
    function(weights.ctypes.data, indices.ctypes.data, offsets.ctypes.data, saved.ctypes.data, indices.size)


def put(weights: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
    """``weights[indices] = values`` in one loop."""
    function = getattr(_library, f"put_{_SUFFIX[weights.dtype]}")
    function(weights.ctypes.data, indices.ctypes.data, values.ctypes.data, indices.size)
