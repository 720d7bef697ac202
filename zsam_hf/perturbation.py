"""The SAM-family perturbations e(g, w), as pure tensor math (no Hugging Face imports).

Every variant of ``docs/algorithm.md`` differs from SAM only in how the ascent step e is built
from the ascent gradient g.  This module builds e, writes ``w + e`` into the weights
in place and keeps exactly what is needed to write ``w`` back bit for bit:

* dense variants (``sam``, ``asam``, ``fsam``) write w + e into a buffer per parameter and point
  the parameter at it until the restore points it back at its own, untouched storage (a
  parameter that does not own its storage is copied and restored instead);
* ``zsam`` perturbs only the ~(1 - Q_p) fraction of each weight tensor that survives the
  z-score filter, so it keeps just those entries' flat indices and original values (in
  buffers reused from step to step on the CPU).

Which entries survive the z-score filter is decided in ``selection.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.autograd.graph import increment_version

from .selection import (
    Kept,
    KeptBuffers,
    gradient_mean,
    kept_and_flags,
    kept_entries_many,
    kept_entries_sharded,
    kernel,
    quantile_ranks,
)
from .sharding import Shards

EPS = 1e-12
VARIANTS = ("zsam", "sam", "asam", "fsam", "random", "none")
NORMALIZATIONS = ("global", "tensor")
DEFAULT_RHO = {"zsam": 0.05, "sam": 0.05, "fsam": 0.05, "asam": 0.5, "random": 0.05, "none": 0.05}
# The variants whose e depends on the normalization option (the others are always global).
NORMALIZED_VARIANTS = ("zsam", "sam", "random")


# --------------------------------------------------------------------------------------
# Perturbation offsets: dense (a full tensor) or sparse (flat indices + values)
# --------------------------------------------------------------------------------------
@dataclass
class SparseOffset:
    """e restricted to a few entries of a tensor: e.flatten()[indices] = values."""

    indices: torch.Tensor
    values: torch.Tensor


Offset = torch.Tensor | SparseOffset


@dataclass
class PerturbationStats:
    """What a step's perturbation looked like, as device tensors (no host sync).

    ``taken`` is None where the engine decided on the host that the ascent was taken (the eager engine
    returns no stats for a step it skips); the capturable engine decides on the device, so it says there
    whether the ascent gradient was finite, and its ``norm`` and ``kept_fraction`` are 0 when it was not.
    """

    norm: torch.Tensor
    kept_fraction: float | torch.Tensor | None = None
    taken: torch.Tensor | None = None


def _global_norm(tensors: list[torch.Tensor], shards: Shards | None = None) -> torch.Tensor:
    """||.||_G over all tensors; over the full tensors when they are sliced across ranks."""
    if shards is not None:
        return shards.squared_norms(tensors).sum().sqrt()
    if not tensors:
        return torch.zeros(())
    return norm_of_norms(list(torch._foreach_norm(tensors)))


def norm_of_norms(norms: list[torch.Tensor]) -> torch.Tensor:
    """||.||_G from the tensors' own norms, in float32 at least (fp64 stays fp64)."""
    stacked = torch.stack(norms)
    return torch.linalg.vector_norm(stacked.to(torch.promote_types(stacked.dtype, torch.float32)))


def _tensor_norms(tensors: list[torch.Tensor], shards: Shards | None = None) -> torch.Tensor:
    """||t|| of each tensor; of each full tensor when they are sliced across ranks."""
    if shards is not None:
        return shards.squared_norms(tensors).sqrt()
    return torch.stack(torch._foreach_norm(tensors))


def _all_finite(tensors: list[torch.Tensor], shards: Shards | None = None) -> bool:
    """Whether every entry of every (full) tensor is finite (one host synchronization)."""
    if shards is not None:
        return shards.all_finite(tensors)
    return bool(_finite_flag(tensors))


def _finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every entry of every tensor is finite, as a 0-d device tensor (no host synchronization)."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm([t.reshape(-1) for t in tensors]))).all()


def sam_offsets(
    grads: list[torch.Tensor], rho: float, grad_norm: torch.Tensor | None = None, shards: Shards | None = None
) -> list[Offset]:
    """Foret et al. (2021): e_p = rho g_p / (||g||_G + eps).  Scales ``grads`` in place."""
    grad_norm = _global_norm(grads, shards) if grad_norm is None else grad_norm
    torch._foreach_mul_(grads, rho / (grad_norm + EPS))
    return grads


