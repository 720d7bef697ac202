"""Sharpness of a minimum as SAM papers report it: the Hessian's top eigenvalue and its trace.

Both come from Hessian-vector products by double backward (Pearlmutter's trick: H v is the
gradient of g(w) . v), so the Hessian itself is never formed:

- top eigenvalue: power iteration v <- H v / ||H v||, lambda = v . H v (the eigenvalue of
  largest magnitude; at a minimum, where negative curvature is small, the top one);
- trace: Hutchinson's estimator E[z . H z] over Rademacher z (the mean and its standard error).

The loss is a mean over a fixed set of batches, each batch's H v weighted by its share of the
examples, so the figure does not depend on the batch size. Pure torch: no HF imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# One batch's mean loss, and how many examples it holds.
BatchLoss = Callable[[], tuple[torch.Tensor, int]]


@dataclass
class Sharpness:
    top_eigenvalue: float
    power_iterations: int
    trace: float
    trace_stderr: float
    trace_samples: int


def hessian_vector_product(
    batch_losses: Sequence[BatchLoss], params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """H v for the loss averaged over every example of ``batch_losses``."""
    total = [torch.zeros_like(p) for p in params]
    counts = []
    for batch_loss in batch_losses:
        loss, n = batch_loss()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        hv = torch.autograd.grad(dot, params)
        for acc, h in zip(total, hv):
            acc.add_(h.detach(), alpha=n)
        counts.append(n)
    examples = sum(counts)
    return [acc / examples for acc in total]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def top_eigenvalue(
    batch_losses: Sequence[BatchLoss],
    params: Sequence[torch.Tensor],
    iterations: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> tuple[float, int]:
    """The Hessian's eigenvalue of largest magnitude by power iteration; (eigenvalue, iterations run).

    Stops when two successive estimates agree to ``tolerance`` (relative) or after ``iterations``.
    """
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eigenvalue = 0.0
    for i in range(1, iterations + 1):
        hv = hessian_vector_product(batch_losses, params, v)
        estimate = _dot(v, hv)
        norm = math.sqrt(_dot(hv, hv))
        if norm == 0:
            return 0.0, i
        v = [x / norm for x in hv]
        if i > 1 and abs(estimate - eigenvalue) <= tolerance * abs(estimate):
            return estimate, i
        eigenvalue = estimate
    return eigenvalue, iterations


def hutchinson_trace(
    batch_losses: Sequence[BatchLoss], params: Sequence[torch.Tensor], samples: int = 10, seed: int = 0
) -> tuple[float, float]:
    """tr(H) by Hutchinson's estimator with Rademacher vectors; (mean, standard error of the mean)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        z = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
        values.append(_dot(z, hessian_vector_product(batch_losses, params, z)))
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((x - mean) ** 2 for x in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def model_sharpness(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    iterations: int = 20,
    tolerance: float = 1e-3,
    trace_samples: int = 10,
    seed: int = 0,
) -> Sharpness:
    """Top eigenvalue and trace of the Hessian of ``model``'s loss over ``batches`` (its trainable weights).

    The model is put in eval mode (running BatchNorm statistics, no dropout) so that the loss is a
    fixed function of the weights; its mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def batch_loss(batch: dict[str, torch.Tensor]) -> BatchLoss:
        return lambda: (model(**batch)["loss"], len(batch["labels"]))  # a dict or a ModelOutput

    losses = [batch_loss(b) for b in batches]
    try:
        eigenvalue, used = top_eigenvalue(losses, params, iterations, tolerance, seed)
        trace, stderr = hutchinson_trace(losses, params, trace_samples, seed + 1)
    finally:
        model.train(was_training)
    return Sharpness(eigenvalue, used, trace, stderr, trace_samples)
