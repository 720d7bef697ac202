"""The ascent with no host synchronization: a step that a CUDA graph can capture whole.

The eager engine (``perturbation.py``) reads the host once per step: whether the ascent gradient is
finite, and on an accelerator how many entries each weight tensor kept, because a tensor that kept
nothing falls back to SAM's dense e_p (docs/algorithm.md) and the engine then writes that tensor
whole. Capture forbids that read, and ``torch.cond`` cannot help: its branches may not write their
inputs. So here every decision stays on the device and gates the values written:

* the selection is ``selection/fixed_shape.py``'s (one ``topk`` per weight tensor, shapes fixed by n
  and Q_p, ties masked on the device): the same kept set as the eager path;
* a non-finite ascent gradient gates e to zero with ``torch.where`` (never a multiply by zero, which
  would turn an infinity into NaN): the weights stay w, and the GradScaler skips the step as usual;
* a weight tensor whose filter kept nothing (``global``) or only zeros (``tensor``) takes SAM's
  rho g_p / (||g||_G + eps), gated per tensor, so every tensor is written whole every step.

Because every tensor may be written whole, w + e goes into a buffer per parameter, reused from step
to step, and the parameter points at it until the restore points it back at its own, untouched
storage: SAM's own move. The price is SAM's memory between the passes (one copy of the parameters)
instead of the eager path's 0.1-0.15x, and one dense pass per tensor; on an accelerator the launches
saved by capture are what the step is made of (docs/performance.md).
"""

from __future__ import annotations

import torch

from .perturbation import EPS, norm_of_norms
from .selection import FixedKept, gradient_mean, kept_fixed_shape_many

CAPTURABLE_VARIANTS = ("zsam", "sam")


def check_capturable(variant: str, shards=None) -> None:
    """Refuse what the capturable ascent does not cover, naming what it does."""
    if variant not in CAPTURABLE_VARIANTS:
        raise ValueError(
            f"capturable=True is not available for variant={variant!r}: expected one of "
            f"{', '.join(CAPTURABLE_VARIANTS)} (the others read the host or draw on it each step)"
        )
    if shards is not None:
        raise ValueError("capturable=True is not supported on sharded (FSDP2) parameters")


def _gated_dense(buffer: torch.Tensor, w: torch.Tensor, g: torch.Tensor, scale, gate) -> None:
    """``buffer`` = w + scale g where ``gate`` holds, w elsewhere (bit for bit): the same rounding as the
    eager engine's dense offset (e = g * scale first, then w + e)."""
    torch.mul(g, scale, out=buffer)
    buffer.add_(w)
    torch.where(gate, buffer, w, out=buffer)


def _sparse_into(buffer: torch.Tensor, w: torch.Tensor, kept: FixedKept, scale, write) -> torch.Tensor:
    """Write w + scale g at the kept slots where ``write`` holds, leaving the buffer's own value
    elsewhere (an invalid slot, or a tensor that took the dense fallback); returns e at the slots
    written (zero elsewhere)."""
    flat_buffer, flat_w = buffer.view(-1), w.detach().view(-1)
    offset = kept.values * scale  # e = g * scale, then w + e: the eager engine's rounding
    climbed = flat_w.index_select(0, kept.indices).add_(offset.to(w.dtype))
    chosen = torch.where(write, climbed, flat_buffer.index_select(0, kept.indices))
    flat_buffer.index_copy_(0, kept.indices, chosen)  # deterministic: topk's indices are distinct
    return torch.where(write, offset, 0.0)


def capturable_ascent(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor],
    variant: str,
    rho: float,
    quantile: float,
    normalization: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Write w + e of each parameter into its buffer (like the parameter), with no host synchronization.

    e is the eager engine's e (docs/algorithm.md) for ``variant`` ("zsam" or "sam") and
    ``normalization``, zero everywhere when the ascent gradient is not finite. Returns, as device
    tensors: ||e||_G; for zsam, the fraction of the weight tensors' entries the filter kept (0 when the
    gradient is not finite; None for sam); and whether the ascent gradient was finite (the ascent taken).
    The parameters themselves are only read. ``grads`` holds at least one gradient (the engine takes no
    ascent without one).
    """
    weights = [i for i, g in enumerate(grads) if g.ndim > 1]
    others = [i for i, g in enumerate(grads) if g.ndim <= 1]
    grad_norms = list(torch._foreach_norm([g.reshape(-1) for g in grads]))
    grad_norm = norm_of_norms(grad_norms)
    sam_scale = rho / (grad_norm + EPS)
    if variant == "sam":
        finite = torch.isfinite(grad_norm)
        scales = [sam_scale] * len(grads)
        if normalization == "tensor":
            for i in weights:
                scales[i] = rho / (grad_norms[i] + EPS)
        for p, g, b, s in zip(params, grads, buffers, scales):
            _gated_dense(b, p, g, s, finite)
        norms = [torch.where(finite, n * s, 0.0) for n, s in zip(grad_norms, scales)]
        return norm_of_norms(norms), None, finite

    means = [gradient_mean(grads[i]) for i in weights]
    flags = [torch.isfinite(m) for m in means] + [torch.isfinite(grad_norms[i]) for i in others]
    finite = torch.stack(flags).all()
    found = kept_fixed_shape_many([grads[i] for i in weights], quantile, means)
    if normalization == "tensor":
        filtered_norms = list(torch._foreach_norm([k.values for k in found])) if found else []
        sparse = [rho / (n + EPS) for n in filtered_norms]
        takes_sparse = [n > 0 for n in filtered_norms]  # kept something other than zeros
        other_scale = sam_scale
    else:
        members = [k.values for k in found] + [grads[i] for i in others]  # a tensor that kept nothing adds 0
        scale = rho / (norm_of_norms(list(torch._foreach_norm(members))) + EPS)
        sparse = [scale] * len(found)
        takes_sparse = [k.valid.any() for k in found]
        other_scale = scale

    norms = []
    for kept, i, s, ok in zip(found, weights, sparse, takes_sparse):
        fallback = finite & ~ok
        _gated_dense(buffers[i], params[i], grads[i], sam_scale, fallback)
        write = kept.valid & (finite & ok)
        applied = _sparse_into(buffers[i], params[i], kept, s, write)
        norms += [torch.linalg.vector_norm(applied), torch.where(fallback, grad_norms[i] * sam_scale, 0.0)]
    for i in others:
        _gated_dense(buffers[i], params[i], grads[i], other_scale, finite)
        norms.append(torch.where(finite, grad_norms[i] * other_scale, 0.0))
    weight_entries = sum(grads[i].numel() for i in weights)
    kept = torch.stack([k.valid.sum() for k in found]).sum() if found else torch.zeros((), dtype=torch.long)
    kept_fraction = torch.where(finite, kept / max(weight_entries, 1), 0.0)
    return norm_of_norms(norms), kept_fraction, finite