def sam_tensor_offsets(grads: list[torch.Tensor], rho: float, shards: Shards | None = None) -> list[Offset]:
    """SAM with the released code's per-tensor split: e_p = rho g_p / (||g_p|| + eps) for weight
    tensors (ndim > 1), e_p = rho g_p / (||g||_G + eps) for the others (as ZSAM's ``tensor`` mode).
    Scales ``grads`` in place."""
    weights = [g for g in grads if g.ndim > 1]
    others = [g for g in grads if g.ndim <= 1]
    if others:
        torch._foreach_mul_(others, rho / (_global_norm(grads, shards) + EPS))
    if weights:
        scales = rho / (_tensor_norms(weights, shards) + EPS)
        torch._foreach_mul_(weights, list(scales.to(weights[0].dtype).unbind()))
    return grads


def random_kept_count(numel: int, quantile: float) -> int:
    """How many entries the z-score filter keeps in a tensor of ``numel`` entries without ties at the
    threshold: the n - 1 - floor(q (n - 1)) largest (the position rounded as ``torch.quantile`` does)."""
    (lo, _), _ = quantile_ranks(numel, quantile)
    return numel - 1 - lo


def mask_generator(seed: int, step: int) -> torch.Generator:
    """The random control's generator for one optimizer step: a function of (seed, step) alone, so a
    resumed run draws the same masks and the global RNG streams (dropout, data order) are untouched."""
    return torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 31 | (step & 0x7FFFFFFF)) & (2**63 - 1))


def random_kept(grads: list[torch.Tensor], quantile: float, seed: int, step: int) -> list[Kept]:
    """The random control's kept entries: per weight gradient, as many entries as the z-score filter
    would keep (``random_kept_count``), drawn uniformly without replacement, and g there."""
    generator = mask_generator(seed, step)
    kept = []
    for g in grads:
        k = random_kept_count(g.numel(), quantile)
        indices = torch.randperm(g.numel(), generator=generator)[:k].sort().values.to(g.device)
        kept.append((indices, g.detach().reshape(-1).index_select(0, indices)))
    return kept


def asam_offsets(
    names: list[str],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    rho: float,
    eta: float,
    shards: Shards | None = None,
) -> list[Offset]:
    """Kwon et al. (2021), as the released code runs it.

    T_p = |w_p| + eta for parameters whose name contains "weight", 1 otherwise;
    e_p = rho T_p^2 g_p / (||T g||_G + eps).
    """
    scales = [p.detach().abs() + eta if "weight" in name else None for name, p in zip(names, params)]  # T
    scaled = [g if t is None else g * t for g, t in zip(grads, scales)]  # T g
    factor = rho / (_global_norm(scaled, shards) + EPS)
    offsets = []
    for t, tg in zip(scales, scaled):
        offsets.append(tg * factor if t is None else tg.mul_(t).mul_(factor))
    return offsets


def fsam_offsets(
    grads: list[torch.Tensor],
    ema: list[torch.Tensor | None],
    rho: float,
    sigma: float,
    lam: float,
    shards: Shards | None = None,
) -> list[Offset]:
    """Friendly SAM (Li et al. 2024): remove the EMA of past ascent gradients from g.

    First step: m = g and g is used as is.  Later: g* = g - sigma m, then
    m = lam m + (1 - lam) g.  e = rho g* / ||g*||_G.  ``ema`` is updated in place.
    """
    directions = []
    for i, g in enumerate(grads):
        if ema[i] is None:
            ema[i] = g.detach().clone()
            directions.append(g)
        else:
            directions.append(g - sigma * ema[i])
            ema[i].mul_(lam).add_(g, alpha=1 - lam)
    return sam_offsets(directions, rho, shards=shards)


