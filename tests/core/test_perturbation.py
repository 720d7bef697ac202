"""The perturbation math against the plain reference of docs/algorithm.md."""

import numpy as np
import pytest
import torch
from reference import as_f64, reference_mask, reference_offsets
from torch.overrides import TorchFunctionMode

from zsam_hf.perturbation import SharpnessPerturbation, SparseOffset
from zsam_hf.selection import cpu, interpolated_quantile, kernel, zscore_mask

QUANTILES = [0.0, 0.3, 0.5, 0.9, 0.95, 0.99]


def dense(offset, like: torch.Tensor) -> np.ndarray:
    if isinstance(offset, SparseOffset):
        out = np.zeros(like.numel())
        out[offset.indices.numpy()] = as_f64(offset.values)
        return out.reshape(like.shape)
    return as_f64(offset)


def named_tensors(seed: int = 0):
    """A model-shaped mix: conv and linear weights, biases, norm scales, odd corner cases."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "conv.weight": (8, 3, 3, 3),
        "conv.bias": (8,),
        "bn.weight": (8,),
        "bn.bias": (8,),
        "big.weight": (300, 240),  # large enough for the bracketed selection (> SMALL_TENSOR)
        "fc.weight": (10, 16),
        "fc.bias": (10,),
        "cls_token": (1, 1, 16),
        "single.weight": (1, 1),  # numel 1: empty mask, SAM fallback
        "constant.weight": (4, 5),  # sigma == 0: empty mask, SAM fallback
        "zero.weight": (3, 3),
    }
    names = list(shapes)
    params = [torch.randn(s, generator=gen) for s in shapes.values()]
    grads = [torch.randn(s, generator=gen) * (0.1 + i) for i, s in enumerate(shapes.values())]
    grads[names.index("constant.weight")] = torch.full((4, 5), 0.3)
    grads[names.index("zero.weight")] = torch.zeros(3, 3)
    return names, params, grads


CASES = [("sam", "global"), ("asam", "global"), ("fsam", "global"), ("zsam", "global"), ("zsam", "tensor")]


@pytest.mark.parametrize("variant,normalization", CASES)
@pytest.mark.parametrize("quantile", [0.5, 0.95])
def test_offsets_match_reference(variant, normalization, quantile):
    rho = 0.5 if variant == "asam" else 0.05
    perturbation = SharpnessPerturbation(
        variant=variant, rho=rho, quantile=quantile, normalization=normalization
    )
    ema_ref: dict = {}
    for step in range(3):  # several steps: FSAM's EMA must evolve like the reference's
        names, params, grads = named_tensors(seed=step)
        ours, _ = perturbation.offsets(names, params, [g.clone() for g in grads])
        expected = reference_offsets(
            variant, names, params, grads, rho, quantile=quantile, normalization=normalization, ema=ema_ref
        )
        for name, p, o, e in zip(names, params, ours, expected):
            np.testing.assert_allclose(
                dense(o, p), e, rtol=2e-5, atol=1e-9, err_msg=f"{variant} {name} step {step}"
            )


def test_global_zsam_has_norm_rho_and_tensor_zsam_has_rho_per_tensor():
    names, params, grads = named_tensors()
    keep = [i for i, n in enumerate(names) if n not in ("single.weight", "constant.weight", "zero.weight")]
    names, params, grads = [names[i] for i in keep], [params[i] for i in keep], [grads[i] for i in keep]
    glob, _ = SharpnessPerturbation(variant="zsam", rho=0.05).offsets(
        names, params, [g.clone() for g in grads]
    )
    assert np.sqrt(sum((dense(o, p) ** 2).sum() for o, p in zip(glob, params))) == pytest.approx(
        0.05, rel=1e-5
    )
    per, _ = SharpnessPerturbation(variant="zsam", rho=0.05, normalization="tensor").offsets(
        names, params, grads
    )
    for o, p in zip(per, params):
        if p.ndim > 1:
            assert np.linalg.norm(dense(o, p)) == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize("normalization", ["global", "tensor"])
@pytest.mark.parametrize("with_fallback", [False, True])
def test_zsam_reports_the_norm_of_e_and_skips_its_pass_only_where_one_factor_scales_every_offset(
    normalization, with_fallback, monkeypatch
):
    """The logged ||e|| is the reference's, whichever way it was found; under global normalization with no
    tensor on SAM's fallback it comes from ||g~|| (no pass over e), else from a pass over the offsets."""
    import zsam_hf.perturbation as perturbation_module

    names, params, grads = named_tensors()
    if not with_fallback:  # drop the tensors whose masks are empty (SAM's e_p for those)
        keep = [
            i for i, n in enumerate(names) if n not in ("single.weight", "constant.weight", "zero.weight")
        ]
        names, params, grads = [names[i] for i in keep], [params[i] for i in keep], [grads[i] for i in keep]
    passes = []
    measured = perturbation_module.offsets_norm
    monkeypatch.setattr(perturbation_module, "offsets_norm", lambda *a: passes.append(1) or measured(*a))
    original = [p.clone() for p in params]
    engine = SharpnessPerturbation(variant="zsam", rho=0.05, normalization=normalization)
    applied, stats = engine.perturb(names, params, [g.clone() for g in grads])
    expected = reference_offsets("zsam", names, original, grads, 0.05, normalization=normalization)
    assert stats.norm.item() == pytest.approx(np.sqrt(sum((e**2).sum() for e in expected)), rel=1e-5)
    assert len(passes) == (0 if normalization == "global" and not with_fallback else 1)
    applied.restore()


