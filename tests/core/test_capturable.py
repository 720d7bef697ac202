"""The capturable ascent (``zsam_hf/capturable.py``), tested on the CPU.

It must write the weights the eager engine writes, bit for bit (the same kept set, the same fallbacks,
the same rounding), restore w bit for bit, take no ascent on a non-finite gradient, and do all of it
with no host read and no data-dependent shape, through the engine, through ``ZSAM``'s two steps and
through ``ZSAMTrainer``'s optimizer steps (``sam_capturable=True``).
The eager reference here is the engine's own fixed-shape path (one host read per step), itself tested
against the independent reference in ``test_fixed_shape.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from checks import HostReads
from toy import TinyClassifier, make_args, vector_dataset
from transformers import TrainerCallback

from zsam_hf import ZSAM, ZSAMTrainer
from zsam_hf.capturable import capturable_ascent
from zsam_hf.mixin import _check_backend, _SharpnessMeter
from zsam_hf.perturbation import PerturbationStats, SharpnessPerturbation

FORBIDDEN = {"nonzero", "masked_select", "_local_scalar_dense", "unique", "_unique2", "item", "index"}


def _case(dtype: torch.dtype) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Weights and ascent gradients with every fallback of the contract: a constant gradient (nothing
    kept: SAM's e_p), a gradient whose kept entries are all zero (``tensor`` falls back), a 1 x 1
    weight, ties straddling the threshold, and tensors with ndim <= 1."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(120, 80), (16, 3, 3, 3), (80,), (1, 1), (40, 5), (64, 9), (30, 20), (7,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    grads[4] = torch.full((40, 5), 2.0)  # constant
    grads[5] = torch.full((64, 9), 0.5)
    grads[5][0, :20] = 0.0  # 20 of 576 at zero, the rest tied: only zeros are kept
    straddling = torch.zeros(30, 20)
    straddling.view(-1)[:25] = 1.0  # 4.2% at one value, the next 40 at another: ties across Q_p
    straddling.view(-1)[25:65] = -1.0
    grads[6] = straddling
    return [f"p{i}" for i in range(len(shapes))], params, [g.to(dtype) for g in grads]


def _climb(engine: SharpnessPerturbation, names, params, grads):
    """The weights at w + e, ||e||, and whether the restore gave w back bit for bit."""
    weights = [p.clone() for p in params]
    applied, stats = engine.perturb(names, weights, [g.clone() for g in grads])
    climbed = [w.clone() for w in weights]
    applied.restore()
    restored = all(torch.equal(w, p) for w, p in zip(weights, params))
    return climbed, stats, restored


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalization", ["global", "tensor"])
@pytest.mark.parametrize("variant", ["zsam", "sam"])
def test_the_capturable_ascent_writes_the_eager_weights_bit_for_bit(variant, normalization, dtype):
    names, params, grads = _case(dtype)
    eager = SharpnessPerturbation(variant=variant, normalization=normalization, fixed_shape=True)
    capturable = SharpnessPerturbation(variant=variant, normalization=normalization, capturable=True)
    expected, expected_stats, _ = _climb(eager, names, params, grads)
    climbed, stats, restored = _climb(capturable, names, params, grads)
    for name, a, b in zip(names, expected, climbed):
        assert torch.equal(a, b), f"{name}: {(a.double() - b.double()).abs().max()}"
    assert sum(not torch.equal(b, p) for b, p in zip(climbed, params)) >= 6
    assert restored
    # ||e|| is a logged figure: the fallback's share comes from ||g|| in float32, not from the rounded e
    rtol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-3
    torch.testing.assert_close(stats.norm.double(), expected_stats.norm.double(), rtol=rtol, atol=0)
    if variant == "zsam":  # the logged kept fraction, computed on the device, is the eager engine's count
        assert stats.kept_fraction.item() == pytest.approx(expected_stats.kept_fraction, rel=1e-6)
    assert stats.taken.item() and expected_stats.taken is None


def test_the_fallbacks_are_the_ones_the_contract_names():
    """Global ZSAM: the constant gradient and the 1 x 1 weight take SAM's dense e_p, every entry moved;
    the zero-kept one keeps its zeros (global normalization keeps a tensor that kept zeros); the straddling
    ties keep exactly the 25 entries above them."""
    names, params, grads = _case(torch.float32)
    climbed, _, _ = _climb(SharpnessPerturbation(capturable=True), names, params, grads)
    moved = [(c != p).sum().item() for c, p in zip(climbed, params)]
    assert moved[4] == 200 and moved[3] == 1  # dense fallbacks
    assert moved[5] == 0  # kept entries are zeros: e = 0 there, and no fallback under global
    assert moved[6] == 25
    assert 0 < moved[0] <= 0.05 * 120 * 80 + 1


@pytest.mark.parametrize("variant", ["zsam", "sam"])
def test_a_non_finite_ascent_gradient_leaves_the_weights_at_w(variant):
    names, params, grads = _case(torch.float32)
    grads[2][3] = float("inf")
    grads[0][1, 1] = float("nan")
    climbed, stats, restored = _climb(
        SharpnessPerturbation(variant=variant, capturable=True), names, params, grads
    )
    assert all(torch.equal(c, p) for c, p in zip(climbed, params))  # no NaN reached the weights
    assert stats.norm.item() == 0.0 and restored
    assert not stats.taken.item()  # the meter counts this micro-batch as not perturbed
    assert variant == "sam" or stats.kept_fraction.item() == 0.0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def _train(capturable: bool, steps: int = 4) -> tuple[list[torch.Tensor], list[HostReads]]:
    torch.manual_seed(0)
    model = _Net()
    optimizer = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, capturable=capturable)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen))
        for _ in range(steps)
    ]
    loss = nn.CrossEntropyLoss()
    for x, y in batches:
        loss(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        loss(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
    return [p.detach().clone() for p in model.parameters()]


def test_the_capturable_optimizer_trains_as_the_default_one():
    """Four SGD steps of a conv + batch-norm net: the same weights as the default (CPU) path, which selects
    the same entries in another order (so ||e|| may differ in its last bit)."""
    for a, b in zip(_train(capturable=False), _train(capturable=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_two_steps_read_the_host_never(monkeypatch):
    """``first_step`` and ``second_step`` with ``capturable=True``: no ``.item()``, no ``tolist``, no
    ``nonzero`` or boolean indexing (the same counter sees the eager fixed-shape path read once)."""
    torch.manual_seed(0)
    model = _Net()
    optimizer = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, capturable=True)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    loss = nn.CrossEntropyLoss()
    own = [p.data for p in model.parameters()]
    loss(model(x), y).backward()
    with HostReads(monkeypatch) as host:
        optimizer.first_step(zero_grad=True)
    assert all(
        p.data_ptr() != w.data_ptr() for p, w in zip(model.parameters(), own)
    )  # each parameter points at w + e
    loss(model(x), y).backward()
    with HostReads(monkeypatch) as second:
        optimizer.second_step(zero_grad=True)
    assert all(
        p.data_ptr() == w.data_ptr() for p, w in zip(model.parameters(), own)
    )  # back at its own storage
    assert "topk" in host.seen and "index_copy_" in host.seen
    for counter in (host, second):
        assert (counter.reads, counter.nonzero) == (0, 0)
        assert not counter.seen & FORBIDDEN, counter.seen & FORBIDDEN
    assert optimizer.last_perturbation_norm.item() == pytest.approx(0.05, rel=1e-5)


def test_what_it_does_not_cover_is_refused_by_name():
    model = nn.Linear(4, 3)
    for variant in ("asam", "fsam", "random"):
        with pytest.raises(ValueError, match=f"capturable=True is not available for variant='{variant}'"):
            ZSAM(model.named_parameters(), torch.optim.SGD, lr=0.1, variant=variant, capturable=True)
    weight = torch.randn(3, 4).t()  # a non-contiguous view: it cannot point at a buffer and back
    engine = SharpnessPerturbation(capturable=True)
    with pytest.raises(ValueError, match="parameter 'head.weight' does not own its whole contiguous storage"):
        engine.perturb(["head.weight"], [weight], [torch.randn(4, 3)])


def test_the_base_optimizer_is_built_capturable_when_it_takes_the_flag():
    model = nn.Linear(4, 3)
    adamw = ZSAM(model.parameters(), torch.optim.AdamW, lr=0.1, capturable=True)
    assert adamw.base_optimizer.defaults["capturable"] is True
    sgd = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1, capturable=True)  # SGD has no such flag
    assert "capturable" not in sgd.base_optimizer.defaults and sgd.perturbation.capturable


@pytest.mark.parametrize("normalization", ["global", "tensor"])
def test_the_whole_ascent_compiles_into_one_graph_and_gives_the_eager_weights(normalization):
    """``torch.compile(fullgraph=True)`` traces ``capturable_ascent`` (selection, gates, writes) without a
    graph break; the compiled function writes the same buffers, bit for bit."""
    names, params, grads = _case(torch.float32)

    def run(ascent):
        buffers = [torch.empty_like(p) for p in params]
        figures = ascent(params, [g.clone() for g in grads], buffers, "zsam", 0.05, 0.95, normalization)
        return buffers, figures

    torch._dynamo.reset()
    compiled = torch.compile(capturable_ascent, fullgraph=True, backend="aot_eager", dynamic=False)
    (expected, expected_figures), (written, figures) = run(capturable_ascent), run(compiled)
    for a, b in zip(expected, written):
        assert torch.equal(a, b)
    for a, b in zip(expected_figures, figures):  # ||e||, the kept fraction, the finite flag
        assert torch.equal(a, b)


class _StepWindow(TrainerCallback):
    """Counts host reads from each optimizer step's start to its end: both passes of every micro-batch,
    the clipping and the base optimizer's step; the Trainer's logging, which reads the host by design,
    falls outside."""

    def __init__(self, counter: HostReads):
        self.counter, self.windows = counter, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.counter.__exit__(None, None, None)
        self.windows += 1


def _trainer_run(tmp_path, monkeypatch, capturable: bool):
    """Three SGD steps of two micro-batches each, clipped, through ZSAMTrainer; the host reads inside the
    optimizer steps, the final weights and the logs."""
    settings = dict(
        output_dir=str(tmp_path / f"capturable{capturable}"),
        sam_capturable=capturable,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        logging_nan_inf_filter=False,  # the Trainer's own per-micro-batch read of the loss
        logging_steps=3,
    )
    model = TinyClassifier()
    trainer = ZSAMTrainer(model=model, args=make_args(tmp_path, **settings),
                          train_dataset=vector_dataset(48))  # fmt: skip
    window = _StepWindow(HostReads(monkeypatch))
    trainer.add_callback(window)
    trainer.train()
    assert window.windows == 3
    logs = next(log for log in trainer.state.log_history if "perturbation_norm" in log)
    return window.counter, [p.detach().clone() for p in model.parameters()], logs


def test_a_trainer_step_with_sam_capturable_reads_the_host_never(tmp_path, monkeypatch):
    """The sync-free Trainer step, checked on the CPU as tests/gpu checks it under CUDA's sync debug mode:
    from on_step_begin to on_step_end no ``.item()``, ``tolist``, ``nonzero`` or boolean index, while the
    default path's host reads are seen by the same counter. Weights and logs match the default path."""
    host, weights, logs = _trainer_run(tmp_path, monkeypatch, capturable=True)
    assert (host.reads, host.nonzero) == (0, 0)
    assert not host.seen & FORBIDDEN, host.seen & FORBIDDEN
    assert "topk" in host.seen
    default, expected, expected_logs = _trainer_run(tmp_path, monkeypatch, capturable=False)
    assert default.reads > 0  # the counter sees the eager selection's reads
    for a, b in zip(expected, weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for key in ("loss", "perturbed_loss", "perturbation_norm", "zsam_kept_fraction"):
        assert logs[key] == pytest.approx(expected_logs[key], rel=1e-5), key


def test_a_non_finite_micro_batch_is_not_counted_as_perturbed():
    """The Trainer's meter, fed a taken and a gated (non-finite) capturable ascent and an eager one, counts
    two perturbed micro-batches: the logs average ||e|| and the kept fraction over the taken ones."""
    meter = _SharpnessMeter()
    loss = torch.tensor(1.0)
    meter.record(0, loss, loss, PerturbationStats(torch.tensor(0.05), torch.tensor(0.04), torch.tensor(True)))
    meter.record(0, loss, loss, PerturbationStats(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(False)))
    meter.record(1, loss, loss, PerturbationStats(torch.tensor(0.05), 0.06))  # the eager engine's kind
    assert meter.sums.tolist() == pytest.approx([3.0, 3.0, 0.1, 0.1, 2.0])


def test_sam_capturable_refuses_what_it_does_not_cover(tmp_path):
    for variant in ("asam", "fsam", "random"):
        with pytest.raises(ValueError, match=f"sam_capturable=True is invalid: .* not '{variant}'"):
            make_args(tmp_path, sam_variant=variant, sam_capturable=True)
    with pytest.raises(ValueError, match="sam_capturable='yes' is invalid: expected True or False"):
        make_args(tmp_path, sam_capturable="yes")
    with pytest.raises(ValueError, match="sam_capturable=True is not supported under FSDP2"):
        _check_backend(make_args(tmp_path, sam_capturable=True), deepspeed=False, fsdp_version=2)
