"""The accelerator's selection, tested on the CPU: fixed shapes, no host synchronization, the exact kept set.

Against the independent reference (numpy.quantile in float64) where the reference's float64 arithmetic
agrees with the float32 filter, and against the CPU path (itself tested against the reference) for half
precision and for a tensor over 2^24 entries. Then: ``torch.compile(fullgraph=True)`` traces it without
a graph break, and a dispatch mode sees no data-dependent-shape op and no ``aten._local_scalar_dense``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checks import HostReads
from reference import reference_mask
from torch.utils._python_dispatch import TorchDispatchMode

from zsam_hf.perturbation import SharpnessPerturbation, SparseOffset
from zsam_hf.selection import candidate_count, kept_entries_many, kept_fixed_shape


def _mask(grad: torch.Tensor, q: float) -> np.ndarray:
    kept = kept_fixed_shape(grad, q)
    assert kept.indices.numel() == candidate_count(grad.numel(), q)  # the shape depends on n and q only
    mask = np.zeros(grad.numel(), dtype=bool)
    mask[kept.indices[kept.valid].numpy()] = True
    assert torch.equal(kept.values[~kept.valid], torch.zeros_like(kept.values[~kept.valid]))
    assert torch.equal(kept.values[kept.valid], grad.reshape(-1)[kept.indices[kept.valid]])
    return mask.reshape(grad.shape)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    straddling = torch.zeros(400, 10)
    straddling.view(-1)[:150] = 1.0  # 3.75% at one value, the rest at another: ties across the threshold
    straddling.view(-1)[150:260] = -1.0
    return {
        "normal": torch.randn(300, 200, generator=gen),
        "one entry": torch.tensor([[0.3]]),
        "two entries": torch.tensor([[0.3], [-1.2]]),
        "constant": torch.full((40, 5), 2.0),
        "zeros": torch.zeros(64, 9),
        "small integers (many ties)": torch.randint(-2, 3, (500, 90), generator=gen).float(),
        "ties straddling the threshold": straddling,
        "float64": torch.randn(70, 30, generator=gen, dtype=torch.float64),
    }


@pytest.mark.parametrize("q", [0.0, 0.5, 0.95, 0.99])
@pytest.mark.parametrize("name", list(_tensors()))
def test_the_fixed_shape_filter_keeps_exactly_the_reference_set(name, q):
    grad = _tensors()[name]
    np.testing.assert_array_equal(_mask(grad, q), reference_mask(grad, q))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_what_the_cpu_path_keeps(dtype):
    grad = torch.randn(256, 300, generator=torch.Generator().manual_seed(4)).to(dtype)
    (cpu_kept, _) = kept_entries_many([grad], 0.95)[0]
    expected = np.zeros(grad.numel(), dtype=bool)
    expected[cpu_kept.numpy()] = True
    np.testing.assert_array_equal(_mask(grad, 0.95).ravel(), expected)
    assert kept_fixed_shape(grad, 0.95).values.dtype == dtype


def test_a_tensor_over_2_to_the_24_entries():
    grad = torch.randn((1 << 24) + 3, generator=torch.Generator().manual_seed(6))
    (cpu_kept, _) = kept_entries_many([grad], 0.95)[0]
    kept = kept_fixed_shape(grad, 0.95)
    assert torch.equal(torch.sort(kept.indices[kept.valid]).values, torch.sort(cpu_kept).values)


def test_the_engine_gives_the_same_offsets_with_either_selection():
    gen = torch.Generator().manual_seed(8)
    shapes = [(120, 80), (16, 3, 3, 3), (80,), (3, 1)]
    names = [f"p{i}" for i in range(len(shapes))]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    for normalization in ("global", "tensor"):
        outputs = []
        for fixed in (False, True):
            engine = SharpnessPerturbation(variant="zsam", normalization=normalization, fixed_shape=fixed)
            offsets, fraction = engine.offsets(names, params, [g.clone() for g in grads])
            dense = []
            for p, o in zip(params, offsets):
                full = torch.zeros(p.numel())
                if isinstance(o, SparseOffset):
                    full[o.indices] = o.values
                else:
                    full = o.reshape(-1)
                dense.append(full)
            outputs.append((dense, fraction))
        (default, f1), (fixed_shape, f2) = outputs
        assert f1 == f2
        for a, b in zip(default, fixed_shape):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def _selection(grad: torch.Tensor):
    kept = kept_fixed_shape(grad, 0.95)
    return kept.indices, kept.values, kept.valid


def test_it_compiles_into_one_graph_and_gives_the_eager_answer():
    torch._dynamo.reset()
    compiled = torch.compile(_selection, fullgraph=True, backend="aot_eager")
    grad = torch.randn(200, 150, generator=torch.Generator().manual_seed(9))
    for eager, traced in zip(_selection(grad), compiled(grad)):
        assert torch.equal(eager, traced)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_no_data_dependent_shape_and_no_host_synchronization():
    grad = torch.randn(300, 40, generator=torch.Generator().manual_seed(10))
    with _Ops() as ops:
        _selection(grad)
    forbidden = {"nonzero", "masked_select", "_local_scalar_dense", "unique", "_unique2", "item", "index"}
    assert "topk" in ops.seen
    assert not ops.seen & forbidden, ops.seen & forbidden


@pytest.mark.parametrize("finite", [True, False])
def test_the_accelerator_path_reads_the_host_once_per_step_as_sam_does(monkeypatch, finite):
    """Global ZSAM through the engine's fixed-shape path (what an accelerator runs): the finiteness of the
    ascent gradient and every tensor's kept count in one transfer, no ``nonzero``; SAM's own step reads
    once too (its finiteness check). A non-finite gradient is refused from that same read."""
    gen = torch.Generator().manual_seed(12)
    shapes = [(120, 80), (16, 3, 3, 3), (80,), (3, 1)]
    names = [f"p{i}" for i in range(len(shapes))]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    if not finite:
        grads[2][5] = float("inf")
    counts = {}
    for variant in ("zsam", "sam"):
        engine = SharpnessPerturbation(variant=variant, fixed_shape=True)
        with HostReads(monkeypatch) as host:
            applied, stats = engine.perturb(names, params, [g.clone() for g in grads])
            applied.restore()
        counts[variant] = (host.reads, host.nonzero)
        assert (stats is not None) == finite
    assert counts["zsam"] == counts["sam"] == (1, 0)