@pytest.mark.parametrize("variant", ["sam", "asam", "fsam", "zsam"])
def test_apply_then_restore_is_bit_exact_and_applies_e(variant):
    names, params, grads = named_tensors()
    original = [p.clone() for p in params]
    perturbation = SharpnessPerturbation(variant=variant, rho=0.05)
    applied, stats = perturbation.perturb(names, params, [g.clone() for g in grads])
    expected = reference_offsets(variant, names, original, grads, 0.05, ema={})
    for p, w, e in zip(params, original, expected):
        np.testing.assert_allclose(as_f64(p), as_f64(w) + e, rtol=1e-6, atol=1e-7)
    assert stats.norm.item() == pytest.approx(np.sqrt(sum((e**2).sum() for e in expected)), rel=1e-5)
    applied.restore()
    for p, w in zip(params, original):
        assert torch.equal(p, w)


@pytest.mark.parametrize("normalization", ["global", "tensor"])
def test_zsam_steps_reuse_their_buffers_and_stay_exact(normalization):
    """Step after step, the kept entries and the originals live in the same storage (a steady CPU
    peak), and every step's w + e equals the reference and restores bit for bit."""
    perturbation = SharpnessPerturbation(variant="zsam", rho=0.05, normalization=normalization)
    storage = None
    for step in range(4):
        names, params, grads = named_tensors(seed=step)
        original = [p.clone() for p in params]
        expected = reference_offsets("zsam", names, original, grads, 0.05, normalization=normalization)
        applied, _ = perturbation.perturb(names, params, [g.clone() for g in grads])
        for p, w, e in zip(params, original, expected):
            np.testing.assert_allclose(as_f64(p), as_f64(w) + e, rtol=1e-6, atol=1e-7)
        target = params[names.index("big.weight")]
        big = next(saved for p, saved in zip(applied.params, applied.saved) if p is target)
        assert isinstance(big, SparseOffset)
        held = (big.indices.untyped_storage().data_ptr(), big.values.untyped_storage().data_ptr())
        assert storage in (None, held), f"step {step}: the kept entries moved to new storage"
        storage = held
        applied.restore()
        assert all(torch.equal(p, w) for p, w in zip(params, original))


@pytest.mark.parametrize("variant", ["sam", "asam", "fsam"])
def test_dense_variants_move_parameters_to_a_buffer_and_back(variant):
    """A parameter owning its storage points at a buffer holding w + e between the passes and then
    back at its own storage, never written; a view into a shared flat buffer is copied instead."""
    names, tensors, grads = named_tensors()
    flat = torch.cat([t.reshape(-1) for t in tensors])
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    params[0] = torch.nn.Parameter(flat[: tensors[0].numel()].view(tensors[0].shape))  # a view: not moved
    original = [p.detach().clone() for p in params]
    pointers = [p.data_ptr() for p in params]
    perturbation = SharpnessPerturbation(variant=variant, rho=0.5 if variant == "asam" else 0.05)
    expected = reference_offsets(variant, names, original, grads, perturbation.rho, ema={})
    for step in range(2):
        applied, _ = perturbation.perturb(names, params, [g.clone() for g in grads])
        assert params[0].data_ptr() == pointers[0]
        assert all(p.data_ptr() != ptr for p, ptr in zip(params[1:], pointers[1:]))
        if step == 0:
            for p, w, e in zip(params, original, expected):
                np.testing.assert_allclose(as_f64(p.detach()), as_f64(w) + e, rtol=1e-6, atol=1e-7)
        applied.restore()
        assert [p.data_ptr() for p in params] == pointers
        assert all(torch.equal(p, w) for p, w in zip(params, original))


