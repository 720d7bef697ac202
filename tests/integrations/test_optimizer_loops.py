"""The ZSAM optimizer in the loops people write: PyTorch Lightning's manual optimization."""

from __future__ import annotations

import pytest
import torch
from toy import TinyClassifier, vector_dataset

from zsam_hf import ZSAM

pl = pytest.importorskip("pytorch_lightning", reason="pytorch-lightning is in the test extra")


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
    trainer.fit(module, _loader())

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
