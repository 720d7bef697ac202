"""Small local datasets laid out like the Hub's CIFAR-10, CIFAR-100 and Tiny-ImageNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

CLASSES = ["airplane", "automobile", "bird"]


def synthetic_images(n: int, size: int, classes: int, seed: int, grey: bool = False):
    """Images whose class brightens one channel and one quadrant: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = []
    for label in labels:
        pixels = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
        half = size // 2
        rows, cols = (label // 2) % 2, label % 2
        pixels[rows * half : (rows + 1) * half, cols * half : (cols + 1) * half, label % 3] = 230
        image = PILImage.fromarray(pixels)
        images.append(image.convert("L") if grey else image)
    return images, labels.tolist()


def cifar10_like(root: Path, n_train: int = 48, n_test: int = 24) -> Path:
    """Parquet files ``train-*.parquet`` / ``test-*.parquet`` with columns img, label."""
    root.mkdir(parents=True, exist_ok=True)
    features = Features({"img": Image(), "label": ClassLabel(names=CLASSES)})
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_images(n, 32, len(CLASSES), seed)
        Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(
            str(root / f"{split}-00000-of-00001.parquet")
        )
    return root


def cifar100_like(root: Path, n_train: int = 48, n_test: int = 24) -> Path:
    """A save_to_disk DatasetDict with columns img, fine_label, coarse_label."""
    fine = [f"fine{i}" for i in range(6)]
    features = Features(
        {"img": Image(), "fine_label": ClassLabel(names=fine), "coarse_label": ClassLabel(names=["a", "b"])}
    )
    splits = {}
    for split, n, seed in (("train", n_train, 2), ("test", n_test, 3)):
        images, labels = synthetic_images(n, 32, len(fine), seed)
        splits[split] = Dataset.from_dict(
            {"img": images, "fine_label": labels, "coarse_label": [label % 2 for label in labels]},
            features=features,
        )
    DatasetDict(splits).save_to_disk(str(root))
    return root


def tiny_imagenet_like(root: Path, per_class: int = 10) -> Path:
    """An imagefolder tree train/<class>/*.png and valid/<class>/*.png of 64x64 images."""
    names = ["n01443537", "n01629819", "n01641577"]
    for split, count, seed in (("train", per_class, 4), ("valid", per_class // 2, 5)):
        images, labels = synthetic_images(count * len(names), 64, len(names), seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    return root
