"""Storage for one weight tensor's kept entries, reused from step to step.

On a CPU, arrays of a few percent of a large tensor's size are big enough for the C allocator
to map fresh pages for some and reuse freed ones for others, depending on its own history, so a
step that allocates them anew peaks at a different resident size from one run to the next (on
a 67M-parameter MLP, ZSAM's peak over the plain step moved between 0.24x and 0.48x of the
parameter bytes). Writing each step's kept indices, gradient values and the weights' original
values into the same buffers (for the tensors large enough to matter) keeps the peak where it was
the step before.

How many entries a tensor keeps is almost the same every step: the quantile's rank is fixed by
the tensor's size, and only ties move the count. So the buffers are sized once, with a little
headroom, and regrow only when a step keeps more.
"""

from __future__ import annotations

import torch


def _headroom(count: int) -> int:
    return count + count // 16 + 64


class KeptBuffers:
    """Flat indices, gradient values and original weights of one tensor's kept entries.

    ``hold`` hands out views of the first ``count`` entries; their contents last until the next
    ``hold`` (the next step's selection), which is all a step needs: it selects, climbs to
    w + e, and restores w before the next selection.
    """

    def __init__(self):
        self.indices = torch.empty(0, dtype=torch.long)
        self.values = torch.empty(0)
        self.originals = torch.empty(0)

    def hold(
        self, count: int, dtype: torch.dtype, device: torch.device, index_dtype: torch.dtype = torch.long
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views for ``count`` indices of ``index_dtype`` and gradient values of ``dtype``, regrown only when
        needed."""
        self.indices = self._fit(self.indices, count, index_dtype, device)
        self.values = self._fit(self.values, count, dtype, device)
        return self.indices[:count], self.values[:count]

    def originals_for(self, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A view for the original weights at ``count`` kept entries."""
        self.originals = self._fit(self.originals, count, dtype, device)
        return self.originals[:count]

    @staticmethod
    def _fit(buffer: torch.Tensor, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if buffer.numel() >= count and buffer.dtype == dtype and buffer.device == torch.device(device):
            return buffer
        return torch.empty(_headroom(count), dtype=dtype, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.values, self.originals))