def zsam_offsets(
    grads: list[torch.Tensor],
    rho: float,
    quantile: float,
    normalization: str,
    means: list[torch.Tensor] | None = None,
    shards: Shards | None = None,
    numels: list[int] | None = None,
    kept: list[Kept] | None = None,
) -> tuple[list[Offset], float]:
    """ZSharp (Yun 2025): SAM's step on the z-score filtered gradient.

    Weight tensors (ndim > 1) keep only the entries with |z| above the Q_p quantile;
    tensors with ndim <= 1 stay unfiltered.  ``global`` normalization (the paper's
    formula) scales the filtered gradient of all tensors together to norm rho;
    ``tensor`` (the released code) scales each weight tensor to norm rho on its own.
    A weight tensor whose mask is empty falls back to SAM's e_p = rho g_p / (||g||_G + eps).
    ``means`` are the weight gradients' means (``gradient_mean``), when already known, and
    ``kept`` their kept entries (``kept_entries_many``), when already selected.
    With ``shards`` the gradients are this rank's slices of tensors of ``numels`` entries
    (FSDP2): every statistic is the full tensors', the offsets this rank's slices.

    Returns the offsets, the fraction of weight-tensor entries kept, and ||e||_G where it is known without
    a pass over e (``global``, no tensor on SAM's fallback: every offset is its member scaled by one factor,
    so ||e||_G = rho ||g~||_G / (||g~||_G + eps), as SAM's step has it), else None.
    """
    weights = [i for i, g in enumerate(grads) if g.ndim > 1]
    if shards is None:
        if kept is None:
            kept = kept_entries_many([grads[i] for i in weights], quantile, means)
        counts = [indices.numel() for indices, _ in kept]
        sizes = [grads[i].numel() for i in weights]
    else:
        sizes = [numels[i] for i in weights]
        kept = kept_entries_sharded([grads[i] for i in weights], sizes, quantile, means, shards.group)
        counts = shards.sum(torch.tensor([indices.numel() for indices, _ in kept], dtype=torch.long)).tolist()
    filtered: list[SparseOffset | None] = [None] * len(grads)
    for i, (indices, values), count in zip(weights, kept, counts):
        filtered[i] = SparseOffset(indices, values) if count else None  # nothing kept in the full tensor
    kept_fraction = sum(counts) / sum(sizes) if sizes else 0.0

    if normalization == "tensor":
        present = [f for f in filtered if f is not None]
        norms = _tensor_norms([f.values for f in present], shards) if present else None
        positive = iter(norms.gt(0).tolist() if present else [])  # one host sync for all tensors
        norm_of = iter(norms.unbind() if present else [])
        scaled = [(next(norm_of), next(positive)) if f is not None else (None, False) for f in filtered]
        sam_scale = _sam_scale_if(not all(ok for _, ok in scaled), grads, rho, shards)
        offsets = []
        for g, f, (norm, is_positive) in zip(grads, filtered, scaled):
            if is_positive:
                f.values.mul_(rho / (norm + EPS))
                offsets.append(f)
            else:  # nothing kept, or only zeros kept (or a bias): SAM's e_p
                offsets.append(g.mul_(sam_scale))
        return offsets, kept_fraction, None

    # global: ||g~||_G over filtered weight tensors and unfiltered ndim <= 1 tensors.
    sam_scale = _sam_scale_if(any(filtered[i] is None for i in weights), grads, rho, shards)
    members = [
        f.values if f is not None else g for g, f in zip(grads, filtered) if f is not None or g.ndim <= 1
    ]
    norm = _global_norm(members, shards)
    scale = rho / (norm + EPS)
    offsets = []
    for g, f in zip(grads, filtered):
        if f is not None:
            f.values.mul_(scale)
            offsets.append(f)
        else:
            offsets.append(g.mul_(scale if g.ndim <= 1 else sam_scale))
    return offsets, kept_fraction, rho * norm / (norm + EPS) if sam_scale is None else None


def _kept_while_finite(
    grads: list[torch.Tensor], quantile: float, buffers: list[KeptBuffers] | None = None
) -> list[Kept] | None:
    """Each CPU weight gradient's mean, then at once its kept entries; None if a mean is not finite.

    Tensor by tensor, so the selection reads a gradient the mean has just brought into the
    CPU's cache; a non-finite mean (an fp16 overflow) stops before the next selection.
    ``buffers`` (one per gradient) receive the kept entries. One thread: a pool of Python
    threads calling torch ops gave each its own OpenMP team, and the plain step's convolutions
    slowed by a fifth (docs/performance.md).
    """
    kept = []
    for i, g in enumerate(grads):
        mean = gradient_mean(g)
        if not math.isfinite(mean.item()):
            return None
        kept.extend(kept_entries_many([g], quantile, [mean], None if buffers is None else [buffers[i]]))
    return kept