def test_both_ways_of_writing_moved_weights_agree():
    """The accelerator's foreach write (run here on the CPU) gives the CPU's per-tensor write, bit for bit."""
    from zsam_hf.perturbation import _move_to_buffers

    _, tensors, grads = named_tensors()
    results = []
    for per_tensor in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in tensors]
        own = [p.data for p in params]
        with torch.no_grad():  # as apply_offsets calls it
            moved = _move_to_buffers(
                params, [g * 0.01 for g in grads], [torch.empty_like(t) for t in tensors], per_tensor
            )
        assert [o.data_ptr() for _, o in moved] == [o.data_ptr() for o in own]
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert all(torch.equal(a, t + g * 0.01) for a, t, g in zip(results[0], tensors, grads))


def test_public_offsets_do_not_share_storage_between_calls():
    names, params, grads = named_tensors()
    perturbation = SharpnessPerturbation(variant="zsam")
    first, _ = perturbation.offsets(names, params, [g.clone() for g in grads])
    kept = first[names.index("big.weight")].values.clone()
    perturbation.offsets(names, params, [g.clone() * 3 for g in grads])
    assert torch.equal(first[names.index("big.weight")].values, kept)


def test_zsam_keeps_far_less_than_a_weight_copy():
    """Between the passes zsam stores only the perturbed entries: each kept entry's original weight and its
    flat index, 32-bit for a large tensor (the CPU selection's), 64-bit for a small one; a bias (unfiltered)
    is moved whole. About 0.1x the parameter bytes here, SAM 1x."""
    gen = torch.Generator().manual_seed(0)
    shapes = [
        (64, 3, 3, 3),
        (64, 64, 3, 3),
        (128, 64, 3, 3),
        (256, 128, 3, 3),
        (512, 256, 3, 3),
        (10, 512),
        (64,),
    ]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    names = [f"p{i}.weight" for i in range(len(shapes))]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    zsam, _ = SharpnessPerturbation(variant="zsam").perturb(names, params, grads)
    sam, _ = SharpnessPerturbation(variant="sam").perturb(names, [p.clone() for p in params], grads)
    expected = 0
    for p, g in zip(params, grads):
        if g.ndim <= 1:
            expected += p.numel() * 4
        else:
            index_bytes = 4 if g.numel() > cpu.SMALL_TENSOR else 8
            expected += int(reference_mask(g, 0.95).sum()) * (index_bytes + 4)
    assert zsam.extra_bytes() == expected <= 0.11 * param_bytes
    assert sam.extra_bytes() == param_bytes


@pytest.mark.parametrize(
    "where,value",
    [
        ("big.weight", float("inf")),
        ("big.weight", float("nan")),
        ("fc.weight", float("-inf")),
        ("bn.bias", float("nan")),
    ],
)
def test_non_finite_gradient_means_no_perturbation(where, value):
    names, params, grads = named_tensors()
    original = [p.clone() for p in params]
    grads[names.index(where)].view(-1)[3] = value
    for variant in ("sam", "zsam", "asam", "fsam"):
        applied, stats = SharpnessPerturbation(variant=variant).perturb(names, params, grads)
        assert stats is None and applied.perturbed() == []
        assert all(torch.equal(p, w) for p, w in zip(params, original))


def test_parameters_without_gradient_are_not_touched():
    names, params, grads = named_tensors()
    original = [p.clone() for p in params]
    grads = [None if i % 2 else g for i, g in enumerate(grads)]
    applied, _ = SharpnessPerturbation(variant="zsam").perturb(names, params, grads)
    for i, (p, w) in enumerate(zip(params, original)):
        if i % 2:
            assert torch.equal(p, w)
    assert all(any(p is q for q in applied.perturbed()) for i, p in enumerate(params) if i % 2 == 0)
    applied.restore()
    nothing, stats = SharpnessPerturbation(variant="zsam").perturb(names, params, [None] * len(params))
    assert stats is None and nothing.perturbed() == []


# ---- the z-score mask (criterion 2) ------------------------------------------------
def _check_mask(grad: torch.Tensor, q: float):
    ours = zscore_mask(grad, q)
    assert ours.dtype == torch.bool and ours.shape == grad.shape
    np.testing.assert_array_equal(ours.numpy(), reference_mask(grad, q), err_msg=f"n={grad.numel()} q={q}")


@pytest.mark.parametrize("n", [2, 3, 7, 100, 5000, 40_000, 300_000])
@pytest.mark.parametrize("q", QUANTILES)
def test_mask_matches_quantile_definition_on_random_tensors(n, q):
    _check_mask(torch.randn(n, 2, generator=torch.Generator().manual_seed(n)), q)


