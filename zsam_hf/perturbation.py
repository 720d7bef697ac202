"""The SAM-family perturbations e(g, w), as pure tensor math (no Hugging Face imports).

Every variant of ``SPEC.md`` differs from SAM only in how the ascent step e is built
from the ascent gradient g.  This module builds e, writes ``w + e`` into the weights
in place and keeps exactly what is needed to write ``w`` back bit for bit:

* dense variants (``sam``, ``asam``, ``fsam``) keep a copy of each perturbed tensor;
* ``zsam`` perturbs only the ~(1 - Q_p) fraction of each weight tensor that survives the
  z-score filter, so it keeps just those entries' flat indices and original values.

The z-score threshold is an interpolated order statistic of ``|g - mean g|``.  A full
selection per tensor (``kthvalue``, ``torch.quantile``) costs more than the rest of the
step's bookkeeping together, so :func:`interpolated_quantile` brackets the two order
statistics with a small deterministic sample, counts how many entries fall below the
bracket, and selects exactly among the few entries inside it: O(n), exact, and no
size limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

EPS = 1e-12
VARIANTS = ("zsam", "sam", "asam", "fsam", "none")
NORMALIZATIONS = ("global", "tensor")
DEFAULT_RHO = {"zsam": 0.05, "sam": 0.05, "fsam": 0.05, "asam": 0.5, "none": 0.05}

# Sample size used to bracket a quantile; below SMALL_TENSOR a plain sort is cheaper.
_SAMPLE_SIZE = 8192
_BRACKET_SIGMAS = 4.0
_SMALL_TENSOR = 4 * _SAMPLE_SIZE
_SORT_LIMIT = 2048
# Odd multiplier (Knuth's golden-ratio hash) spreading sample indices over the tensor
# without touching any random-number generator.
_HASH_MULTIPLIER = 2654435761


# --------------------------------------------------------------------------------------
# The z-score filter
# --------------------------------------------------------------------------------------
def _select(values: torch.Tensor, ranks: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact order statistics (0-based ranks) of a 1-D tensor; O(n) beyond a small size."""
    if values.numel() <= _SORT_LIMIT:
        ordered = torch.sort(values).values
        return ordered[ranks[0]], ordered[ranks[1]]
    lower = torch.kthvalue(values, ranks[0] + 1).values
    upper = lower if ranks[1] == ranks[0] else torch.kthvalue(values, ranks[1] + 1).values
    return lower, upper


def _quantile_ranks(n: int, q: float) -> tuple[tuple[int, int], float]:
    """The two order statistics (0-based) that torch.quantile interpolates, and the weight."""
    pos = q * (n - 1)
    lo = math.floor(pos)
    return (lo, min(lo + 1, n - 1)), pos - lo


def interpolated_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor, linear interpolation between order statistics.

    Same definition as ``torch.quantile``/``numpy.quantile`` (default method): with
    pos = q (n - 1), lerp(x_(floor pos), x_(floor pos + 1), pos - floor pos); computed by
    O(n) selection, for any size and any floating dtype.
    """
    ranks, frac = _quantile_ranks(values.numel(), q)
    return torch.lerp(*_select(values, ranks), frac)


def _sample_bracket(values: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two values that enclose the q-quantile of ``values`` with overwhelming probability.

    Order statistics of a deterministic pseudo-random sample, ``margin`` standard
    deviations of the sample rank either side of q (no RNG is touched).
    """
    n = values.numel()
    sample_idx = (torch.arange(_SAMPLE_SIZE, device=values.device) * _HASH_MULTIPLIER) % n
    sample = torch.sort(values[sample_idx]).values
    centre = q * (_SAMPLE_SIZE - 1)
    margin = int(_BRACKET_SIGMAS * math.sqrt(_SAMPLE_SIZE * q * (1 - q))) + 2
    return sample[max(0, math.floor(centre) - margin)], sample[min(_SAMPLE_SIZE - 1, math.ceil(centre) + margin)]


def _kept_indices_exact(deviation: torch.Tensor, q: float) -> torch.Tensor:
    tau = interpolated_quantile(deviation, q)
    return torch.nonzero(deviation > tau).squeeze(1)


def _kept_indices_bracketed(deviation: torch.Tensor, q: float) -> torch.Tensor:
    """Flat indices with deviation > its q-quantile, for a large tensor, in O(n).

    The sample bracket [low, high] encloses the quantile; one pass collects the
    entries >= low (the kept ones plus the thin bracket), so the count below the
    bracket is known, the quantile's two order statistics are selected exactly among
    the few entries inside it, and the kept indices are a subset of those collected.
    Massive ties (low == high) need no selection.  If the bracket misses, an exact
    full selection takes over: the answer never depends on the sample.
    """
    n = deviation.numel()
    ranks, frac = _quantile_ranks(n, q)
    low, high = _sample_bracket(deviation, q)
    candidates = torch.nonzero(deviation >= low).squeeze(1)
    values = deviation[candidates]
    below = n - candidates.numel()
    in_window = values <= high
    n_window = int(torch.count_nonzero(in_window))
    if not (below <= ranks[0] and ranks[1] < below + n_window):
        return _kept_indices_exact(deviation, q)
    if bool(low == high):
        tau = low
    else:
        window = values[in_window]
        tau = torch.lerp(*_select(window, (ranks[0] - below, ranks[1] - below)), frac)
    return candidates[values > tau]


