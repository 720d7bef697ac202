"""``zsam_hf.ZSAM``: the released code's first_step/second_step surface over the Trainer's own engine."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from checks import random_control_masks
from reference import as_f64, reference_offsets
from sam_references import DavdaSAM, ReleasedZSAM
from toy import TinyClassifier, micro_batches_of_step, train_recorded, vector_dataset

from zsam_hf import ZSAM


class SmallCNN(nn.Module):
    """Conv + BatchNorm + a weight tensor whose gradient is constant (std 0: ZSAM keeps nothing there)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.flat_scale = nn.Parameter(torch.ones(2, 2))

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)
        return self.fc(h.flatten(1)) * self.flat_scale.mean()


def _batches(n: int = 12):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(n)]  # fmt: skip


def _train_two_step(optimizer_of, batches, closure=False):
    model = SmallCNN().double()
    optimizer = optimizer_of(model)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        if closure:
            optimizer.step(lambda x=x, y=y: F.cross_entropy(model(x), y).backward())
            optimizer.zero_grad()
        else:
            optimizer.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
    return model, optimizer


def _assert_state_close(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=lambda m, name=name: f"{name}: {m}", **tol)


ADAM = dict(lr=1e-3, weight_decay=5e-5)


@pytest.mark.parametrize(
    ("reference", "ours"),
    [
        (
            lambda m: ReleasedZSAM(m.parameters(), torch.optim.Adam, rho=0.05, **ADAM),
            lambda m: ZSAM(m.parameters(), torch.optim.Adam, normalization="tensor", **ADAM),
        ),
        (
            lambda m: DavdaSAM(m.parameters(), torch.optim.Adam, rho=0.05, **ADAM),
            lambda m: ZSAM(m.parameters(), torch.optim.Adam, variant="sam", **ADAM),
        ),
    ],  # fmt: skip
    ids=["released-zsam", "davda54-sam"],
)
def test_equals_the_released_code_and_davda54_over_a_dozen_adam_steps(reference, ours):
    batches = _batches()
    expected, _ = _train_two_step(reference, batches)
    got, optimizer = _train_two_step(ours, batches)
    _assert_state_close(got, expected, rtol=1e-10, atol=1e-12)  # BatchNorm statistics included
    start = SmallCNN().double()
    assert (got.conv.weight - start.conv.weight).abs().max() > 1e-3  # it trained


def test_closure_form_equals_the_two_step_form():
    batches = _batches(5)
    make = lambda m: ZSAM(m.named_parameters(), torch.optim.Adam, variant="fsam", **ADAM)  # noqa: E731
    two_step, _ = _train_two_step(make, batches)
    closure, _ = _train_two_step(make, batches, closure=True)
    _assert_state_close(closure, two_step, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["zsam", "sam", "asam", "fsam", "random"])
def test_state_dict_round_trip_mid_run_continues_exactly(variant):
    batches = _batches(8)
    make = lambda m: ZSAM(m.named_parameters(), torch.optim.AdamW, variant=variant, lr=1e-2)  # noqa: E731
    straight, _ = _train_two_step(make, batches)
    first, optimizer = _train_two_step(make, batches[:4])
    saved_model, saved_optimizer = first.state_dict(), optimizer.state_dict()
    resumed = SmallCNN().double()
    resumed.load_state_dict(saved_model)
    again = make(resumed)
    again.load_state_dict(saved_optimizer)
    if variant == "fsam":
        assert set(again.perturbation.ema) == {n for n, _ in resumed.named_parameters()}
    for x, y in batches[4:]:
        F.cross_entropy(resumed(x), y).backward()
        again.first_step(zero_grad=True)
        F.cross_entropy(resumed(x), y).backward()
        again.second_step(zero_grad=True)
    _assert_state_close(resumed, straight, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("variant", "normalization"),
    [("zsam", "global"), ("zsam", "tensor"), ("sam", "global"), ("asam", "global"), ("fsam", "global"),
     ("sam", "tensor"), ("random", "global"), ("random", "tensor")],
)  # fmt: skip
def test_each_step_hands_the_base_optimizer_the_reference_gradient(variant, normalization):
    """With SGD (lr 1, no momentum) w1 = w0 - g', g' = grad L(w0 + e), e from tests/helpers/reference.py."""
    model = TinyClassifier(n_in=6, hidden=40).double()
    optimizer = ZSAM(
        model.named_parameters(), torch.optim.SGD, variant=variant, normalization=normalization, lr=1.0
    )
    data = vector_dataset(32)
    names = [n for n, _ in model.named_parameters()]
    ema: dict = {}
    for step in range(3):
        x, y = (
            data.columns["x"][8 * step : 8 * step + 8].double(),
            data.columns["labels"][8 * step : 8 * step + 8],
        )
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}

        def loss_at(weights, x=x, y=y):
            return F.cross_entropy(torch.func.functional_call(model, weights, (x,))["logits"], y)

        leaves = {n: t.clone().requires_grad_() for n, t in w0.items()}
        g = torch.autograd.grad(loss_at(leaves), list(leaves.values()))
        masks = random_control_masks(list(g), step) if variant == "random" else None
        e = reference_offsets(variant, names, [w0[n] for n in names], list(g), optimizer.perturbation.rho,
                              normalization=normalization, ema=ema, masks=masks)  # fmt: skip
        shifted = {n: (w0[n] + torch.from_numpy(o)).requires_grad_() for n, o in zip(names, e)}
        g_prime = torch.autograd.grad(loss_at(shifted), list(shifted.values()))
        model(x, labels=y)["loss"].backward()
        optimizer.first_step(zero_grad=True)
        model(x, labels=y)["loss"].backward()
        optimizer.second_step(zero_grad=True)
        for n, p in model.named_parameters():
            expected = as_f64(w0[n]) - as_f64(g_prime[names.index(n)])
            assert abs(as_f64(p) - expected).max() < 1e-10, (step, n)


