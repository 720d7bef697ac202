"""PyTorch Lightning, the ZSharp authors' loop: manual optimization with first_step / second_step.

pip install pytorch-lightning; run: python examples/lightning_loop.py
"""

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from zsam_hf import ZSAM


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False  # the two passes are ours to take
        self.net = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        loss = F.cross_entropy(self.net(x), y)
        self.manual_backward(loss)
        optimizer.first_step(zero_grad=True)  # climb to w + e
        self.manual_backward(F.cross_entropy(self.net(x), y))
        optimizer.second_step(zero_grad=True)  # back to w, then Adam's step
        self.log("train_loss", loss)
        return loss

    def on_train_epoch_end(self):
        self.lr_schedulers().step()  # manual optimization steps its schedulers itself

    def configure_optimizers(self):
        optimizer = ZSAM(self.net.named_parameters(), torch.optim.Adam, lr=1e-2, weight_decay=5e-5)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.75)]


def main(epochs: int = 3) -> float:
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=32, shuffle=True)
    module = Classifier()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader)
    module.eval()
    with torch.no_grad():
        accuracy = (module.net(x).argmax(-1) == y).float().mean().item()
    print(f"{trainer.global_step} steps, training accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
