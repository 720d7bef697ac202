"""A ZSAM step that one CUDA graph captures whole: ``capturable=True`` reads nothing back to the host.

Run: python examples/captured_step.py   (on a GPU: the two-pass step is captured once and replayed; on a
CPU, which has no CUDA graphs, the same step runs eagerly)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsam_hf import ZSAM


def main(steps: int = 30) -> list[float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    model.to(device)
    optimizer = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, capturable=True)
    x = torch.randn(64, 1, 8, 8, device=device)  # a graph reads its inputs at fixed addresses:
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()  # copy each new batch into them

    def step() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.first_step(zero_grad=True)  # climb to w + e: no .item(), no nonzero
        F.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)  # back to w, then SGD's step
        return loss.detach()

    run = step
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: the optimizer's state and ZSAM's buffers are made here
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured_loss = step()

        def run() -> torch.Tensor:
            graph.replay()  # the whole step: two forwards, two backwards, the ascent, the restore, SGD
            return captured_loss.clone()

    losses = [run() for _ in range(steps)]
    losses = torch.stack(losses).tolist()  # one read at the end
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} on {device.type}")
    return losses


if __name__ == "__main__":
    main()
