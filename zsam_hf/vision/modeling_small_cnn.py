"""The paper's from-scratch CNNs for small images, as transformers models.

CIFAR ResNet-20/56 (He et al. 2016, section 4.2: 3 stages of 3x3 basic blocks with 16, 32
and 64 channels, identity shortcuts with zero-padding "option A") and VGG-16/19 with batch
norm, the CIFAR variant (conv stacks of the original VGG, one 512 -> classes linear head).

They are ``PreTrainedModel`` subclasses so that ``save_pretrained``, ``from_pretrained``,
``push_to_hub`` and the Auto classes work.  This file imports only torch and transformers:
``save_pretrained`` copies it next to the weights, so a checkpoint on the Hub loads with
``AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

VGG_LAYOUTS = {
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19_bn": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


class SmallCNNConfig(PretrainedConfig):
    """Configuration of a CIFAR ResNet (depth 6n+2) or a CIFAR VGG-BN.

    Args:
        architecture: "cifar_resnet" or one of ``VGG_LAYOUTS`` ("vgg16_bn", "vgg19_bn").
        depth: ResNet depth, 6n + 2 (20, 56, 110, ...).
        num_channels: input channels.
        image_size: the input size the model was trained at (for the image processor).
    """

    model_type = "zsam_small_cnn"

    def __init__(
        self,
        architecture: str = "cifar_resnet",
        depth: int = 20,
        num_channels: int = 3,
        image_size: int = 32,
        **kwargs,
    ):
        if architecture != "cifar_resnet" and architecture not in VGG_LAYOUTS:
            raise ValueError(
                f"architecture={architecture!r}: expected 'cifar_resnet' or one of {list(VGG_LAYOUTS)}"
            )
        if architecture == "cifar_resnet" and (depth - 2) % 6 != 0:
            raise ValueError(f"depth={depth}: a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110)")
        self.architecture = architecture
        self.depth = depth
        self.num_channels = num_channels
        self.image_size = image_size
        super().__init__(**kwargs)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes if (stride != 1 or in_planes != planes) else 0
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: subsample and zero-pad channels (no parameters), as in the ResNet paper's CIFAR nets."""
        if not self.pad:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _cifar_resnet(depth: int, num_channels: int) -> tuple[nn.Module, int]:
    blocks_per_stage = (depth - 2) // 6
    layers: list[nn.Module] = [
        nn.Conv2d(num_channels, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
    ]
    in_planes = 16
    for stage, planes in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_BasicBlock(in_planes, planes, stride))
            in_planes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 64


def _cifar_vgg(layout: list, num_channels: int) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    in_planes = num_channels
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(in_planes, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
            in_planes = item
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), in_planes


class SmallCNNForImageClassification(PreTrainedModel):
    """A CIFAR ResNet or VGG-BN with a linear head; returns ``ImageClassifierOutput``."""

    config_class = SmallCNNConfig
    main_input_name = "pixel_values"
    base_model_prefix = "features"

    def __init__(self, config: SmallCNNConfig):
        super().__init__(config)
        if config.architecture == "cifar_resnet":
            self.features, width = _cifar_resnet(config.depth, config.num_channels)
        else:
            self.features, width = _cifar_vgg(VGG_LAYOUTS[config.architecture], config.num_channels)
        self.classifier = nn.Linear(width, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Kaiming-normal convolutions and linear layers (He et al.), unit BatchNorm."""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(
                module.weight, mode="fan_out" if isinstance(module, nn.Conv2d) else "fan_in"
            )
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        logits = self.classifier(self.features(pixel_values))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)
