"""Image-classification datasets: loading by name, column detection, splits and transforms.

``--dataset_name`` may be a Hub id (``uoft-cs/cifar10``), a local ``imagefolder`` or
parquet directory, a ``save_to_disk`` directory, parquet files (a path or a glob), or a
built-in name: ``fashion_mnist`` (the Debian package ``dataset-fashion-mnist`` when it is
installed, else the Hub copy) and ``digits`` (scikit-learn's bundled 8x8 digits).
Everything here raises :class:`DataError` naming the argument at fault, before any
training starts.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    Value,
    load_dataset,
    load_from_disk,
)
from torchvision.transforms import v2 as T

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path(os.environ.get("ZSAM_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
BUILTIN_DATASETS = ("fashion_mnist", "digits")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
VALIDATION_SPLITS = ("validation", "valid", "val")
CACHE_DIR = Path(os.environ.get("ZSAM_HF_CACHE", Path.home() / ".cache" / "zsam_hf"))


class DataError(ValueError):
    """A dataset argument that cannot work; the message names it and says what to do."""


# ---- built-in datasets -----------------------------------------------------------------------
def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _arrays_to_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64)}, features=features)


def _fashion_mnist_from_debian(directory: Path) -> DatasetDict:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(directory / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", 8)
        splits[split] = _arrays_to_dataset(images, labels, FASHION_MNIST_LABELS)
    return DatasetDict(splits)


def _cached(name: str, build, source_stamp: str) -> DatasetDict:
    """Build once, then reload from ``CACHE_DIR`` (encoding 70k PNGs takes a while)."""
    target = CACHE_DIR / f"{name}-{source_stamp}"
    if (target / "dataset_dict.json").exists():
        return load_from_disk(str(target))
    dataset = build()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_to_disk(str(target))
    except OSError as err:  # a read-only home is no reason to fail
        logger.warning("Could not cache %s under %s: %s", name, target, err)
    return dataset


def load_fashion_mnist() -> DatasetDict:
    """Fashion-MNIST (60k/10k, 28x28 grey, 10 classes): Debian's copy, else the Hub's."""
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        stamp = str(int((FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").stat().st_mtime))
        return _cached("fashion_mnist", lambda: _fashion_mnist_from_debian(FASHION_MNIST_DIR), stamp)
    logger.info(
        "Fashion-MNIST files not found under %s; loading %s from the Hub.",
        FASHION_MNIST_DIR,
        FASHION_MNIST_HUB,
    )
    return _load_hub(FASHION_MNIST_HUB, None, None)


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's digits (1797 8x8 grey images), split 80/20 train/test with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    names = [str(d) for d in range(10)]
    return DatasetDict(
        train=_arrays_to_dataset(images[order[:cut]], bunch.target[order[:cut]], names),
        test=_arrays_to_dataset(images[order[cut:]], bunch.target[order[cut:]], names),
    )


# ---- loading by name -------------------------------------------------------------------------
def _load_hub(name: str, config_name: str | None, cache_dir: str | None) -> DatasetDict:
    try:
        loaded = load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as err:  # datasets raises many types for a missing or unreachable dataset
        raise DataError(
            f"dataset_name={name!r} is not a local path, a built-in dataset ({', '.join(BUILTIN_DATASETS)}), "
            f"nor a dataset the Hub served ({type(err).__name__}: {err})"
        ) from err
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(".parquet")
        or "*" in name
        or os.sep + os.sep in name
    )


def _load_local(path: str) -> DatasetDict:
    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f))
        for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    ):
        loaded = load_from_disk(path)
    elif os.path.isdir(path):
        try:
            loaded = load_dataset(path)
        except Exception as err:
            raise DataError(
                f"dataset_name={path!r}: could not read the directory as a dataset ({err})"
            ) from err
    else:
        files = sorted(glob.glob(path))
        if not files or not all(f.endswith(".parquet") for f in files):
            raise DataError(f"dataset_name={path!r}: expected a directory, parquet files or a glob of them")
        loaded = load_dataset("parquet", data_files={"train": files})
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)


def load_image_dataset(
    name: str, config_name: str | None = None, cache_dir: str | None = None
) -> DatasetDict:
    """A DatasetDict for ``--dataset_name``: built-in, local path or glob, or Hub id."""
    if name == "fashion_mnist":
        return load_fashion_mnist()
    if name == "digits":
        return load_digits_dataset()
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded) or glob.glob(expanded):
        return _load_local(expanded)
    if _looks_like_path(name):
        raise DataError(f"dataset_name={name!r}: no such file or directory")
    return _load_hub(name, config_name, cache_dir)


def train_split(dataset: DatasetDict) -> Dataset:
    """The split to train on: ``train``, else the dataset's first split."""
    return dataset["train"] if "train" in dataset else dataset[next(iter(dataset))]