def _sam_scale_if(
    needed: bool, grads: list[torch.Tensor], rho: float, shards: Shards | None = None
) -> torch.Tensor | None:
    """SAM's rho / ||g||_G, computed only when some tensor falls back to it (a full pass over g).

    ``needed`` is the same on every rank (it comes from full-tensor statistics), so the
    all-reduce inside happens on all of them or none.
    """
    return rho / (_global_norm(grads, shards) + EPS) if needed else None


def offsets_norm(offsets: list[Offset], shards: Shards | None = None) -> torch.Tensor:
    """||e||_G of a list of dense or sparse offsets."""
    return _global_norm([o.values if isinstance(o, SparseOffset) else o for o in offsets], shards)


# --------------------------------------------------------------------------------------
# Applying e in place and restoring w exactly
# --------------------------------------------------------------------------------------
@dataclass
class AppliedPerturbation:
    """Weights currently at w + e, with what it takes to put w back bit for bit."""

    params: list[torch.Tensor] = field(default_factory=list)
    saved: list[Offset] = field(default_factory=list)  # original entries (sparse) or tensors (dense)
    # Parameters whose data points at a buffer holding w + e, each with its own untouched data (w)
    moved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def perturbed(self) -> list[torch.Tensor]:
        """Every parameter now at w + e."""
        return [*self.params, *(p for p, _ in self.moved)]

    @torch.no_grad()
    def restore(self) -> None:
        """Write w back from the saved originals (no w + e - e rounding), or point a moved
        parameter back at its own data, which was never written."""
        for p, saved in zip(self.params, self.saved):
            if isinstance(saved, SparseOffset):
                scatter_entries(p, saved.indices, saved.values)
            else:
                p.copy_(saved)
        for p, own in self.moved:
            p.data = own
        self.params, self.saved, self.moved = [], [], []

    def extra_bytes(self) -> int:
        """Memory kept between the two passes to restore w."""
        total = sum(own.numel() * own.element_size() for _, own in self.moved)  # the w + e buffers
        for saved in self.saved:
            tensors = (saved.indices, saved.values) if isinstance(saved, SparseOffset) else (saved,)
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


# A plain CPU tensor's scattered entries (a ResNet-18's 5% of 11M weights, caches flushed first). The climb to
# w + e (read, add, write) takes the compiled loop (selection/kernel.py) where there is one: climb and restore
# 4.2 ms at one thread against NumPy's 6.9; at two threads the climb 4.3 ms against torch's gather, add and
# index_copy_ 5.6. The restore's writes take the loop at one thread; at more, torch's index_copy_ splits them
# between the threads (3.0 ms against the loop's 3.9 at two). Without the compiled loops: NumPy at one thread
# (2-3x faster than torch.take and index_put_), torch's gather and index_copy_ at more (docs/performance.md).
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def _plain_cpu(
    p: torch.Tensor, indices: torch.Tensor, *others: torch.Tensor, index_dtypes=(torch.long,)
) -> bool:
    """Whether ``p``'s entries at ``indices`` can be read or written in place through its flat view,
    by NumPy or torch's threads: a plain contiguous CPU tensor of a dtype NumPy has (not bf16),
    contiguous indices of one of ``index_dtypes``, contiguous companions of ``p``'s dtype."""
    return (
        p.device.type == "cpu"
        and p.dtype in _NUMPY_DTYPES
        and type(p.data) is torch.Tensor
        and p.is_contiguous()
        and indices.device.type == "cpu"
        and indices.dtype in index_dtypes
        and indices.is_contiguous()
        and all(t.dtype == p.dtype and t.device.type == "cpu" and t.is_contiguous() for t in others)
    )


def _as_long(indices: torch.Tensor) -> torch.Tensor:
    """``indices`` as the int64 tensor torch's indexing ops take: the CPU selection keeps large tensors'
    flat indices in 32 bits (``selection/cpu.py``), which only the compiled loops read as they are."""
    return indices if indices.dtype == torch.long else indices.long()


