"""The ZSAM optimizer in the loops people write: PyTorch Lightning's manual optimization."""

from __future__ import annotations

import warnings

import pytest
import torch
from toy import TinyClassifier, vector_dataset

from zsam_hf import ZSAM

pl = pytest.importorskip(
    "pytorch_lightning",
    reason="pytorch-lightning is in the integrations extra: pip install zsam-hf[integrations]",
)


class ZSAMModule(pl.LightningModule):
    """The authors' loop: automatic_optimization off, manual_backward, first_step, second_step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = TinyClassifier(batchnorm=True)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self.net(**batch)["loss"]
        self.manual_backward(loss)
        optimizer.first_step(zero_grad=True)
        self.manual_backward(self.net(**batch)["loss"])
        optimizer.second_step(zero_grad=True)
        self.log("train_loss", loss)
        return loss

    def on_train_epoch_end(self):
        self.lr_schedulers().step()  # manual optimization steps its schedulers itself

    def configure_optimizers(self):
        optimizer = ZSAM(self.net.named_parameters(), torch.optim.Adam, lr=1e-2, weight_decay=5e-5)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def _loader():
    return torch.utils.data.DataLoader(vector_dataset(48, seed=3), batch_size=8, shuffle=False)


def test_lightning_manual_optimization_matches_the_plain_loop():
    module = ZSAMModule()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _loader())
    scheduler_warnings = [str(w.message) for w in caught if "lr_scheduler" in str(w.message)]
    assert not scheduler_warnings, scheduler_warnings  # the scheduler saw every optimizer step

    reference = TinyClassifier(batchnorm=True)
    optimizer = ZSAM(reference.named_parameters(), torch.optim.Adam, lr=1e-2, weight_decay=5e-5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(2):
        for batch in _loader():
            reference(**batch)["loss"].backward()
            optimizer.first_step(zero_grad=True)
            reference(**batch)["loss"].backward()
            optimizer.second_step(zero_grad=True)
        scheduler.step()
    for (name, got), expected in zip(module.net.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert trainer.global_step == 12  # Lightning counts the base optimizer's steps
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    assert not torch.equal(module.net.fc1.weight, TinyClassifier(batchnorm=True).fc1.weight)


# ---- accelerate: prepare, accumulate, no_sync, clipping, 1 and 2 processes (gloo) -------------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from reference import reference_offsets  # noqa: E402

HELPERS = Path(__file__).resolve().parent.parent / "helpers"


def _accelerate(out: Path, mode: str, processes: int) -> list[dict]:
    env = {
        **os.environ,
        "PYTHONPATH": str(HELPERS) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    worker = [str(HELPERS / "accelerate_worker.py"), str(out), mode]
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else []
    )
    done = subprocess.run(
        [sys.executable, *launcher, *worker], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [torch.load(out / f"{mode}_rank{r}.pt") for r in range(processes)]


def _grad(model, weights: dict, batch: dict, scale: float) -> dict:
    leaves = {n: t.detach().double().clone().requires_grad_() for n, t in weights.items()}
    logits = torch.func.functional_call(model, leaves, (batch["x"].double(),))["logits"]
    grads = torch.autograd.grad(F.cross_entropy(logits, batch["labels"]) * scale, list(leaves.values()))
    return dict(zip(leaves, grads))


def _reference_step(records: list[dict], step: int, sync: bool) -> dict:
    """w - lr * mean over ranks of the sum over micro-batches of grad (L/2)(w + e), each micro-batch's e
    from its own ascent gradient (per replica), or from the ascent gradient averaged over ranks (sync)."""
    model = TinyClassifier(hidden=16).double()
    w = {n: t.double() for n, t in records[0]["starts"][step].items()}
    names = list(w)
    total = {n: torch.zeros_like(t) for n, t in w.items()}
    for i in (2 * step, 2 * step + 1):
        ascents = [_grad(model, w, r["batches"][i], 0.5) for r in records]
        if sync:
            ascents = [{n: sum(a[n] for a in ascents) / len(ascents) for n in names}] * len(records)
        for record, g in zip(records, ascents):
            e = reference_offsets("zsam", names, [w[n] for n in names], [g[n] for n in names], 0.05)
            shifted = {n: w[n] + torch.from_numpy(o) for n, o in zip(names, e)}
            descent = _grad(model, shifted, record["batches"][i], 0.5)
            for n in names:
                total[n] += descent[n] / len(records)
    norm = torch.sqrt(sum((t**2).sum() for t in total.values()))
    clip = min(1.0, 10.0 / (float(norm) + 1e-6))
    return {n: w[n] - 0.1 * clip * total[n] for n in names}


@pytest.mark.parametrize(("mode", "processes"), [("replica", 1), ("replica", 2), ("sync", 2)])
def test_accelerate_loop_with_accumulation_matches_the_reference(tmp_path, mode, processes):
    records = _accelerate(tmp_path, mode, processes)
    steps = len(records[0]["starts"])
    assert records[0]["world"] == processes and steps == 8 // processes  # 64 rows, 4 a micro-batch, 2 a step
    for step in range(steps):
        expected = _reference_step(records, step, sync=mode == "sync")
        got = records[0]["starts"][step + 1] if step < steps - 1 else records[0]["final"]
        for n, t in got.items():
            torch.testing.assert_close(
                t.double(), expected[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}"
            )
        if processes > 1:  # the two ascents differ enough for the test to tell them apart
            other = _reference_step(records, step, sync=mode != "sync")
            assert any((other[n] - t.double()).abs().max() > 1e-4 for n, t in got.items())
    for record in records[1:]:  # the replicas stay identical
        for n, t in record["final"].items():
            assert torch.equal(t, records[0]["final"][n]), n


def test_accelerate_loop_with_a_grad_scaler_unscales_once_and_skips_overflows(tmp_path):
    """accelerate's fp16 protocol (run on the CPU): the ascent on scaled gradients, clipping unscales
    and the step does not unscale again, overflowing steps are skipped with the weights untouched."""
    (record,) = _accelerate(tmp_path, "scaler", 1)
    steps = len(record["starts"])
    assert record["unscale_calls"] == steps, (record["unscale_calls"], steps)  # one unscale per step
    assert record["scale"] < 2.0**40, "no overflow happened: skipping was not exercised"
    weights = [*record["starts"][1:], record["final"]]
    skipped = [all(torch.equal(a[n], b[n]) for n in a) for a, b in zip(record["starts"], weights)]
    assert skipped[0] and not all(skipped), skipped
    # An overflowing ascent climbs nowhere; the others are rho whatever the scale: the filtered part
    # has norm rho, and a tensor that keeps nothing takes SAM's share of at most rho more (sqrt(2) rho).
    climbed = [n for n in record["norms"] if n is not None]
    assert climbed and min(climbed) == pytest.approx(0.05, rel=1e-4), record["norms"]
    assert all(n <= 0.05 * 2**0.5 * (1 + 1e-4) for n in climbed), record["norms"]
    assert all(torch.isfinite(t).all() for t in record["final"].values())


def test_accelerate_loop_trains_in_bf16_on_two_processes(tmp_path):
    records = _accelerate(tmp_path, "bf16", 2)
    losses = records[0]["losses"]
    assert sum(losses[-4:]) < sum(losses[:4])
    for n, t in records[1]["final"].items():
        assert torch.equal(t, records[0]["final"][n]), n
