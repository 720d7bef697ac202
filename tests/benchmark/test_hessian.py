"""The Hessian sharpness figures against the exact Hessian of a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy import TinyClassifier, vector_dataset

from zsam_hf.benchmark.hessian import (
    hessian_vector_product,
    hutchinson_trace,
    model_sharpness,
    top_eigenvalue,
)


def _setup(batchnorm: bool = False):
    torch.manual_seed(0)
    model = TinyClassifier(n_in=4, hidden=5, n_out=3, batchnorm=batchnorm).double()
    data = vector_dataset(60, n_in=4, seed=2)
    batches = [{k: v[i : i + 16] for k, v in data.columns.items()} for i in range(0, 60, 16)]  # 16,16,16,12
    for b in batches:
        b["x"] = b["x"].double()
    return model, batches


def _exact_hessian(model, batches) -> torch.Tensor:
    """The Hessian of the mean loss over all 60 examples, by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    x = torch.cat([b["x"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])

    def loss(flat):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        logits = torch.func.functional_call(model, params, (x,))["logits"]
        return F.cross_entropy(logits, labels)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss, flat)


def _losses(model, batches):
    return [lambda b=b: (model(**b)["loss"], len(b["labels"])) for b in batches]


def test_hessian_vector_product_equals_the_exact_hessian_times_v():
    model, batches = _setup()
    params = list(model.parameters())
    hessian = _exact_hessian(model, batches)
    v = [torch.randn_like(p) for p in params]
    hv = torch.cat([h.reshape(-1) for h in hessian_vector_product(_losses(model, batches), params, v)])
    expected = hessian @ torch.cat([x.reshape(-1) for x in v])
    torch.testing.assert_close(hv, expected, rtol=1e-10, atol=1e-12)


def test_top_eigenvalue_within_one_percent_of_the_exact_one():
    model, batches = _setup()
    eigenvalues = torch.linalg.eigvalsh(_exact_hessian(model, batches))
    exact = eigenvalues[eigenvalues.abs().argmax()].item()
    estimate, used = top_eigenvalue(
        _losses(model, batches), list(model.parameters()), iterations=200, tolerance=1e-6
    )
    assert estimate == pytest.approx(exact, rel=1e-2)
    assert used < 200  # converged before the cap
    assert exact > 0 and exact == eigenvalues.max().item()


def test_hutchinson_trace_agrees_with_the_exact_trace_within_its_error():
    model, batches = _setup()
    exact = torch.trace(_exact_hessian(model, batches)).item()
    mean, stderr = hutchinson_trace(_losses(model, batches), list(model.parameters()), samples=400, seed=3)
    assert abs(mean - exact) < 4 * stderr
    assert stderr < 0.1 * abs(exact)  # informative, not just wide


def test_model_sharpness_uses_eval_mode_and_restores_the_mode():
    model, batches = _setup(batchnorm=True)
    model.train()
    for b in batches:  # give the running statistics something to hold
        model(**b)
    model.eval()
    exact = torch.linalg.eigvalsh(_exact_hessian(model, batches)).max().item()
    model.train()
    result = model_sharpness(model, batches, iterations=300, tolerance=1e-7, trace_samples=2)
    assert model.training
    assert result.top_eigenvalue == pytest.approx(exact, rel=1e-2)
    assert result.trace_samples == 2 and result.trace_stderr > 0