def gather_entries(p: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``p.flatten()[indices]`` (into ``out`` when given); ``indices`` are valid flat indices (int64, or
    int32)."""
    if out is None:
        out = torch.empty(indices.numel(), dtype=p.dtype, device=p.device)
    indices = _as_long(indices)
    if not _plain_cpu(p, indices, out):
        return torch.take(p.detach(), indices, out=out)
    flat = p.detach().view(-1)
    if torch.get_num_threads() > 1:
        return torch.gather(flat, 0, indices, out=out)
    # "clip": no bounds-checking copy; the indices come from the selection and are in range
    np.take(flat.numpy(), indices.numpy(), out=out.numpy(), mode="clip")
    return out


# The index dtypes the compiled loops read: torch's, and the 32-bit ones the CPU selection keeps.
_LOOP_INDICES = (torch.long, torch.int32)


def _compiled_cpu(p: torch.Tensor, indices: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the compiled loops (``selection/kernel.py``) can write ``p``'s entries at ``indices`` (int64
    or int32)."""
    return _plain_cpu(p, indices, *others, index_dtypes=_LOOP_INDICES) and kernel.supports_dtype(p.dtype)


def climb_entries(
    p: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """w + e at ``indices`` of ``p`` in place (e = ``offsets``, consumed); returns the original entries,
    which restore w bit for bit. The compiled loop writes them over ``offsets`` itself (no buffer of the
    kept size more), the others into ``out`` when given."""
    if _compiled_cpu(p, indices, offsets):
        threads = kernel.threads(indices.numel())
        kernel.climb(p, indices, offsets, offsets, threads)  # p's own storage, contiguous (_plain_cpu)
        increment_version(p)
        return offsets
    if out is None:
        out = torch.empty(indices.numel(), dtype=p.dtype, device=p.device)
    indices = _as_long(indices)
    original = gather_entries(p, indices, out)
    if offsets.dtype == p.dtype:
        moved = offsets.add_(original)  # in place: no temporary of the kept size
    else:
        moved = original + offsets.to(p.dtype)
    scatter_entries(p, indices, moved)
    return original


def scatter_entries(p: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """``p.flatten()[indices] = values`` in place (distinct indices), bumping ``p``'s autograd
    version as torch's own in-place ops do. On a CPU: the compiled loop (split between torch's threads
    where it can be), else torch's ``index_copy_`` at more than one thread, else NumPy."""
    if _compiled_cpu(p, indices, values) and not _split_by_torch_only(indices.numel()):
        kernel.put(p, indices, values, kernel.threads(indices.numel()))
        increment_version(p)
        return
    indices = _as_long(indices)
    if not _plain_cpu(p, indices, values):
        p.view(-1).index_put_((indices,), values)  # honours torch.use_deterministic_algorithms, unlike put_
    elif torch.get_num_threads() > 1:
        p.view(-1).index_copy_(0, indices, values)  # deterministic: the indices are distinct
    else:
        p.detach().view(-1).numpy()[indices.numpy()] = values.numpy()
        increment_version(p)


def _split_by_torch_only(entries: int) -> bool:
    """Whether writing ``entries`` scattered entries should go to torch's ``index_copy_``: torch has more
    than one thread, the work is large enough to split, and the compiled loop cannot split it (its
    library has no OpenMP, or another runtime than torch's)."""
    return torch.get_num_threads() > 1 and entries >= kernel.PARALLEL_SCATTER and kernel.threads(entries) == 1


def _can_move(p: torch.Tensor) -> bool:
    """Whether ``p.data`` may point at another buffer between the passes and back.

    Only a plain tensor that owns its whole storage: not a tensor subclass (FSDP2's DTensor,
    quantized weights) and not a view into a larger buffer (FSDP1's flat parameter, fused
    optimizers' flat storage), whose other users would not follow the move.
    """
    data = p.data
    return (
        type(data) is torch.Tensor
        and data.is_contiguous()
        and data.storage_offset() == 0
        and data.untyped_storage().nbytes() == data.numel() * data.element_size()
    )


def _move_to_buffers(
    params: list[torch.Tensor],
    offsets: list[torch.Tensor],
    buffers: list[torch.Tensor],
    per_tensor: bool | None = None,
):
    """Write w + e into each buffer, then point the parameter's data at it: one pass over the
    weights instead of a backup copy, an add and a restoring copy (the pointer moves back).
    ``per_tensor`` (the default on a CPU) fuses the write per tensor; otherwise foreach ops."""
    if per_tensor if per_tensor is not None else params[0].device.type == "cpu":
        for p, e, b in zip(params, offsets, buffers):
            torch.add(p, e, out=b)  # one fused pass per tensor
    else:  # few kernel launches for many tensors
        torch._foreach_copy_(buffers, params)
        torch._foreach_add_(buffers, offsets)
    return _point_at(params, buffers)


def _point_at(
    params: list[torch.Tensor], buffers: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Point each parameter's data at its buffer; returns each parameter with its own data."""
    moved = []
    for p, b in zip(params, buffers):
        own = p.data
        p.data = b
        moved.append((p, own))
    return moved


@torch.no_grad()
def apply_offsets(
    params: list[torch.Tensor],
    offsets: list[Offset],
    backups: list[torch.Tensor] | None = None,
    move: bool = True,
) -> AppliedPerturbation:
    """Move each parameter to w + e in place, remembering the original values.

    Sparse offsets remember only the touched entries, into ``backups[i]`` when given (a
    buffer of as many entries).  Dense offsets copy the whole tensor, into ``backups[i]``
    when given (a buffer like the parameter).  Reused buffers keep the CPU's peak memory
    steady, and page-faulting a fresh full-size copy every step costs more than the copy.
    A sparse offset's values of the parameter's dtype are consumed: they become w + e there.
    With ``move``, a parameter that owns its storage (``_can_move``) is not copied at all:
    w + e goes into its buffer and the parameter's data points there until ``restore``.
    ``params`` must then be the parameters themselves, not aliases of them (FSDP2's local
    slices are aliases: the sharded path passes ``move=False``).
    """
    applied = AppliedPerturbation()
    dense_params, dense_offsets, dense_backups = [], [], []
    moving_params, moving_offsets, moving_buffers = [], [], []
    for i, (p, offset) in enumerate(zip(params, offsets)):
        if isinstance(offset, SparseOffset) and p.is_contiguous():
            backup = backups[i] if backups is not None else None
            original = climb_entries(p, offset.indices, offset.values, backup)
            applied.params.append(p)
            applied.saved.append(SparseOffset(offset.indices, original))
            continue
        if isinstance(offset, SparseOffset):  # a non-contiguous parameter: densify
            dense = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            offset = dense.index_copy_(0, _as_long(offset.indices), offset.values.to(p.dtype)).view(p.shape)
            backup = torch.empty_like(p)  # a buffer for the kept entries cannot hold all of p
        else:
            backup = backups[i] if backups is not None else None
            if move and backup is not None and _can_move(p):
                moving_params.append(p)
                moving_offsets.append(offset.to(p.dtype))
                moving_buffers.append(backup)
                continue
            backup = backup if backup is not None else torch.empty_like(p)
        dense_params.append(p)
        dense_offsets.append(offset.to(p.dtype))
        dense_backups.append(backup)
    if dense_params:
        torch._foreach_copy_(dense_backups, dense_params)
        applied.params.extend(dense_params)
        applied.saved.extend(dense_backups)
        torch._foreach_add_(dense_params, dense_offsets)
    if moving_params:
        applied.moved = _move_to_buffers(moving_params, moving_offsets, moving_buffers)
    return applied


# --------------------------------------------------------------------------------------
# One object per training run: the variant, its hyper-parameters and its state
# --------------------------------------------------------------------------------------
@dataclass
class SharpnessPerturbation:
    """Builds and applies e for one SAM variant; holds FSAM's EMA between steps."""

    variant: str = "zsam"
    rho: float = 0.05
    quantile: float = 0.95
    normalization: str = "global"
    asam_eta: float = 0.01
    fsam_sigma: float = 1.0
    fsam_lambda: float = 0.9
    seed: int = 0  # the random control's masks: drawn from (seed, optimizer step)
    # The accelerator's selection (one topk per tensor, fixed shapes) on any device; default: by device.
    fixed_shape: bool = False
    # No host synchronization in the ascent (``capturable.py``): a CUDA graph can capture the step.
    capturable: bool = False
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    _backups: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _kept_buffers: dict[str, KeptBuffers] = field(default_factory=dict, repr=False)

    def offsets(
        self, names, params, grads, shards=None, numels=None, step: int = 0
    ) -> tuple[list[Offset], float | None] | None:
        """e for each parameter (aligned with ``params``) and the zsam kept fraction (see ``_offsets``)."""
        result = self._offsets(names, params, grads, shards, numels, reuse_buffers=False, step=step)
        return None if result is None else result[:2]

    def _offsets(
        self,
        names: list[str],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        shards: Shards | None = None,
        numels: list[int] | None = None,
        reuse_buffers: bool = True,
        step: int = 0,
    ) -> tuple[list[Offset], float | None, torch.Tensor | None] | None:
        """e for each parameter (aligned with ``params``), the zsam kept fraction, and ||e|| when the
        variant knows it without a pass over e (SAM: rho ||g|| / (||g|| + eps); ZSAM and the random control
        likewise with ||g~|| under ``global`` normalization: ``zsam_offsets``), else None.

        With ``reuse_buffers``, zsam's kept entries on a CPU live in this object's buffers, one
        set per parameter name, valid until the next call (see ``selection/reuse.py``).

        None when the ascent gradient is not finite (an fp16 overflow).  The check
        reuses a number each variant computes anyway: ||g||_G, or for zsam the means
        (on a CPU, each checked just before its tensor's selection).
        With ``shards``, the tensors are this rank's slices of full tensors of ``numels`` entries.
        ``step`` (the optimizer step) seeds the random control's masks, with ``seed``.
        """
        if self.variant == "random":
            if shards is not None:
                raise ValueError("sam_variant='random' is not supported on sharded (FSDP2) parameters")
            if not _all_finite(grads):
                return None
            kept = random_kept([g for g in grads if g.ndim > 1], self.quantile, self.seed, step)
            return zsam_offsets(grads, self.rho, self.quantile, self.normalization, kept=kept)
        if self.variant == "zsam":
            weight_grads = [g for g in grads if g.ndim > 1]
            kept = None
            if (
                shards is None
                and weight_grads
                and weight_grads[0].device.type == "cpu"
                and not self.fixed_shape
            ):
                if not _all_finite([g for g in grads if g.ndim <= 1]):
                    return None
                buffers = None
                if reuse_buffers:
                    buffers = [self._kept_buffer(n) for n, g in zip(names, grads) if g.ndim > 1]
                means, kept = None, _kept_while_finite(weight_grads, self.quantile, buffers)
                if kept is None:
                    return None
            elif shards is None:  # an accelerator (or fixed_shape): finiteness read with the kept counts
                means = [gradient_mean(g) for g in weight_grads]
                finite = _finite_flag([*means, *(g for g in grads if g.ndim <= 1)])
                kept, (is_finite,) = kept_and_flags(weight_grads, self.quantile, means, [finite])
                if not is_finite:
                    return None
            else:
                means = shards.means(weight_grads, [n for g, n in zip(grads, numels) if g.ndim > 1])
                if not _all_finite([*means, *(g for g in grads if g.ndim <= 1)], shards):
                    return None
            return zsam_offsets(
                grads, self.rho, self.quantile, self.normalization, means, shards, numels, kept
            )
        if self.variant not in VARIANTS[:-1]:
            raise ValueError(
                f"sam_variant={self.variant!r} has no perturbation; expected one of {VARIANTS[:-1]}"
            )
        grad_norm = _global_norm(grads, shards)
        if not bool(torch.isfinite(grad_norm)):
            return None
        if self.variant == "sam" and self.normalization == "tensor":
            return sam_tensor_offsets(grads, self.rho, shards), None, None
        if self.variant == "sam":
            return sam_offsets(grads, self.rho, grad_norm), None, self.rho * grad_norm / (grad_norm + EPS)
        if self.variant == "asam":
            return asam_offsets(names, params, grads, self.rho, self.asam_eta, shards), None, None
        ema = [self.ema.get(n) for n in names]
        offsets = fsam_offsets(grads, ema, self.rho, self.fsam_sigma, self.fsam_lambda, shards)
        self.ema.update(zip(names, ema))
        return offsets, None, None

    def perturb(
        self,
        names: list[str],
        params: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        shards: Shards | None = None,
        numels: list[int] | None = None,
        step: int = 0,
    ) -> tuple[AppliedPerturbation, PerturbationStats | None]:
        """Climb to w + e (docs/algorithm.md, step 2) in place; returns how to get back and step stats.

        Parameters whose ascent gradient is None are left alone.  A non-finite ascent
        gradient (an fp16 overflow) means no perturbation this step, so the GradScaler
        can skip the step as usual and no NaN ever reaches the weights. With ``shards``
        (FSDP2), ``params`` and ``grads`` are this rank's slices of full tensors of ``numels``
        entries: e is the single-process e of the full tensors, applied slice by slice.
        """
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return AppliedPerturbation(), None
        names = [names[i] for i in present]
        params = [params[i] for i in present]
        grads = [grads[i] for i in present]
        numels = [numels[i] for i in present] if numels is not None else None
        if self.capturable:
            return self._perturb_capturable(names, params, grads, shards)
        result = self._offsets(names, params, grads, shards, numels, step=step)
        if result is None:
            return AppliedPerturbation(), None
        offsets, kept_fraction, norm = result
        norm = offsets_norm(offsets, shards) if norm is None else norm
        stats = PerturbationStats(norm=norm, kept_fraction=kept_fraction)
        backups = [
            self._originals_buffer(n, p, o) if isinstance(o, SparseOffset) else self._backup_buffer(n, p)
            for n, p, o in zip(names, params, offsets)
        ]
        return apply_offsets(params, offsets, backups, move=shards is None), stats

    def _perturb_capturable(
        self, names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor], shards: Shards | None
    ) -> tuple[AppliedPerturbation, PerturbationStats]:
        """``perturb`` with no host synchronization (``capturable.py``): w + e in each parameter's reused
        buffer, the parameter pointed at it until the restore. A non-finite ascent gradient gives e = 0
        (the weights stay w) instead of no perturbation, since telling the two apart needs a host read."""
        from .capturable import capturable_ascent, check_capturable  # it builds on this module

        check_capturable(self.variant, shards)
        for name, p in zip(names, params):
            if not _can_move(p):
                raise ValueError(
                    f"capturable=True points each parameter at a buffer holding w + e between the passes, but "
                    f"parameter {name!r} does not own its whole contiguous storage (a view into a larger "
                    "buffer, a tensor subclass or a non-contiguous tensor): use capturable=False"
                )
        buffers = [self._backup_buffer(n, p) for n, p in zip(names, params)]
        with torch.no_grad():  # the Trainer climbs with autograd on; the weights are written as data
            norm, kept_fraction, finite = capturable_ascent(
                params, grads, buffers, self.variant, self.rho, self.quantile, self.normalization
            )
        stats = PerturbationStats(norm=norm, kept_fraction=kept_fraction, taken=finite)
        return AppliedPerturbation(moved=_point_at(params, buffers)), stats

    def _kept_buffer(self, name: str) -> KeptBuffers:
        """The reused storage of one weight tensor's kept entries."""
        if name not in self._kept_buffers:
            self._kept_buffers[name] = KeptBuffers()
        return self._kept_buffers[name]

    def _originals_buffer(self, name: str, param: torch.Tensor, offset: SparseOffset) -> torch.Tensor | None:
        """Where the weights at a sparse offset's entries are kept; None when they have no reused buffer
        (an accelerator: its caching allocator keeps the peak steady) or need none (the compiled climb
        writes them over the offset's own values)."""
        if offset.indices.device.type != "cpu" or _compiled_cpu(param, offset.indices, offset.values):
            return None
        return self._kept_buffer(name).originals_for(offset.indices.numel(), param.dtype, param.device)

    def _backup_buffer(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """A buffer to hold a copy of ``param``, reused from step to step."""
        buffer = self._backups.get(name)
        if (
            buffer is None
            or buffer.shape != param.shape
            or buffer.dtype != param.dtype
            or buffer.device != param.device
        ):
            buffer = self._backups[name] = torch.empty_like(param)
        return buffer

    def state_dict(self) -> dict:
        return {"ema": {k: v.detach().cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        self.ema = {k: v.to(device) if device is not None else v for k, v in state.get("ema", {}).items()}
