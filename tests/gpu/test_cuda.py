"""Checks that need a CUDA GPU; they skip where there is none (CI has none).

    python -m pytest tests/gpu      # on a GPU machine

1. the z-score mask on the GPU equals the CPU one (fp32, bf16, fp16, ties, 30M entries);
2. inside ZSAMTrainer on the GPU, the optimizer receives grad L(w + e) computed by hand and
   the weights before the optimizer step are w bit for bit;
3. fp16 with the real GradScaler: one unscale per step, overflowing steps skipped, no NaN;
   bf16 autocast trains;
4. the ZSAM optimizer in an accelerate fp16 loop (the README's recipe, accumulation 2): the
   GradScaler unscales once per optimizer step, overflowing steps are skipped, no NaN;
5. the fixed-shape selection, and ``ZSAM(capturable=True)``'s whole two-pass step, run under sync debug
   mode "error" and replay from a CUDA graph to the eager answer;
6. ``ZSAMTrainer`` with ``sam_capturable=True``: each optimizer step runs under sync debug mode "error"
   (fp32 and bf16), to the default path's weights.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import reference_offsets
from transformers import TrainerCallback

from zsam_hf import ZSAM, ZSAMTrainer, ZSAMTrainingArguments, zscore_mask

DEVICE = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_mask_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(2_359_296, generator=gen),
        torch.randn(512, 512, 3, 3, generator=gen).to(torch.bfloat16),
        torch.randn(300, 400, generator=gen).to(torch.float16),
        torch.randint(-3, 4, (1_000_000,), generator=gen).float(),
        torch.zeros(512, 9).index_fill_(1, torch.tensor([4]), 1.0) * torch.randn(512, 1, generator=gen),
        torch.randn(30_000_000, generator=gen),
    ]
    for grad in cases:
        for q in (0.5, 0.95, 0.99):
            on_gpu = zscore_mask(grad.to(DEVICE), q).cpu()
            on_cpu = zscore_mask(grad, q)
            assert torch.equal(on_gpu, on_cpu), (
                tuple(grad.shape),
                grad.dtype,
                q,
                (on_gpu != on_cpu).sum().item(),
            )


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 5)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.tanh(self.fc1(x)))
        return {"logits": logits, "loss": F.cross_entropy(logits, labels) if labels is not None else None}


class VectorData(torch.utils.data.Dataset):
    def __init__(self, n: int, scale: float = 1.0):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 16, generator=gen) * scale
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long() * 2

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(TrainerCallback):
    def __init__(self, model):
        self.model, self.start, self.pre, self.grads, self.end = model, [], [], [], []

    def _w(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_step_begin(self, *a, **k):
        self.start.append(self._w())

    def on_pre_optimizer_step(self, *a, **k):
        self.pre.append(self._w())
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()})

    def on_step_end(self, *a, **k):
        self.end.append(self._w())


def _args(tmp: str, **kw) -> ZSAMTrainingArguments:
    base = dict(
        output_dir=tmp,
        per_device_train_batch_size=64,
        max_steps=3,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    base.update(kw)
    return ZSAMTrainingArguments(**base)


def test_gradient_at_w_plus_e() -> None:
    model = Net()
    data = VectorData(64)  # one full batch per step: the batch is known
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ZSAMTrainer(model=model, args=_args(tmp), train_dataset=data)
        rec = Recorder(model)
        trainer.add_callback(rec)
        trainer.train()
    names = [n for n, _ in model.named_parameters()]
    x, y = data.x.to(DEVICE), data.y.to(DEVICE)
    for step in range(3):
        w0 = rec.start[step]
        assert all(torch.equal(rec.pre[step][n], w0[n]) for n in names), "weights not restored exactly"
        leaves = {n: w0[n].clone().requires_grad_() for n in names}
        out = torch.func.functional_call(model, leaves, (x, y))
        g = torch.autograd.grad(out["loss"], list(leaves.values()))
        e = reference_offsets("zsam", names, [w0[n] for n in names], g, 0.05)
        moved = {
            n: (w0[n].double() + torch.from_numpy(ei).to(DEVICE)).float().requires_grad_()
            for n, ei in zip(names, e)
        }
        out = torch.func.functional_call(model, moved, (x, y))
        expected = torch.autograd.grad(out["loss"], list(moved.values()))
        for n, exp in zip(names, expected):
            np.testing.assert_allclose(
                rec.grads[step][n].cpu().numpy(), exp.cpu().numpy(), rtol=1e-3, atol=1e-5, err_msg=n
            )


class CountingScaler(torch.amp.GradScaler):
    """A GradScaler that counts its own unscales."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def unscale_(self, optimizer):
        self.calls += 1
        return super().unscale_(optimizer)