@pytest.mark.parametrize("n", [50, 40_000, 300_000])
@pytest.mark.parametrize("q", QUANTILES)
def test_mask_with_heavy_ties(n, q):
    gen = torch.Generator().manual_seed(n)
    _check_mask(torch.randint(-3, 4, (n, 2), generator=gen).float(), q)  # few distinct values
    sparse = torch.zeros(n, 9)
    sparse[:, 4] = torch.randn(n, generator=gen)  # 8 of 9 kernel taps exactly zero
    _check_mask(sparse, q)


@pytest.mark.parametrize("q", QUANTILES)
def test_mask_of_constant_and_single_entry_tensors_is_empty(q):
    for grad in (
        torch.full((30, 4), 2.5),
        torch.full((200, 200), -1e-3),
        torch.tensor([[0.7]]),
        torch.zeros(5, 5),
    ):
        assert not zscore_mask(grad, q).any()
        _check_mask(grad, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1000, 100_000])
@pytest.mark.parametrize("q", [0.5, 0.95])
def test_mask_of_half_precision_gradients(dtype, n, q):
    _check_mask(torch.randn(n, 3, generator=torch.Generator().manual_seed(1)).to(dtype), q)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kept_bound_keeps_what_torch_lerps_threshold_keeps(dtype):
    """Between two adjacent order statistics a <= b (no deviation between them), the CPU filter's bound keeps
    exactly the deviations that ``torch.lerp(a, b, frac)`` (``torch.quantile``'s threshold) keeps, a and b
    included: pairs far apart, a few units in the last place apart, equal, subnormal and zero, with weights
    0, tiny, a half, near 1; torch's own value is used where the rounding could decide."""
    rng = np.random.default_rng(17)
    tiny = float(np.finfo(dtype).smallest_subnormal)
    lowers = [0.0, tiny, 3 * tiny, 1e-30, 0.25, 1.0, 3.7e5, *rng.uniform(0, 4, size=40).tolist()]
    fracs = [0.0, 1e-9, 1e-4, 0.03, 0.25, 0.4999, 0.5, 0.73, 0.9999, 1 - 1e-9, *rng.random(20).tolist()]
    used_torch = 0
    for lower in lowers:
        a = dtype(lower)
        uppers = {a, np.nextafter(a, dtype(np.inf))}
        for ulps in (2, 5, 17, 40, 1000):
            uppers.add(dtype(a + ulps * np.spacing(a if a > 0 else dtype(tiny))))
        uppers.update({dtype(a * 1.5 + 1e-3), dtype(a + 1)})
        for b in sorted(uppers):
            pair = np.array([a, b], dtype=dtype)
            for frac in fracs:
                t = torch.lerp(torch.tensor(a), torch.tensor(b), frac).item()
                bound = cpu._kept_bound(pair, frac)
                assert (float(a) > bound, float(b) > bound) == (float(a) > t, float(b) > t), (a, b, frac, t)
                used_torch += bound == t and bound != float(a)
    assert used_torch > 0  # the near cases did take torch's value


@pytest.mark.parametrize("n", [1, 2, 10, 1000, 70_000])
@pytest.mark.parametrize("q", QUANTILES)
def test_interpolated_quantile_matches_numpy(n, q):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n))
    assert interpolated_quantile(x, q).item() == pytest.approx(np.quantile(as_f64(x), q), rel=1e-6)


class _SelectionSpy(TorchFunctionMode):
    """Records the input size of every sort-like or selection call."""

    WATCHED = {"sort", "argsort", "msort", "quantile", "nanquantile", "kthvalue", "topk"}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.WATCHED and args and isinstance(args[0], torch.Tensor):
            self.calls.append((name, args[0].numel()))
        return func(*args, **(kwargs or {}))


def test_mask_of_a_30m_entry_tensor_uses_linear_selection(monkeypatch):
    n = 30_000_000  # torch.quantile refuses > 2**24 entries
    grad = torch.randn(n, generator=torch.Generator().manual_seed(3)).view(6000, 5000)
    partitioned: list[int] = []
    real_partition = np.partition

    def recording_partition(a, kth, *args, **kwargs):
        partitioned.append(np.size(a))
        return real_partition(a, kth, *args, **kwargs)

    monkeypatch.setattr(np, "partition", recording_partition)
    with _SelectionSpy() as spy:
        ours = zscore_mask(grad, 0.95)
    sorted_sizes = [size for name, size in spy.calls if name in ("sort", "argsort", "msort", "quantile")]
    assert max(sorted_sizes, default=0) <= n // 100, spy.calls  # only a small sample is ever sorted
    assert all(size <= n // 10 for name, size in spy.calls), spy.calls  # selections see a thin bracket
    # NumPy selections (the compiled loops select without them): the sample, and the candidates (the kept
    # 5% plus a thin bracket), never all n
    assert max(partitioned, default=0) <= 0.06 * n, partitioned
    assert partitioned or kernel.library() is not None
    np.testing.assert_array_equal(ours.numpy(), reference_mask(grad, 0.95))
    assert ours.sum().item() == pytest.approx(0.05 * n, rel=1e-3)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.95, 0.99])
