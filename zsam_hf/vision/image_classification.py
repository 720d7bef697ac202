"""The image-classification run shared by the training script and the benchmark.

data -> labels -> model -> transforms -> ZSAMTrainer -> train / evaluate / save / card /
push, each a visible step, in the shape of transformers' image-classification example.
Everything that can be wrong with the arguments is found before the Trainer exists, so
a bad run fails fast and leaves no output directory behind.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field

from transformers import TrainerCallback, set_seed

from ..card import redact_command
from ..checkpoint_dirs import last_complete_checkpoint, require_complete
from ..config import ZSAMTrainingArguments
from ..sharding import end_process_group  # the scripts end a launched run with it
from ..trainer import ZSAMTrainer
from .data import (
    BUILTIN_DATASETS,
    CLEAN_LABEL_COLUMN,
    FASHION_MNIST_HUB,
    Columns,
    DataError,
    SeededAugmentation,
    channel_statistics,
    first_image_size,
    image_transform,
    load_image_dataset,
    make_splits,
    resolve_columns,
    train_split,
    with_image_transform,
    with_label_noise,
)
from .metrics import classification_metrics
from .models import PAPER_MODELS, BuiltModel, Preprocessing, build_model

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to train."""

    model_name_or_path: str = field(
        default="cifar_resnet20",
        metadata={
            "help": "A built-in model trained from scratch ("
            + ", ".join(PAPER_MODELS)
            + "), a timm model ('timm/resnet18.a1_in1k' for pretrained weights, 'resnet18' from scratch), "
            "or an AutoModelForImageClassification checkpoint (Hub id or local directory)."
        },
    )
    pretrained: bool = field(
        default=True,
        metadata={"help": "Load pretrained weights for 'timm/...' models (falls back to scratch offline)."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a checkpoint's classification head when its number of labels differs."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input size for models trained from scratch (default: the dataset's)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    model_revision: str = field(
        default="main", metadata={"help": "Hub revision (branch, tag or commit) of the model."}
    )

    def __post_init__(self):
        if self.image_size is not None and self.image_size < 4:
            raise ValueError(f"image_size={self.image_size} is invalid: expected at least 4 pixels")


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    dataset_name: str = field(
        default="fashion_mnist",
        metadata={
            "help": f"Built-in ({', '.join(BUILTIN_DATASETS)}), a Hub dataset id (e.g. uoft-cs/cifar10), a local "
            "imagefolder/parquet/save_to_disk directory, or parquet files (path or glob)."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration name."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column (default: detected)."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label column (default: detected)."}
    )
    eval_split: str = field(
        default="auto",
        metadata={
            "help": "Split evaluated during training: 'auto' (validation if present, else carved from train), "
            "'test', or any split name."
        },
    )
    train_val_split: float = field(
        default=0.1,
        metadata={"help": "Fraction of train carved off for validation when there is no such split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many examples (validation and test)."}
    )
    augment: bool = field(default=True, metadata={"help": "Random crop/flip augmentation for training."})
    train_label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Replace this fraction of the training labels by uniformly random classes (symmetric "
            "label noise, fixed by --seed); validation and test labels stay clean."
        },
    )
    eval_label_noise: bool = field(
        default=False,
        metadata={
            "help": "Give a validation split carved from train the same label noise as training (what a user "
            "tuning on noisy data would have); the test split stays clean."
        },
    )

    def __post_init__(self):
        if not (isinstance(self.train_label_noise, (int, float)) and 0 <= self.train_label_noise <= 1):
            raise ValueError(
                f"train_label_noise={self.train_label_noise!r} is invalid: expected a fraction in [0, 1]"
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"{name}={value} is invalid: expected a positive number of examples (or leave it unset)"
                )
        if not 0 < self.train_val_split < 1:
            raise ValueError(
                f"train_val_split={self.train_val_split} is invalid: expected a fraction in (0, 1)"
            )


# Defaults of the script where the Trainer's suit no image classifier; any flag overrides them.
SCRIPT_DEFAULTS = dict(
    output_dir="outputs/zsam-image-classification",
    per_device_train_batch_size=128,
    per_device_eval_batch_size=256,
    learning_rate=1e-3,
    weight_decay=5e-4,
    optim="adamw_torch",
    lr_scheduler_type="cosine",
    num_train_epochs=10,
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    logging_steps=20,
    report_to="none",
    remove_unused_columns=False,
    seed=42,
)


class AugmentationEpoch(TrainerCallback):
    """Tells the training augmentation which epoch it is drawing for (also on resume)."""

    def __init__(self, augmentation: SeededAugmentation):
        self.augmentation = augmentation

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.augmentation.epoch = math.floor(state.epoch + 1e-6) if state.epoch else 0


class SetupError(ValueError):
    """An argument that cannot work, found before training started (the message says which)."""


@dataclass
class RunResult:
    trainer: ZSAMTrainer
    metrics: dict[str, float]
    labels: list[str]


def _dataset_for_card(name: str) -> tuple[str, str]:
    if name == "fashion_mnist":
        return FASHION_MNIST_HUB, "Fashion-MNIST"
    if name == "digits":
        return "scikit-learn digits", "scikit-learn digits (8x8)"
    return name, name


@dataclass
class PreparedData:
    """Everything a training loop needs from the data and model arguments (shared by the Trainer
    script and the accelerate no_trainer script)."""

    train: object  # the training split, augmented (SeededAugmentation) into pixel_values / labels
    eval: object  # the evaluation split, transformed for evaluation
    eval_name: str
    test: object | None
    labels: list[str]
    built: BuiltModel
    augmentation: SeededAugmentation
    train_images: object  # the training images as evaluated: no augmentation, their true labels
    train_labels: list[int]  # the labels trained on (noisy where train_label_noise > 0)
    train_true_labels: list[int]  # the training images' true labels
    dataset_id: str
    dataset_display: str


def build_model_from_arguments(
    model_args: ModelArguments, labels: list[str], preprocessing: Preprocessing
) -> BuiltModel:
    """The model ``model_args`` names, for ``labels``, as the script builds it (a fresh one per call)."""
    return build_model(
        model_args.model_name_or_path,
        labels,
        preprocessing,
        pretrained=model_args.pretrained,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
    )


def prepare_data(model_args: ModelArguments, data_args: DataArguments, seed: int) -> PreparedData:
    """Load and split the data, build the model and the transforms; raises before any training.

    Seeds the global random generators with ``seed`` right before building the model, so its
    random initial weights are the seed's alone."""
    raw = load_image_dataset(data_args.dataset_name, data_args.dataset_config_name, model_args.cache_dir)
    columns = resolve_columns(train_split(raw), data_args.image_column_name, data_args.label_column_name)
    splits = make_splits(
        raw,
        columns,
        eval_split=data_args.eval_split,
        train_val_split=data_args.train_val_split,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        seed=seed,
    )
    clean_columns = columns
    if data_args.train_label_noise > 0:
        splits.train = with_label_noise(splits.train, columns, data_args.train_label_noise, seed)
        clean_columns = Columns(columns.image, CLEAN_LABEL_COLUMN, columns.names)
        if data_args.eval_label_noise and splits.eval_name != "test":  # other rows, other draws than train's
            splits.eval = with_label_noise(splits.eval, columns, data_args.train_label_noise, seed + 1)
    image_size = model_args.image_size or first_image_size(splits.train, columns.image)
    mean, std = channel_statistics(splits.train, columns.image, image_size, 3)
    # The random initial weights (a model from scratch, a new head) depend on the seed alone, not on
    # what ran before in this process: a grid that trains its variants one after another in one
    # process compares them from the same starting point.
    set_seed(seed)
    built = build_model_from_arguments(model_args, columns.names, Preprocessing(image_size, mean, std, 3))
    prep = built.preprocessing
    train_tf = SeededAugmentation(
        image_transform(prep.image_size, prep.mean, prep.std, prep.num_channels, True, data_args.augment),
        seed=seed,
    )
    eval_tf = image_transform(prep.image_size, prep.mean, prep.std, prep.num_channels, False)
    dataset_id, dataset_display = _dataset_for_card(data_args.dataset_name)
    return PreparedData(
        train=with_image_transform(splits.train, columns, train_tf),
        eval=with_image_transform(splits.eval, columns, eval_tf),
        eval_name=splits.eval_name,
        test=with_image_transform(splits.test, columns, eval_tf) if splits.test is not None else None,
        labels=columns.names,
        built=built,
        augmentation=train_tf,
        train_images=with_image_transform(splits.train, clean_columns, eval_tf),
        train_labels=list(splits.train[columns.label]),
        train_true_labels=list(splits.train[clean_columns.label]),
        dataset_id=dataset_id,
        dataset_display=dataset_display,
    )


@dataclass
class BuiltRun:
    trainer: ZSAMTrainer
    test: object | None  # the test split, transformed for evaluation (None when there is none)
    labels: list[str]
    train_images: object  # the training images as evaluated: no augmentation, their true labels
    train_labels: list[int]  # the labels trained on (noisy where train_label_noise > 0)
    train_true_labels: list[int]  # the training images' true labels


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, training_args: ZSAMTrainingArguments
) -> BuiltRun:
    """Data, model, transforms and the Trainer; raises before touching ``output_dir``."""
    data = prepare_data(model_args, data_args, training_args.seed)
    trainer = ZSAMTrainer(
        model=data.built.model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=data.built.image_processor,
        compute_metrics=classification_metrics(),
        callbacks=[AugmentationEpoch(data.augmentation)],
    )
    trainer.model_card_info.update(
        dataset=data.dataset_id,
        dataset_display=data.dataset_display,
        eval_split=data.eval_name,
        base_model=data.built.base_model,
    )
    return BuiltRun(
        trainer=trainer,
        test=data.test,
        labels=data.labels,
        train_images=data.train_images,
        train_labels=data.train_labels,
        train_true_labels=data.train_true_labels,
    )