def _abs_deviation(grad: torch.Tensor) -> torch.Tensor:
    """|g - mean g| flattened, in float32 at least (half-precision means are too coarse)."""
    flat = grad.reshape(-1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return torch.sub(flat, flat.mean()).abs_()


def kept_indices(grad: torch.Tensor, quantile: float) -> torch.Tensor:
    """Flat indices of the entries of ``grad`` that the z-score filter keeps (see zscore_mask)."""
    if grad.numel() <= 1:
        return torch.empty(0, dtype=torch.long, device=grad.device)
    deviation = _abs_deviation(grad)
    if deviation.numel() <= _SMALL_TENSOR:
        return _kept_indices_exact(deviation, quantile)
    return _kept_indices_bracketed(deviation, quantile)


def zscore_mask(grad: torch.Tensor, quantile: float) -> torch.Tensor:
    """SPEC.md's z-score filter of one gradient tensor: True where |z| > Q_p-quantile of |z|.

    z = (g - mean g) / (std g + eps) is a positive rescaling of g - mean g, and the
    interpolated quantile commutes with positive rescaling, so the mask is computed on
    |g - mean g| directly (sigma is never materialized).  Constant tensors and single
    entries give an empty mask because the comparison is strict.
    """
    mask = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
    mask[kept_indices(grad, quantile)] = True
    return mask.view(grad.shape)


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
    """What a step's perturbation looked like, as device tensors (no host sync)."""

    norm: torch.Tensor
    kept_fraction: float | None = None


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)).float())


def sam_offsets(grads: list[torch.Tensor], rho: float, grad_norm: torch.Tensor | None = None) -> list[Offset]:
    """Foret et al. (2021): e_p = rho g_p / (||g||_G + eps)."""
    grad_norm = _global_norm(grads) if grad_norm is None else grad_norm
    return torch._foreach_mul(grads, rho / (grad_norm + EPS))


def asam_offsets(
    names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, eta: float
) -> list[Offset]:
    """Kwon et al. (2021), as the released code runs it.

    T_p = |w_p| + eta for parameters whose name contains "weight", 1 otherwise;
    e_p = rho T_p^2 g_p / (||T g||_G + eps).
    """
    scaled = []  # T g
    for name, p, g in zip(names, params, grads):
        scaled.append(g * (p.detach().abs() + eta) if "weight" in name else g)
    factor = rho / (_global_norm(scaled) + EPS)
    offsets = []
    for name, p, tg in zip(names, params, scaled):
        offsets.append(tg.mul_(p.detach().abs() + eta).mul_(factor) if "weight" in name else tg * factor)
    return offsets