def test_accelerator_path_with_one_sync_gives_the_same_masks(q):
    """The GPU path (fixed-shape topk per tensor, one synchronization) against the reference, on the CPU."""
    from zsam_hf.selection import accelerator, order_statistics

    gen = torch.Generator().manual_seed(5)
    grads = [
        torch.randn(300, 200, generator=gen),
        torch.tensor([[0.3]]),
        torch.full((40, 5), 2.0),
        torch.randint(-2, 3, (500, 90), generator=gen).float(),
        torch.randn(64, 3, 3, 3, generator=gen).half(),
    ]
    means = [order_statistics.gradient_mean(g) for g in grads]
    for grad, (kept, values) in zip(grads, accelerator.kept_with_one_sync(grads, q, means)):
        mask = np.zeros(grad.numel(), dtype=bool)
        mask[kept.numpy()] = True
        np.testing.assert_array_equal(mask.reshape(grad.shape), reference_mask(grad, q))
        assert torch.equal(values, grad.reshape(-1)[kept])


@pytest.mark.parametrize("n", [1, 2, 10, 1000, 70_000])
def test_torch_only_order_statistics_match_numpy(n, monkeypatch):
    """The accelerator's selection (a sort, or kthvalue and two reductions), run here on the CPU."""
    from zsam_hf.selection import order_statistics

    monkeypatch.setattr(order_statistics, "SORT_SIZE_LIMIT", 100)  # 1000 and 70_000 take kthvalue
    x = torch.randint(0, n // 3 + 2, (n,), generator=torch.Generator().manual_seed(n)).float()  # ties
    ordered = np.sort(x.numpy())
    for rank in sorted({0, n // 2, n - 2, n - 1} - {-1}):
        lower, upper = order_statistics.adjacent_by_kthvalue(x, rank)
        assert (lower.item(), upper.item()) == (ordered[rank], ordered[min(rank + 1, n - 1)])


@pytest.mark.parametrize("n", [1, 2, 10, 4096, 4097, 70_000, 300_001])
@pytest.mark.parametrize("ties", ["none", "half at one value", "few values"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_order_statistics_match_a_sort(n, ties, dtype, monkeypatch):
    """NumPy's partition (integer keys for non-negative values) or a sort, against a full sort."""
    from zsam_hf.selection import order_statistics

    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 1e-3).astype(dtype)
    if ties == "half at one value":
        x[rng.random(n) < 0.5] = dtype(2e-4)
    elif ties == "few values":
        x = rng.integers(-3, 4, n).astype(dtype)
    x[: min(n, 3)] = [0.0, np.finfo(dtype).smallest_subnormal, -0.0][: min(n, 3)]
    sorts: list[int] = []
    real_sort = np.sort
    monkeypatch.setattr(
        np, "sort", lambda a, *args, **kw: sorts.append(np.size(a)) or real_sort(a, *args, **kw)
    )
    for values, nonnegative in [(x, False), (np.abs(x), True)]:
        ordered = real_sort(values)
        for rank in sorted({0, n // 2, int(0.95 * (n - 1)), n - 2, n - 1} - {-1}):
            sorts.clear()
            lower, upper = order_statistics.adjacent_in_array(values, rank, nonnegative)
            assert (lower, upper) == (ordered[rank], ordered[min(rank + 1, n - 1)])
            assert lower.dtype == upper.dtype == values.dtype
            tied = n > order_statistics.SORT_ON_CPU and ties != "none"
            if n > order_statistics.SORT_ON_CPU:  # the probe is sorted; the whole array only when tied
                assert (max(sorts) == n) == tied, (sorts, ties)
            for hint in (True, False):  # a caller's hint picks the method, never the answer
                assert order_statistics.adjacent_in_array(values, rank, nonnegative, tied=hint) == (
                    lower,
                    upper,
                )


@pytest.mark.parametrize("kind", ["distinct", "few values", "mostly zero", "tied above the quantile"])
@pytest.mark.parametrize("m", [5, 600, 17_000])
def test_sample_bracket_matches_a_sorted_sample(kind, m):
    """``_bracket`` (one partition at both ranks, a sort of the part above) gives what a sorted sample gives:
    its two order statistics and whether the part from the lower one up is heavily tied. The compiled loops
    (``kernel.sample_bracket``; here with stride 1 and centre 0, so the sample is the array itself) find the
    same order statistics, or give way (None) where ties leave them too many entries."""
    import math

    from zsam_hf.selection.order_statistics import heavily_tied

    rng = np.random.default_rng(m)
    sample = np.abs(rng.standard_normal(m)).astype(np.float32)
    if kind == "few values":
        sample = rng.integers(0, 4, m).astype(np.float32)
    elif kind == "mostly zero":
        sample[rng.random(m) < 0.97] = 0.0
    elif kind == "tied above the quantile":
        sample[sample > np.quantile(sample, 0.9)] = 7.0
    q = 0.95
    ordered = np.sort(sample)
    margin = int(cpu.BRACKET_SIGMAS * math.sqrt(m * q * (1 - q))) + 2
    first = max(0, math.floor(q * (m - 1)) - margin)
    last = min(m - 1, math.ceil(q * (m - 1)) + margin)
    expected = (ordered[first], ordered[last], heavily_tied(ordered[first:]))
    assert cpu._bracket(sample.copy(), q) == expected
    if kernel.library() is not None and m > 1:
        copied = np.full(m, np.nan, dtype=np.float32)
        found = kernel.sample_bracket(sample, 0, 1, 0.0, first, last, copied, np.empty(m, dtype=np.float32))
        assert copied.tobytes() == sample.tobytes()
        assert found is None or found.tolist() == [ordered[first], ordered[last]]
        assert found is not None or kind in ("few values", "mostly zero", "tied above the quantile")
        if kind == "distinct":
            assert found is not None


@pytest.mark.parametrize("where", ["inside", "misses low", "misses high", "mostly tied"])
@pytest.mark.parametrize("rank_share", [0.0, 0.5, 0.95, 1.0])
def test_bracketed_partition_matches_a_sort_and_falls_back_when_the_sample_misleads(
    where, rank_share, monkeypatch
):
    """``_pair_in_bracket`` partitions only the entries inside its sampled bracket when both ranks lie
    there; a sample that misleads (its strided positions planted far above or below the rest) or a
    bracket holding most of the array makes it partition the whole array. The answer is a sort's."""
    from zsam_hf.selection import order_statistics

    n = 50_000
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 1 << 30, n, dtype=np.int32)
    stride = order_statistics.coprime_stride(n // int(n ** (2 / 3)))
    if where == "misses low":  # the sample sits under everything: its bracket lies below the ranks
        keys[stride // 2 :: stride] = rng.integers(0, 100, keys[stride // 2 :: stride].size)
    elif where == "misses high":
        keys[stride // 2 :: stride] = (1 << 31) - 1 - rng.integers(0, 100, keys[stride // 2 :: stride].size)
    elif where == "mostly tied":
        keys[rng.random(n) < 0.9] = 12345
    rank = min(n - 2, int(rank_share * (n - 1)))
    partitioned: list[int] = []
    real = order_statistics._partitioned_pair
    monkeypatch.setattr(
        order_statistics, "_partitioned_pair", lambda k, r, u: partitioned.append(k.size) or real(k, r, u)
    )
    ordered = np.sort(keys)
    assert order_statistics._pair_in_bracket(keys, rank, rank + 1) == (ordered[rank], ordered[rank + 1])
    whole = partitioned[-1] == n
    sample_size = partitioned[0]
    assert sample_size < n // 20  # the first partition is the sample's
    if where == "inside":
        assert not whole and partitioned[-1] < n // 10
    elif where == "mostly tied" and rank_share == 0.5:
        assert whole  # the bracket holds the run of ties (the lowest 90%): most of the array
    elif where in ("misses low", "misses high") and 0.0 < rank_share < 1.0:
        assert whole, partitioned


@pytest.mark.parametrize("n,q", [(1000, 0.95), (40_000, 0.9), (300_001, 0.99), (77, 0.5)])
def test_mask_against_torch_quantile_itself(n, q):
    """The literal definition: torch.quantile (linear interpolation) on |z| in float64, strict >."""
    grad = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3 + 1
    g = grad.double()
    z = ((g - g.mean()) / (g.std() + 1e-12)).abs()
    np.testing.assert_array_equal(zscore_mask(grad, q).numpy(), (z > torch.quantile(z, q)).numpy())


@pytest.mark.parametrize("size", [0, 1, 9, 1000, 262_147])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.5, 1.0])
def test_positions_above_match_numpy(size, density):
    """Positions above a bound (or at it, inclusive), through a reused buffer holding stale bytes, against
    a comparison of the values."""
    gen = torch.Generator().manual_seed(size)
    values = torch.rand(size, generator=gen)
    values[: size // 3] = 0.5  # a run of ties at the bound
    bound = 1.0 - density
    for inclusive in (False, True):
        expected = np.flatnonzero(values.numpy() >= bound if inclusive else values.numpy() > bound)
        for buffer in (None, np.ones(2 * size + 64, dtype=bool)):  # a reused buffer holds stale bytes
            got = cpu.positions_above(values, bound, inclusive=inclusive, buffer=buffer)
            np.testing.assert_array_equal(got.numpy(), expected)


def _ulp_walk(start, dtype, steps: int = 64) -> np.ndarray:
    """``steps`` consecutive floating point numbers of ``dtype`` either side of ``start``."""
    out = [dtype(start)]
    for direction in (np.inf, -np.inf):
        value = dtype(start)
        for _ in range(steps):
            value = np.nextafter(value, dtype(direction))
            out.append(value)
    return np.array(out, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "mean,low",
    [
        (0.0, 1.0),
        (1e3, 1e-3),
        (-1e3, 1e-3),
        (1e-3, 1e3),
        (0.5, 0.0),
        (1e-40, 1e-42),
        (3e38, 3e38),
        (-3e38, 3e38),
    ],
)
def test_outside_bounds_hold_every_entry_at_or_beyond_the_bound(dtype, mean, low):
    """g <= lower or g >= upper whenever |g - mean| >= low as the dtype computes it; and only a few more."""
    with np.errstate(over="ignore", under="ignore"):
        mean, low = dtype(mean), dtype(low)
        lower, upper = cpu._outside_bounds(float(mean), float(low), np.dtype(dtype))
        edges = [float(mean) + float(low), float(mean) - float(low)]
        g = np.concatenate([_ulp_walk(edge, dtype) for edge in edges])
        g = g[np.isfinite(g)]
        reached = np.abs(g - mean) >= low
    outside = (g <= lower) | (g >= upper)
    assert outside[reached].all(), g[reached & ~outside]
    assert np.count_nonzero(outside & ~reached) <= 40  # the slack is a few rounding errors wide


def _hard_gradients():
    """Tensors where comparing g with the outside bounds lets in many extra candidates, or ties decide."""
    gen = torch.Generator().manual_seed(7)
    n = 200_000
    noise = torch.randn(n, generator=gen)
    zero_taps = torch.zeros(n // 9 + 1, 9)
    zero_taps[:, 4] = torch.randn(n // 9 + 1, generator=gen)
    return {
        "large mean, tiny spread": 1e3 + noise * 1e-3,  # |g - mean| quantized to a few ulps of 1e3
        "subnormal": noise * 1e-39,
        "float64": noise.double() * 3 - 1,
        "few values": torch.randint(-2, 3, (n,), generator=gen).float(),
        "8 of 9 taps zero": zero_taps.reshape(-1),
        "heavy tails": noise / (torch.rand(n, generator=gen) + 1e-3),
    }


@pytest.mark.parametrize("name", list(_hard_gradients()))
@pytest.mark.parametrize("q", [0.0, 0.5, 0.95, 0.99])
def test_bracketed_selection_equals_a_full_selection(name, q):
    """The sampled bound and one collecting pass keep exactly what a full selection keeps."""
    from zsam_hf.selection import gradient_mean

    flat = _hard_gradients()[name]
    assert flat.numel() > cpu.SMALL_TENSOR
    mean = gradient_mean(flat)
    indices, values = cpu._kept_bracketed(flat, mean, q, cpu._Workspace())
    want_indices, want_values = cpu._kept_exact(flat, mean, q)
    np.testing.assert_array_equal(indices.numpy(), want_indices.numpy())
    np.testing.assert_array_equal(values.numpy(), want_values.numpy())
    np.testing.assert_array_equal(values.numpy(), flat.numpy()[indices.numpy()])
    if name not in ("large mean, tiny spread", "subnormal"):  # where float64 rounds as the dtype does
        expected = np.flatnonzero(reference_mask(flat, q))
        np.testing.assert_array_equal(indices.numpy(), expected)


@pytest.mark.parametrize("case", ["zeros", "constant", "one outlier", "two values"])
def test_large_constant_or_nearly_constant_gradients_keep_what_the_reference_keeps(case):
    """Above SMALL_TENSOR entries the CPU path samples a bracket; a tied bracket over a constant tensor
    returns at once (nothing is above the quantile), anything else still selects exactly."""
    from reference import reference_mask

    from zsam_hf.selection import kept_indices

    grad = torch.zeros(300, 400) if case == "zeros" else torch.full((300, 400), 0.25)
    if case == "one outlier":
        grad[7, 11] = 3.0
    if case == "two values":
        grad.view(-1)[::2] = -0.25
    kept = kept_indices(grad, 0.95)
    expected = np.flatnonzero(reference_mask(grad, 0.95).ravel())
    assert np.array_equal(np.sort(kept.numpy()), expected)


@pytest.mark.parametrize("name", ["float64", "heavy tails", "few values"])
@pytest.mark.parametrize("upper", ["just above low", "at the sample's", "beyond every entry"])
def test_the_band_under_the_samples_upper_bound_selects_what_all_candidates_select(monkeypatch, name, upper):
    """The quantile's order statistics are selected among the candidates under the sample's upper
    bound when both lie there; an upper bound that falls short of them (a sample that misled) or
    that lies above every entry still gives the full selection's kept set."""
    from zsam_hf.selection import gradient_mean

    sampled_bracket = cpu._sampled_bracket

    def moved_upper(flat, mean, q, work):
        sample, (low, high, tied) = sampled_bracket(flat, mean, q, work)
        if upper == "just above low":
            high = np.nextafter(low, sample.dtype.type(np.inf))
        elif upper == "beyond every entry":
            high = sample.dtype.type(np.inf)
        return sample, (low, high, tied)

    monkeypatch.setattr(cpu, "_sampled_bracket", moved_upper)
    flat = _hard_gradients()[name]
    mean = gradient_mean(flat)
    indices, values = cpu._kept_bracketed(flat, mean, 0.95, cpu._Workspace())
    want_indices, want_values = cpu._kept_exact(flat, mean, 0.95)
    np.testing.assert_array_equal(indices.numpy(), want_indices.numpy())
    np.testing.assert_array_equal(values.numpy(), want_values.numpy())


def test_the_band_is_used_only_when_it_holds_both_order_statistics():
    """``_near_the_quantile`` narrows to the band exactly when ranks r and r + 1 fall inside it."""
    d = np.random.default_rng(0).permutation(np.arange(100, dtype=np.float32))
    mask = cpu._mask_buffer(d.size)
    near = cpu._near_the_quantile(d, 10, np.float32(12.5), mask)  # 0..12 in the band
    assert near.size == 13 and sorted(near)[10:12] == [10, 11]
    whole = cpu._near_the_quantile(d, 10, np.float32(11.0), mask)  # rank 11 (value 11) is not under 11
    assert whole is d


@pytest.mark.parametrize("index_dtype", [torch.long, torch.int32])
@pytest.mark.parametrize("loops", ["compiled", "NumPy and torch"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_scattered_reads_and_writes_match_torch_and_bump_the_autograd_version(
    dtype, threads, loops, index_dtype, monkeypatch
):
    """``gather_entries``/``scatter_entries``/``climb_entries`` (the compiled loops for float32 and float64;
    else NumPy at one thread, torch's gather and index_copy_ at more) equal ``take``/``index_put_``, and a
    write bumps the parameter's version as an in-place torch op does (autograd's stale-tensor check). With
    int64 indices and with the int32 ones the CPU selection keeps, which every path takes."""
    from zsam_hf.perturbation import climb_entries, gather_entries, scatter_entries

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # which path, not how many threads run
    if loops != "compiled":
        monkeypatch.setenv("ZSAM_HF_KERNEL", "0")
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(64, 33, generator=gen).to(dtype))
    reference = torch.randperm(p.numel(), generator=gen)[:200].sort().values
    reference[-1] = p.numel() - 1  # the last entry
    indices = reference.to(index_dtype)
    values = torch.randn(200, generator=gen).to(dtype)
    assert torch.equal(gather_entries(p, indices), torch.take(p.detach(), reference))
    out = torch.empty(200, dtype=dtype)
    assert gather_entries(p, indices, out) is out and torch.equal(out, torch.take(p.detach(), reference))
    expected = p.detach().clone().view(-1).index_put_((reference,), values).view(p.shape)
    version = p._version
    with torch.no_grad():
        scatter_entries(p, indices, values)
    assert torch.equal(p.detach(), expected)
    assert p._version > version
    offsets = torch.randn(200, generator=gen).to(dtype)
    climbed = p.detach().clone().view(-1).index_put_((reference,), offsets + values).view(p.shape)
    version = p._version
    with torch.no_grad():
        saved = climb_entries(p, indices, offsets.clone())
    assert torch.equal(p.detach(), climbed) and torch.equal(saved, values) and p._version > version