def _checkpoint_to_resume(requested: str | None, output_dir: str, existed: bool) -> str | bool | None:
    """What to resume from, decided before any data or model is loaded.

    A named checkpoint must be complete (else SetupError naming what is missing); "true" takes the
    newest complete one; unset, a re-run of the same command into an existing output_dir resumes
    from its newest complete checkpoint (an interrupted save is skipped, with a warning).
    """
    if requested is not None and str(requested).lower() == "true":
        return True
    if requested is not None:
        try:
            require_complete(requested)
        except ValueError as err:
            raise SetupError(str(err)) from err
        return requested
    checkpoint = last_complete_checkpoint(output_dir) if existed else None
    if checkpoint is not None:
        logger.warning(
            "Resuming from %s (found in output_dir; pass a new --output_dir to start over).", checkpoint
        )
    return checkpoint


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: ZSAMTrainingArguments,
    argv: list[str] | None = None,
) -> RunResult:
    """Train, evaluate (validation, then test when there is one), save with a card, push if asked."""
    set_seed(training_args.seed)
    output_dir = training_args.output_dir
    existed = os.path.exists(output_dir)
    checkpoint = _checkpoint_to_resume(training_args.resume_from_checkpoint, output_dir, existed)
    try:
        built = build_trainer(model_args, data_args, training_args)
        trainer, test, labels = built.trainer, built.test, built.labels
    except Exception as err:
        if not existed and os.path.isdir(output_dir):  # never leave a half-made output directory
            shutil.rmtree(output_dir, ignore_errors=True)
        if isinstance(err, (ValueError, OSError)):
            raise SetupError(str(err)) from err
        raise
    trainer.model_card_info["command"] = redact_command(["python", *(argv if argv is not None else sys.argv)])

    metrics: dict[str, float] = {}
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    metrics.update(train_result.metrics)

    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    metrics.update(eval_metrics)
    if test is not None:
        test_metrics = trainer.evaluate(test, metric_key_prefix="test")
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        metrics.update(test_metrics)

    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"ZSAM ({training_args.sam_variant}) training run")
    return RunResult(trainer, metrics, labels)


__all__ = [
    "BuiltRun",
    "DataArguments",
    "DataError",
    "ModelArguments",
    "PreparedData",
    "RunResult",
    "SCRIPT_DEFAULTS",
    "SetupError",
    "build_model_from_arguments",
    "build_trainer",
    "end_process_group",
    "prepare_data",
    "run",
]