def fsam_offsets(
    grads: list[torch.Tensor], ema: list[torch.Tensor | None], rho: float, sigma: float, lam: float
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
    return sam_offsets(directions, rho)


def zsam_offsets(
    grads: list[torch.Tensor], rho: float, quantile: float, normalization: str, grad_norm: torch.Tensor
) -> tuple[list[Offset], float]:
    """ZSharp (Yun 2025): SAM's step on the z-score filtered gradient.

    Weight tensors (ndim > 1) keep only the entries with |z| above the Q_p quantile;
    tensors with ndim <= 1 stay unfiltered.  ``global`` normalization (the paper's
    formula) scales the filtered gradient of all tensors together to norm rho;
    ``tensor`` (the released code) scales each weight tensor to norm rho on its own.
    A weight tensor whose mask is empty falls back to SAM's e_p = rho g_p / (||g||_G + eps).

    Returns the offsets and the fraction of weight-tensor entries kept.
    """
    sam_scale = rho / (grad_norm + EPS)
    kept_entries = total_entries = 0
    filtered: list[SparseOffset | None] = []
    for g in grads:
        if g.ndim <= 1:
            filtered.append(None)
            continue
        indices = kept_indices(g, quantile)
        kept_entries += indices.numel()
        total_entries += g.numel()
        filtered.append(SparseOffset(indices, g.reshape(-1)[indices]) if indices.numel() else None)
    kept_fraction = kept_entries / total_entries if total_entries else 0.0

    if normalization == "tensor":
        kept = [f for f in filtered if f is not None]
        norms = torch._foreach_norm([f.values for f in kept]) if kept else []
        positive = torch.stack(norms).gt(0).tolist() if kept else []
        scales = dict(zip(map(id, kept), zip(norms, positive)))
        offsets = []
        for g, f in zip(grads, filtered):
            if f is not None and scales[id(f)][1]:
                f.values.mul_(rho / (scales[id(f)][0] + EPS))
                offsets.append(f)
            else:  # nothing kept, or only zeros kept: SAM's e_p
                offsets.append(g * sam_scale)
        return offsets, kept_fraction

    # global: ||g~||_G over filtered weight tensors and unfiltered ndim <= 1 tensors.
    members = [f.values if f is not None else g for g, f in zip(grads, filtered) if f is not None or g.ndim <= 1]
    scale = rho / (_global_norm(members) + EPS)
    offsets = []
    for g, f in zip(grads, filtered):
        if f is not None:
            f.values.mul_(scale)
            offsets.append(f)
        else:
            offsets.append(g * (scale if g.ndim <= 1 else sam_scale))
    return offsets, kept_fraction


def offsets_norm(offsets: list[Offset]) -> torch.Tensor:
    """||e||_G of a list of dense or sparse offsets."""
    return _global_norm([o.values if isinstance(o, SparseOffset) else o for o in offsets])


# --------------------------------------------------------------------------------------
# Applying e in place and restoring w exactly
# --------------------------------------------------------------------------------------
@dataclass
class AppliedPerturbation:
    """Weights currently at w + e, with what it takes to put w back bit for bit."""

    params: list[torch.Tensor] = field(default_factory=list)
    saved: list[Offset] = field(default_factory=list)  # original entries (sparse) or tensors (dense)

    @torch.no_grad()
    def restore(self) -> None:
        """Write w back from the saved originals (no w + e - e rounding)."""
        for p, saved in zip(self.params, self.saved):
            if isinstance(saved, SparseOffset):
                p.view(-1).index_copy_(0, saved.indices, saved.values)
            else:
                p.copy_(saved)
        self.params, self.saved = [], []

    def extra_bytes(self) -> int:
        """Memory kept between the two passes to restore w."""
        total = 0
        for saved in self.saved:
            tensors = (saved.indices, saved.values) if isinstance(saved, SparseOffset) else (saved,)
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


@torch.no_grad()
def apply_offsets(params: list[torch.Tensor], offsets: list[Offset]) -> AppliedPerturbation:
    """Move each parameter to w + e in place, remembering the original values."""
    applied = AppliedPerturbation()
    dense_params, dense_offsets = [], []
    for p, offset in zip(params, offsets):
        if isinstance(offset, SparseOffset) and p.is_contiguous():
            flat = p.view(-1)
            original = flat.index_select(0, offset.indices)
            flat.index_copy_(0, offset.indices, original + offset.values.to(p.dtype))
            applied.params.append(p)
            applied.saved.append(SparseOffset(offset.indices, original))
        else:
            if isinstance(offset, SparseOffset):  # a non-contiguous parameter: densify
                dense = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                offset = dense.index_copy_(0, offset.indices, offset.values.to(p.dtype)).view(p.shape)
            dense_params.append(p)
            dense_offsets.append(offset.to(p.dtype))
    if dense_params:
        applied.params.extend(dense_params)
        applied.saved.extend(torch._foreach_mul(dense_params, 1.0))  # copies of w
        torch._foreach_add_(dense_params, dense_offsets)
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
    ema: dict[str, torch.Tensor] = field(default_factory=dict)

    def offsets(
        self, names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor], grad_norm: torch.Tensor
    ) -> tuple[list[Offset], float | None]:
        """e for each parameter (aligned with ``params``) and the zsam kept fraction."""
        if self.variant == "zsam":
            return zsam_offsets(grads, self.rho, self.quantile, self.normalization, grad_norm)
        if self.variant == "sam":
            return sam_offsets(grads, self.rho, grad_norm), None
        if self.variant == "asam":
            return asam_offsets(names, params, grads, self.rho, self.asam_eta), None
        if self.variant == "fsam":
            ema = [self.ema.get(n) for n in names]
            offsets = fsam_offsets(grads, ema, self.rho, self.fsam_sigma, self.fsam_lambda)
            self.ema.update(zip(names, ema))
            return offsets, None
        raise ValueError(f"sam_variant={self.variant!r} has no perturbation; expected one of {VARIANTS[:-1]}")

    def perturb(
        self, names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor | None]
    ) -> tuple[AppliedPerturbation, PerturbationStats | None]:
        """Climb to w + e (SPEC.md step 2) in place; returns how to get back and step stats.

        Parameters whose ascent gradient is None are left alone.  A non-finite ascent
        gradient (an fp16 overflow) means no perturbation this step, so the GradScaler
        can skip the step as usual and no NaN ever reaches the weights.
        """
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return AppliedPerturbation(), None
        names = [names[i] for i in present]
        params = [params[i] for i in present]
        grads = [grads[i] for i in present]
        grad_norm = _global_norm(grads)
        if not bool(torch.isfinite(grad_norm)):
            return AppliedPerturbation(), None
        offsets, kept_fraction = self.offsets(names, params, grads, grad_norm)
        stats = PerturbationStats(norm=offsets_norm(offsets), kept_fraction=kept_fraction)
        return apply_offsets(params, offsets), stats

    def state_dict(self) -> dict:
        return {"ema": {k: v.detach().cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        self.ema = {k: v.to(device) if device is not None else v for k, v in state.get("ema", {}).items()}
