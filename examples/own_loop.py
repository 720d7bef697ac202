"""Your own loop: the ZSAM optimizer, with the first_step / second_step surface of SAM libraries.

Run: python examples/own_loop.py
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsam_hf import ZSAM


def main(steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    optimizer = ZSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, rho=0.05)  # the base optimizer's class
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.first_step(zero_grad=True)  # climb to w + e
        F.cross_entropy(model(x), y).backward()  # the gradient at w + e
        optimizer.second_step(zero_grad=True)  # back to w exactly, then AdamW's step with it
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; last ||e|| {optimizer.last_perturbation_norm:.4f}")
    return losses


if __name__ == "__main__":
    main()