def test_fp16_grad_scaler() -> None:
    model = Net()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ZSAMTrainer(
            model=model,
            args=_args(tmp, fp16=True, max_grad_norm=1.0, max_steps=6),
            train_dataset=VectorData(64, scale=100.0),
        )
        assert trainer.accelerator.scaler is not None, "fp16 on CUDA should bring a GradScaler"
        trainer.accelerator.scaler = CountingScaler("cuda", init_scale=2.0**40, backoff_factor=2.0**-10)
        rec = Recorder(model)
        trainer.add_callback(rec)
        trainer.train()
        scale = trainer.accelerator.scaler.get_scale()
    assert trainer.accelerator.scaler.calls == 6, trainer.accelerator.scaler.calls
    assert scale < 2.0**40, "no overflow happened: the check did not exercise skipping"
    skipped = [all(torch.equal(rec.start[s][n], rec.end[s][n]) for n in rec.start[s]) for s in range(6)]
    assert skipped[0] and not all(skipped), skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16() -> None:
    model = Net()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ZSAMTrainer(
            model=model, args=_args(tmp, bf16=True, max_steps=5), train_dataset=VectorData(256)
        )
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(np.isfinite(h["sharpness"]) and h["perturbation_norm"] > 0 for h in logs), logs
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_optimizer_in_an_accelerate_fp16_loop() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="fp16", gradient_accumulation_steps=2)
    assert accelerator.scaler is not None, "fp16 on CUDA should bring a GradScaler"
    accelerator.scaler = CountingScaler("cuda", init_scale=2.0**40, backoff_factor=2.0**-10)
    model = Net()
    zsam = ZSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loader = torch.utils.data.DataLoader(VectorData(96, scale=100.0), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, zsam, loader)
    weights = []
    for batch in loader:
        with accelerator.accumulate(model):
            with zsam.ascent(), accelerator.no_sync(model):
                accelerator.backward(model(**batch)["loss"])
            accelerator.backward(model(**batch)["loss"])
            zsam.restore()
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                weights.append([p.detach().clone() for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
    steps = len(loader) // 2
    calls = accelerator.scaler.calls
    assert calls == steps, (calls, steps)  # one unscale per optimizer step
    assert accelerator.scaler.get_scale() < 2.0**40, "no overflow happened: skipping was not exercised"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    final = [p.detach() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(weights[0], final)), "no step was taken at all"


def test_the_fixed_shape_selection_runs_without_a_host_synchronization_and_inside_a_cuda_graph() -> None:
    """The accelerator's selection (one topk per tensor): sync debug mode "error" passes, and a captured
    CUDA graph replays it to the eager answer."""
    from zsam_hf.selection import kept_fixed_shape

    grad = torch.randn(512, 512, 3, 3, device=DEVICE)
    eager = kept_fixed_shape(grad, 0.95)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kept_fixed_shape(grad, 0.95)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = grad.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kept_fixed_shape(static, 0.95)  # warm-up on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kept_fixed_shape(static, 0.95)
    static.copy_(grad)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(
        torch.sort(captured.indices[captured.valid]).values, torch.sort(eager.indices[eager.valid]).values
    )


def _capturable_zsam() -> tuple[nn.Module, ZSAM]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)
    ).to(DEVICE)
    return model, ZSAM(model.parameters(), torch.optim.AdamW, lr=1e-3, capturable=True)


def _two_passes(model: nn.Module, optimizer: ZSAM, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.second_step(zero_grad=True)


def test_a_capturable_zsam_step_has_no_host_synchronization_and_replays_from_one_cuda_graph() -> None:
    """``ZSAM(..., capturable=True)`` around AdamW (built capturable by it): sync debug mode "error" passes
    through whole eager steps, and one CUDA graph of the whole two-pass step (both forwards and backwards,
    first_step, second_step) replays to the weights the eager steps reach."""
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(32, 3, 8, 8, generator=gen).to(DEVICE),
            torch.randint(0, 10, (32,), generator=gen).to(DEVICE),
        )
        for _ in range(6)
    ]
    model, optimizer = _capturable_zsam()
    for x, y in batches[:3]:
        _two_passes(model, optimizer, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[3:]:
            _two_passes(model, optimizer, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = [p.detach().clone() for p in model.parameters()]

    model, optimizer = _capturable_zsam()
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires: the same three steps
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            _two_passes(model, optimizer, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _two_passes(model, optimizer, static_x, static_y)
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=1e-4, atol=1e-5)


class SyncDebugWindow(TrainerCallback):
    """Sync debug mode "error" from each optimizer step's start to its end: both passes of every
    micro-batch, clipping and AdamW's step. The Trainer's batch fetch (before) and logging (after) read
    the host by design and stay outside."""

    def __init__(self):
        self.windows = 0

    def on_step_begin(self, *a, **k):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def on_step_end(self, *a, **k):
        torch.cuda.set_sync_debug_mode("default")
        self.windows += 1


@pytest.mark.parametrize("bf16", [False, True])
def test_a_trainer_step_with_sam_capturable_has_no_host_synchronization(bf16: bool) -> None:
    """``ZSAMTrainer`` with ``sam_capturable=True``, AdamW, clipping and two micro-batches a step: every
    optimizer step passes under sync debug mode "error" (tests/core checks the same window on the CPU with a
    dispatch counter), and the weights match the default path's."""
    finals = {}
    for capturable in (False, True):
        model = Net()
        window = SyncDebugWindow()
        settings = dict(sam_capturable=capturable, optim="adamw_torch", max_grad_norm=1.0, bf16=bf16,
                        per_device_train_batch_size=32, gradient_accumulation_steps=2,
                        logging_nan_inf_filter=False, logging_steps=3)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            trainer = ZSAMTrainer(model=model, args=_args(tmp, **settings), train_dataset=VectorData(64))
            if capturable:
                trainer.add_callback(window)
            try:
                trainer.train()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert window.windows == (3 if capturable else 0)
        finals[capturable] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(finals[False], finals[True]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
