"""One factory for every image classifier, chosen by a name a user can type.

* the paper's from-scratch models: ``cifar_resnet20``, ``cifar_resnet56``, ``vgg16_bn``,
  ``vgg19_bn`` (``modeling_small_cnn.py``) and ``paper_vit`` (transformers' ViT: 7 layers,
  hidden 384, 12 heads, MLP 384, patch size suited to the image size);
* timm models, as ``timm/<name>`` (pretrained weights from the Hub where reachable) or a
  bare timm architecture name (from scratch), through ``TimmWrapperForImageClassification``;
* any ``AutoModelForImageClassification`` checkpoint, a Hub id or a local directory.

Each comes back with the preprocessing it expects (size, mean, std, channels) and an
image processor that ``save_pretrained`` writes next to the weights, so that
``AutoModelForImageClassification`` and ``AutoImageProcessor`` reload the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import timm
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)
from transformers.models.timm_wrapper import TimmWrapperImageProcessor

from .modeling_small_cnn import SmallCNNConfig, SmallCNNForImageClassification

logger = logging.getLogger(__name__)

PAPER_MODELS = {
    "cifar_resnet20": dict(architecture="cifar_resnet", depth=20),
    "cifar_resnet56": dict(architecture="cifar_resnet", depth=56),
    "vgg16_bn": dict(architecture="vgg16_bn"),
    "vgg19_bn": dict(architecture="vgg19_bn"),
    "paper_vit": None,
}


@dataclass
class Preprocessing:
    """What a model expects of its input images."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_channels: int = 3


@dataclass
class BuiltModel:
    model: PreTrainedModel
    preprocessing: Preprocessing
    image_processor: object | None  # saved with the model; None when the checkpoint's own is kept
    base_model: str | None  # the checkpoint fine-tuned from, None when trained from scratch
    pretrained: bool


class ModelNotFoundError(ValueError):
    pass


def paper_vit_patch_size(image_size: int) -> int:
    """The paper's 4x4 grid of patches on CIFAR-sized images (patch 8 at 32 px, 7 at 28 px);
    patch 8 up to 64 px (Tiny-ImageNet), 16 beyond (ImageNet-style)."""
    if image_size <= 32 and image_size % 4 == 0:
        return image_size // 4
    return 4 if image_size <= 32 else 8 if image_size <= 64 else 16


def _labels_kwargs(labels: list[str]) -> dict:
    return dict(
        num_labels=len(labels),
        id2label={i: name for i, name in enumerate(labels)},
        label2id={name: i for i, name in enumerate(labels)},
    )


def _vit_processor(prep: Preprocessing) -> ViTImageProcessor:
    return ViTImageProcessor(
        do_resize=True,
        size={"height": prep.image_size, "width": prep.image_size},
        image_mean=list(prep.mean),
        image_std=list(prep.std),
    )


def _build_paper_model(name: str, labels: list[str], prep: Preprocessing) -> BuiltModel:
    if name == "paper_vit":
        patch = paper_vit_patch_size(prep.image_size)
        if prep.image_size % patch:
            raise ValueError(
                f"paper_vit needs an image size divisible by its patch size {patch}, got {prep.image_size}"
            )
        config = ViTConfig(
            image_size=prep.image_size,
            patch_size=patch,
            num_channels=prep.num_channels,
            hidden_size=384,
            num_hidden_layers=7,
            num_attention_heads=12,
            intermediate_size=384,
            **_labels_kwargs(labels),
        )
        model = ViTForImageClassification(config)
    else:
        config = SmallCNNConfig(
            num_channels=prep.num_channels,
            image_size=prep.image_size,
            **PAPER_MODELS[name],
            **_labels_kwargs(labels),
        )
        model = SmallCNNForImageClassification(config)
    model.config._name_or_path = name
    return BuiltModel(model, prep, _vit_processor(prep), base_model=None, pretrained=False)


def is_timm_name(name: str) -> bool:
    return name.startswith("timm/") or (
        not os.path.exists(name) and "/" not in name and bool(timm.list_models(name))
    )