def test_the_optimizer_and_the_trainer_give_the_same_weights_on_the_same_batches(tmp_path):
    model = TinyClassifier()
    trainer, rec = train_recorded(
        tmp_path, model, vector_dataset(24), max_steps=4, optim="sgd", learning_rate=0.05
    )
    replayed = TinyClassifier()
    optimizer = ZSAM(replayed.parameters(), torch.optim.SGD, lr=0.05)
    for step in range(4):
        [(batch, _)] = micro_batches_of_step(trainer, step)
        replayed(**batch)["loss"].backward()
        optimizer.first_step(zero_grad=True)
        replayed(**batch)["loss"].backward()
        optimizer.second_step(zero_grad=True)
    _assert_state_close(replayed, model, rtol=1e-6, atol=1e-7)
    assert not torch.equal(model.fc1.weight, TinyClassifier().fc1.weight)


def test_a_scheduler_on_the_optimizer_drives_the_base_optimizer_without_warnings():
    model = TinyClassifier()
    optimizer = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    batch = {k: v[:8] for k, v in vector_dataset(8).columns.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            model(**batch)["loss"].backward()
            optimizer.first_step(zero_grad=True)
            model(**batch)["loss"].backward()
            optimizer.second_step(zero_grad=True)
            scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups


def test_a_compiled_model_trains_like_the_eager_one():
    batches = _batches(3)
    eager, _ = _train_two_step(lambda m: ZSAM(m.parameters(), torch.optim.SGD, lr=0.1), batches)
    model = SmallCNN().double()
    compiled = torch.compile(model, backend="eager")
    optimizer = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for x, y in batches:
        F.cross_entropy(compiled(x), y).backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(compiled(x), y).backward()
        optimizer.second_step(zero_grad=True)
    _assert_state_close(model, eager, rtol=1e-12, atol=1e-12)


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_input_says_what_is_wrong():
    model = TinyClassifier()
    with pytest.raises(TypeError, match=r"base_optimizer is a SGD instance: pass the class \(SGD\)"):
        ZSAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(
        TypeError, match=r"base_optimizer='adam' is invalid: expected a torch\.optim\.Optimizer class"
    ):
        ZSAM(model.parameters(), "adam")
    with pytest.raises(ValueError, match=r"variant='gsam' is invalid"):
        ZSAM(model.parameters(), torch.optim.SGD, variant="gsam", lr=0.1)
    with pytest.raises(ValueError, match=r"rho=-1 is invalid"):
        ZSAM(model.parameters(), torch.optim.SGD, rho=-1, lr=0.1)
    with pytest.raises(ValueError, match="pass model.named_parameters()"):
        ZSAM(model.parameters(), torch.optim.SGD, variant="asam", lr=0.1)
    optimizer = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match=r"second_step\(\) was called without first_step\(\)"):
        optimizer.second_step()
    with pytest.raises(RuntimeError, match="no gradient in .grad"):
        optimizer.first_step()
    with pytest.raises(RuntimeError, match="that would be the base optimizer's plain step"):
        optimizer.step()  # a drop-in swap for SGD that forgot the second pass: refused, not plain SGD
    batch = {k: v[:8] for k, v in vector_dataset(8).columns.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**batch)["loss"].backward()
    with pytest.raises(RuntimeError, match="the closure computed no gradient"):
        optimizer.step(lambda: model(**batch)["loss"])  # forgets backward()
    for n, p in model.named_parameters():  # left at w, not at w + e
        assert torch.equal(p, before[n]), n
    model(**batch)["loss"].backward()
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="first_step\\(\\) was called twice"):
        optimizer.first_step()
