"""A plain reference implementation of docs/algorithm.md, kept in the tests to check the fast one.

NumPy, float64, one loop per tensor, numpy.quantile for the threshold: nothing shared
with ``zsam_hf.perturbation``. Losses by hand (``torch.func``) for gradients computed
outside the Trainer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-12


def as_f64(t) -> np.ndarray:
    return (
        t.detach().to(torch.float64).cpu().numpy()
        if isinstance(t, torch.Tensor)
        else np.asarray(t, np.float64)
    )


def reference_mask(grad, quantile: float) -> np.ndarray:
    g = as_f64(grad)
    flat = g.ravel()
    if flat.size < 2:
        return np.zeros(g.shape, dtype=bool)
    mu = flat.mean()
    sigma = flat.std(ddof=1)
    if not np.isfinite(sigma) or sigma == 0:
        return np.zeros(g.shape, dtype=bool)
    z = np.abs((flat - mu) / (sigma + EPS))
    tau = np.quantile(z, quantile)  # linear interpolation (numpy's default method)
    return (z > tau).reshape(g.shape)


def _norm(arrays) -> float:
    return float(np.sqrt(sum(float((a**2).sum()) for a in arrays)))


def reference_offsets(
    variant: str,
    names: list[str],
    params: list,
    grads: list,
    rho: float,
    quantile: float = 0.95,
    normalization: str = "global",
    eta: float = 0.01,
    ema: dict | None = None,
    sigma: float = 1.0,
    lam: float = 0.9,
    masks: list | None = None,
) -> list[np.ndarray]:
    """e for each (param, grad) pair, exactly as docs/algorithm.md writes it.

    ``masks`` (one per tensor, None for tensors with ndim <= 1) replace the z-score masks: the
    random control is ZSAM's e built on other masks."""
    g = [as_f64(x) for x in grads]
    w = [as_f64(x) for x in params]
    g_norm = _norm(g)
    if variant == "sam" and normalization == "tensor":
        return [rho * gi / (_norm([gi]) + EPS) if gi.ndim > 1 else rho * gi / (g_norm + EPS) for gi in g]
    if variant == "sam":
        return [rho * gi / (g_norm + EPS) for gi in g]
    if variant == "asam":
        t = [np.abs(wi) + eta if "weight" in n else np.ones_like(wi) for n, wi in zip(names, w)]
        tg_norm = _norm([ti * gi for ti, gi in zip(t, g)])
        return [rho * ti**2 * gi / (tg_norm + EPS) for ti, gi in zip(t, g)]
    if variant == "fsam":
        assert ema is not None
        directions = []
        for n, gi in zip(names, g):
            if n not in ema:
                ema[n] = gi.copy()
                directions.append(gi)
            else:
                directions.append(gi - sigma * ema[n])
                ema[n] = lam * ema[n] + (1 - lam) * gi
        d_norm = _norm(directions)
        return [rho * d / (d_norm + EPS) for d in directions]
    assert variant in ("zsam", "random")
    assert (variant == "random") == (masks is not None)
    filtered = []
    for i, gi in enumerate(g):
        if gi.ndim > 1:
            m = reference_mask(gi, quantile) if masks is None else np.asarray(masks[i], dtype=bool)
            filtered.append(gi * m if m.any() else None)
        else:
            filtered.append(None)
    if normalization == "tensor":
        out = []
        for gi, fi in zip(g, filtered):
            if fi is not None and _norm([fi]) > 0:
                out.append(rho * fi / (_norm([fi]) + EPS))
            else:
                out.append(rho * gi / (g_norm + EPS))
        return out
    members = [fi if fi is not None else gi for gi, fi in zip(g, filtered) if fi is not None or gi.ndim <= 1]
    f_norm = _norm(members)
    out = []
    for gi, fi in zip(g, filtered):
        if fi is not None:
            out.append(rho * fi / (f_norm + EPS))
        elif gi.ndim <= 1:
            out.append(rho * gi / (f_norm + EPS))
        else:  # a weight tensor whose mask is empty: SAM's e_p
            out.append(rho * gi / (g_norm + EPS))
    return out


def loss_by_hand(model, params: dict, batch: dict, summed: bool, weight: float) -> torch.Tensor:
    """Cross-entropy of ``model`` at ``params`` on ``batch``, summed or mean, times ``weight``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = torch.func.functional_call(model, params, args=(), kwargs=inputs)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    reduction = "sum" if summed else "mean"
    return F.cross_entropy(logits.float(), batch["labels"], reduction=reduction) * weight


def sam_gradient_by_hand(
    model, w0: dict, batch: dict, summed: bool, weight: float, variant: str, **ref_kwargs
):
    """grad L(w0 + e) with e built by the reference from this batch's own grad L(w0)."""
    names = list(w0)
    at_w = {n: w0[n].clone().requires_grad_() for n in names}
    g = torch.autograd.grad(loss_by_hand(model, at_w, batch, summed, weight), list(at_w.values()))
    rho = ref_kwargs.pop("rho", 0.5 if variant == "asam" else 0.05)
    e = reference_offsets(variant, names, [w0[n] for n in names], g, rho, **ref_kwargs)
    at_we = {n: (w0[n].double() + torch.from_numpy(ei)).float().requires_grad_() for n, ei in zip(names, e)}
    g_prime = torch.autograd.grad(loss_by_hand(model, at_we, batch, summed, weight), list(at_we.values()))
    return dict(zip(names, g_prime)), dict(zip(names, g))


def assert_close_dicts(actual: dict, expected: dict, rtol=2e-4, atol=1e-6, what=""):
    assert set(actual) == set(expected), what
    for n in expected:
        np.testing.assert_allclose(
            actual[n].numpy(), expected[n].numpy(), rtol=rtol, atol=atol, err_msg=f"{what} {n}"
        )


def synced_sam_gradient(
    model, w0: dict, micro_batches: list[list[dict]], variant: str, weight: float, **ref_kwargs
):
    """The accumulated gradient of one optimizer step with a synchronized ascent, by hand.

    ``micro_batches[k][r]`` is rank r's k-th micro-batch. Each micro-batch k takes e from the
    ascent gradient averaged over ranks; the step's gradient is the sum over micro-batches of the
    rank-averaged grad L(w0 + e_k), each loss times ``weight`` (the Trainer's 1 / accumulation).
    ``ref_kwargs`` go to ``reference_offsets`` (its ``ema`` dict is updated in place).
    """
    names = list(w0)

    def grads_at(params: dict, batch: dict) -> list[torch.Tensor]:
        leaves = {n: t.clone().requires_grad_() for n, t in params.items()}
        return list(
            torch.autograd.grad(loss_by_hand(model, leaves, batch, False, weight), list(leaves.values()))
        )

    rho = ref_kwargs.pop("rho", 0.5 if variant == "asam" else 0.05)
    total = [torch.zeros_like(w0[n]) for n in names]
    for per_rank in micro_batches:
        ascent = [grads_at(w0, batch) for batch in per_rank]
        mean = [sum(gs) / len(gs) for gs in zip(*ascent)]
        e = reference_offsets(variant, names, [w0[n] for n in names], mean, rho, **ref_kwargs)
        moved = {n: (w0[n].double() + torch.from_numpy(ei)).float() for n, ei in zip(names, e)}
        for batch in per_rank:
            total = [t + g / len(per_rank) for t, g in zip(total, grads_at(moved, batch))]
    return dict(zip(names, total))


def clipped(grads: dict, max_norm: float) -> dict:
    """torch.nn.utils.clip_grad_norm_'s result, by hand."""
    norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()]))
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    return {n: g * factor for n, g in grads.items()}