def _build_timm_model(
    name: str, labels: list[str], scratch_prep: Preprocessing, pretrained: bool
) -> BuiltModel:
    architecture = name.removeprefix("timm/")
    model = None
    if name.startswith("timm/") and pretrained:
        try:
            model = TimmWrapperForImageClassification.from_pretrained(
                name, ignore_mismatched_sizes=True, **_labels_kwargs(labels)
            )
        except OSError as err:  # offline, or no such repo
            logger.warning(
                "Could not load pretrained weights for %s (%s); training it from scratch.", name, err
            )
    if model is not None:
        prep = _timm_preprocessing(timm.data.resolve_data_config({}, model=model.timm_model))
        return BuiltModel(model, prep, None, base_model=name, pretrained=True)
    base_architecture = architecture.split(".")[0]
    if not timm.list_models(base_architecture):
        raise ModelNotFoundError(
            f"model_name_or_path={name!r}: timm has no architecture {base_architecture!r}"
        )
    logger.warning("Training %s from scratch (random initialization).", base_architecture)
    config = TimmWrapperConfig(architecture=base_architecture, **_labels_kwargs(labels))
    prep = scratch_prep
    config.pretrained_cfg = _timm_pretrained_cfg(prep)
    model = TimmWrapperForImageClassification(config)
    model.config._name_or_path = base_architecture
    return BuiltModel(
        model, prep, TimmWrapperImageProcessor(pretrained_cfg=config.pretrained_cfg), None, False
    )


def _timm_preprocessing(data_config: dict) -> Preprocessing:
    """Preprocessing from a timm data config (input_size = [channels, height, width])."""
    channels, _, size = data_config["input_size"]
    return Preprocessing(size, tuple(data_config["mean"]), tuple(data_config["std"]), channels)


def _timm_pretrained_cfg(prep: Preprocessing) -> dict:
    return {
        "input_size": [prep.num_channels, prep.image_size, prep.image_size],
        "mean": list(prep.mean),
        "std": list(prep.std),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }


def _build_checkpoint(
    name: str, labels: list[str], ignore_mismatched_sizes: bool, cache_dir: str | None, revision: str
) -> BuiltModel:
    try:
        config = AutoConfig.from_pretrained(name, cache_dir=cache_dir, revision=revision)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"model_name_or_path={name!r} is not a local checkpoint directory, a timm architecture, one of the "
            f"built-in models ({', '.join(PAPER_MODELS)}), nor a reachable Hub model ({err})"
        ) from err
    if config.num_labels != len(labels) and not ignore_mismatched_sizes:
        raise ValueError(
            f"model_name_or_path={name!r} has {config.num_labels} labels but the dataset has {len(labels)}: "
            "pass --ignore_mismatched_sizes to replace its classification head with a new one."
        )
    model = AutoModelForImageClassification.from_pretrained(
        name,
        cache_dir=cache_dir,
        revision=revision,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        **_labels_kwargs(labels),
    )
    processor = AutoImageProcessor.from_pretrained(name, cache_dir=cache_dir, revision=revision)
    return BuiltModel(
        model, _processor_preprocessing(processor, config), processor, base_model=name, pretrained=True
    )


def _processor_preprocessing(processor, config) -> Preprocessing:
    size = getattr(processor, "size", None) or {}
    if isinstance(processor, TimmWrapperImageProcessor):
        return _timm_preprocessing(processor.data_config)
    image_size = size.get("height") or size.get("shortest_edge") or getattr(config, "image_size", 224)
    crop = getattr(processor, "crop_size", None) or {}
    image_size = crop.get("height", image_size)
    return Preprocessing(
        int(image_size),
        tuple(processor.image_mean),
        tuple(processor.image_std),
        int(getattr(config, "num_channels", 3)),
    )


def build_model(
    name: str,
    labels: list[str],
    scratch_preprocessing: Preprocessing,
    *,
    pretrained: bool = True,
    ignore_mismatched_sizes: bool = False,
    cache_dir: str | None = None,
    revision: str = "main",
) -> BuiltModel:
    """The classifier called ``name``, with a head of ``len(labels)`` classes.

    ``scratch_preprocessing`` (the dataset's own size, mean and std) is used by the models
    trained from scratch; pretrained checkpoints bring their own.
    """
    if name in PAPER_MODELS:
        return _build_paper_model(name, labels, scratch_preprocessing)
    if os.path.isdir(name):
        return _build_checkpoint(name, labels, ignore_mismatched_sizes, cache_dir, revision)
    if is_timm_name(name):
        return _build_timm_model(name, labels, scratch_preprocessing, pretrained)
    return _build_checkpoint(name, labels, ignore_mismatched_sizes, cache_dir, revision)
