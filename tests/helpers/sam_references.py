"""Re-creations, for comparison only, of the two optimizers SAM users run today.

- ``DavdaSAM``: davda54/sam's SAM (first_step: e = rho g / ||g||; second_step: back to w, base step).
- ``ReleasedZSAM``: the ZSharp authors' released ``SAM.first_step`` (each weight tensor's z-score
  filtered gradient scaled to norm rho on its own; 1-D tensors, and weight tensors whose filtered
  gradient is all zero, take SAM's e), with the same second_step.

Written from the papers' and repositories' descriptions (docs/algorithm.md), plain loops, float64 in
the tests: nothing shared with zsam_hf.
"""

from __future__ import annotations

import torch


class _TwoStep(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad.norm(2) for g in self.param_groups for p in g["params"] if p.grad is not None]
        return torch.norm(torch.stack(grads), 2)

    def offset(self, p, rho, grad_norm):
        raise NotImplementedError

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(self.offset(p, group["rho"], grad_norm))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class DavdaSAM(_TwoStep):
    def offset(self, p, rho, grad_norm):
        return p.grad * (rho / (grad_norm + 1e-12))


class ReleasedZSAM(_TwoStep):
    def __init__(self, params, base_optimizer, rho=0.05, percentile=0.95, **kwargs):
        self.percentile = percentile
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def offset(self, p, rho, grad_norm):
        g = p.grad
        if g.ndim > 1:
            z = (g - g.mean()) / (g.std() + 1e-12)
            tau = torch.quantile(z.abs().flatten(), self.percentile)
            filtered = g * (z.abs() > tau)
            norm = filtered.norm()
            if norm > 0:
                return rho * filtered / (norm + 1e-12)
        return rho * g / (grad_norm + 1e-12)