# ---- columns and labels ----------------------------------------------------------------------
@dataclass
class Columns:
    image: str
    label: str
    names: list[str]  # class names, index = label id


def resolve_columns(dataset: Dataset, image_column: str | None, label_column: str | None) -> Columns:
    """Find (or check) the image and label columns and the class names."""
    features = dataset.features
    columns = list(features)
    if image_column is None:
        found = [c for c in columns if isinstance(features[c], Image)] or [
            c for c in IMAGE_COLUMNS if c in features
        ]
        if not found:
            raise DataError(f"no image column among {columns}: pass --image_column_name")
        image_column = found[0]
    elif image_column not in features:
        raise DataError(
            f"image_column_name={image_column!r} is not a column of the dataset; columns: {columns}"
        )
    if not isinstance(features[image_column], Image):
        raise DataError(
            f"image_column_name={image_column!r} holds {features[image_column]}, not images: "
            "pass --image_column_name with the column of images"
        )
    if label_column is None:
        found = [c for c in LABEL_COLUMNS if c in features] or [
            c for c in columns if isinstance(features[c], ClassLabel)
        ]
        if not found:
            raise DataError(f"no label column among {columns}: pass --label_column_name")
        label_column = found[0]
    elif label_column not in features:
        raise DataError(
            f"label_column_name={label_column!r} is not a column of the dataset; columns: {columns}"
        )
    feature = features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        names = [str(i) for i in range(int(max(dataset[label_column])) + 1)]
    else:
        raise DataError(
            f"label_column_name={label_column!r} holds {feature}: expected integer or ClassLabel labels "
            "(encode the classes first, e.g. with Dataset.class_encode_column)"
        )
    return Columns(image_column, label_column, names)


# ---- splits ------------------------------------------------------------------------------------
@dataclass
class Splits:
    train: Dataset
    eval: Dataset
    test: Dataset | None
    eval_name: str


def make_splits(
    dataset: DatasetDict,
    columns: Columns,
    *,
    eval_split: str = "auto",
    train_val_split: float = 0.1,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
) -> Splits:
    """train / eval / test.  eval is the dataset's validation split, else carved from train
    (``train_val_split``, stratified by label), or the test split with ``eval_split="test"``."""
    train = train_split(dataset)
    test = dataset["test"] if "test" in dataset else None
    validation = next((dataset[s] for s in VALIDATION_SPLITS if s in dataset), None)
    if eval_split == "test":
        if test is None:
            raise DataError(f"eval_split='test' but the dataset has no test split (splits: {list(dataset)})")
        evaluation, name, test = test, "test", None
    elif eval_split in dataset:
        evaluation, name = dataset[eval_split], eval_split
    elif eval_split != "auto":
        raise DataError(
            f"eval_split={eval_split!r} is not a split of the dataset: {list(dataset)} (or 'auto')"
        )
    elif validation is not None:
        evaluation, name = validation, "validation"
    else:
        stratify = columns.label if isinstance(train.features[columns.label], ClassLabel) else None
        try:
            parts = train.train_test_split(test_size=train_val_split, seed=seed, stratify_by_column=stratify)
        except ValueError:  # too few examples of some class to stratify
            parts = train.train_test_split(test_size=train_val_split, seed=seed)
        train, evaluation, name = parts["train"], parts["test"], "validation"
    if max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        evaluation = evaluation.select(range(min(max_eval_samples, len(evaluation))))
        if test is not None:
            test = test.select(range(min(max_eval_samples, len(test))))
    return Splits(train, evaluation, test, name)


