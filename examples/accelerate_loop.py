"""An accelerate loop with gradient accumulation: each micro-batch takes its own ascent.

Run: python examples/accelerate_loop.py      (or: accelerate launch examples/accelerate_loop.py)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

from zsam_hf import ZSAM


def main(epochs: int = 3) -> float:
    accelerator = Accelerator(gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16, shuffle=True)
    zsam = ZSAM(model.parameters(), torch.optim.AdamW, lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, zsam, loader)
    for _ in range(epochs):
        for inputs, labels in loader:
            with accelerator.accumulate(model):
                with zsam.ascent(), accelerator.no_sync(model):  # this micro-batch's ascent gradient alone
                    accelerator.backward(F.cross_entropy(model(inputs), labels))
                accelerator.backward(F.cross_entropy(model(inputs), labels))  # at w + e: accumulates
                zsam.restore()  # back to w before the next micro-batch
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()  # the base step, on sync steps only
                optimizer.zero_grad()
    with torch.no_grad():
        accuracy = (model(x.to(accelerator.device)).argmax(-1).cpu() == y).float().mean().item()
    accelerator.print(f"training accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
