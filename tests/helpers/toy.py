"""Small models, data and recorders shared by the trainer tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification

from zsam_hf import ZSAMTrainer, ZSAMTrainingArguments


class TinyClassifier(nn.Module):
    """A plain nn.Module with a mean cross-entropy loss (the Trainer's plain-mean path)."""

    def __init__(
        self, n_in: int = 6, hidden: int = 12, n_out: int = 3, batchnorm: bool = False, seed: int = 0
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(n_in, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.tanh(self.norm(self.fc1(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def tiny_vit(num_labels: int = 3, seed: int = 0, dropout: float = 0.0) -> ViTForImageClassification:
    """A 1-layer ViT on 8x8 grey images: the num_items_in_batch (summed-loss) path."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return ViTForImageClassification(config)


class DictDataset(torch.utils.data.Dataset):
    """Rows of named tensors, as the Trainer's collator takes them (no `datasets` needed: core tests)."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: column[i] for name, column in self.columns.items()}

    def map(self, fn) -> DictDataset:
        """A copy with the columns ``fn`` returns (given all columns) replaced."""
        return DictDataset({**self.columns, **fn(self.columns)})


def tiny_bert(num_labels: int = 2, seed: int | None = None):
    """A 1-layer BERT sequence classifier from config (no download): the text-classification path."""
    from transformers import BertConfig, BertForSequenceClassification

    if seed is not None:
        torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=num_labels)  # fmt: skip
    return BertForSequenceClassification(config)


def vector_dataset(n: int, n_in: int = 6, seed: int = 0) -> DictDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=gen)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DictDataset({"x": x, "labels": labels})


def text_dataset(n: int, vocab: int = 50, length: int = 8, seed: int = 0) -> DictDataset:
    """Token ids whose label is set by the first token: a text-classification toy."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    return DictDataset({"input_ids": ids, "labels": (ids[:, 0] > vocab // 2).long()})


def image_dataset(n: int, seed: int = 0) -> DictDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    pixels = torch.randn(n, 1, 8, 8, generator=gen) * 0.5
    for c in range(3):  # class c brightens one quadrant: learnable in a few steps
        rows = labels == c
        pixels[rows, :, (c // 2) * 4 : (c // 2) * 4 + 4, (c % 2) * 4 : (c % 2) * 4 + 4] += 1.5
    return DictDataset({"pixel_values": pixels, "labels": labels})


def make_args(tmp_path, **overrides) -> ZSAMTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=0.05,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        optim="sgd",
    )
    settings.update(overrides)
    return ZSAMTrainingArguments(**settings)


class RecordingTrainer(ZSAMTrainer):
    """Records every micro-batch it is given, tagged with the optimizer step it belongs to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches: list[tuple[int, dict, object]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        copy = {k: v.detach().clone() for k, v in inputs.items()}
        self.micro_batches.append((self.state.global_step, copy, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)


class StepRecorder(TrainerCallback):
    """Weights at the start of each step; gradients and weights right before optimizer.step()."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.start: list[dict[str, torch.Tensor]] = []
        self.pre_step_grads: list[dict[str, torch.Tensor]] = []
        self.pre_step_weights: list[dict[str, torch.Tensor]] = []
        self.end: list[dict[str, torch.Tensor]] = []

    def _weights(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_step_begin(self, args, state, control, **kwargs):
        self.start.append(self._weights())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.pre_step_grads.append(
            {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        )
        self.pre_step_weights.append(self._weights())

    def on_step_end(self, args, state, control, **kwargs):
        self.end.append(self._weights())


def train_recorded(tmp_path, model, dataset, **arg_overrides):
    trainer = RecordingTrainer(model=model, args=make_args(tmp_path, **arg_overrides), train_dataset=dataset)
    recorder = StepRecorder(model)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder


def micro_batches_of_step(trainer, step: int) -> list[tuple[dict, object]]:
    return [(batch, n) for s, batch, n in trainer.micro_batches if s == step]