# ---- label noise ---------------------------------------------------------------------------------
CLEAN_LABEL_COLUMN = "clean_label"


def noisy_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """Symmetric label noise: round(fraction * n) rows, drawn without replacement, get a uniformly random
    class (possibly their own, as in the SAM paper's noisy-label experiments). Fixed by ``seed``."""
    if not 0 <= fraction <= 1:
        raise DataError(f"train_label_noise={fraction!r} is invalid: expected a fraction in [0, 1]")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).copy()
    rows = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    labels[rows] = rng.integers(0, num_classes, size=len(rows))
    return labels


def with_label_noise(dataset: Dataset, columns: Columns, fraction: float, seed: int) -> Dataset:
    """``dataset`` with noisy labels in the label column and the true ones kept in ``clean_label``."""
    clean = np.asarray(dataset[columns.label])
    noisy = noisy_labels(clean, fraction, len(columns.names), seed)
    feature = dataset.features[columns.label]
    dataset = dataset.rename_column(columns.label, CLEAN_LABEL_COLUMN)
    return dataset.add_column(columns.label, noisy.tolist(), feature=feature)


# ---- transforms --------------------------------------------------------------------------------
def _mode(num_channels: int) -> str:
    return "RGB" if num_channels == 3 else "L"


def first_image_size(dataset: Dataset, image_column: str) -> int:
    width, height = dataset[0][image_column].size
    return max(width, height)


def channel_statistics(
    dataset: Dataset, image_column: str, image_size: int, num_channels: int, n: int = 1000
):
    """Per-channel mean and std of up to n training images (for models trained from scratch)."""
    to_tensor = T.Compose(
        [T.Resize((image_size, image_size)), T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    )
    subset = dataset.select(range(min(n, len(dataset))))
    pixels = torch.stack([to_tensor(img.convert(_mode(num_channels))) for img in subset[image_column]])
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def image_transform(image_size: int, mean, std, num_channels: int, train: bool, augment: bool = True):
    """Preprocessing for one PIL image.

    Small images (<= 64 px, CIFAR-like): random crop with padding (1/8 of the side) and
    horizontal flip for training.  Larger ones: random resized crop and flip for
    training, resize and centre crop (0.875) for evaluation.
    """
    steps: list = [T.Lambda(lambda img: img.convert(_mode(num_channels)))]
    small = image_size <= 64
    if train and augment:
        if small:
            steps += [
                T.Resize((image_size, image_size)),
                T.RandomCrop(image_size, padding=max(1, image_size // 8)),
            ]
        else:
            steps += [T.RandomResizedCrop(image_size)]
        steps.append(T.RandomHorizontalFlip())
    elif small:
        steps.append(T.Resize((image_size, image_size)))
    else:
        steps += [T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size)]
    steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


class SeededAugmentation:
    """A random transform whose draws depend only on (seed, epoch, row): resumable augmentation.

    Drawing from the global RNG stream makes a resumed run augment differently from the
    uninterrupted one: the Trainer's data loader prefetches a batch ahead, so the RNG state
    saved with a checkpoint has already been spent on a batch that the checkpoint does not
    hold. Seeding each image's draws from its row and the epoch (set by the training loop
    through ``epoch``) gives the same images whatever was interrupted, on any number of ranks.
    """

    def __init__(self, transform, seed: int):
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __call__(self, image, row: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 2_147_483_647 + row)
            return self.transform(image)


ROW_COLUMN = "__row__"


def with_image_transform(dataset: Dataset, columns: Columns, transform) -> Dataset:
    """Lazily map each batch to the model's ``pixel_values`` and ``labels``."""
    seeded = isinstance(transform, SeededAugmentation)
    if seeded:  # the transform needs each example's row
        dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))

    def apply(batch):
        images = batch[columns.image]
        pixels = (
            [transform(im, row) for im, row in zip(images, batch[ROW_COLUMN])]
            if seeded
            else list(map(transform, images))
        )
        return {"pixel_values": pixels, "labels": list(batch[columns.label])}

    return dataset.with_transform(apply)
