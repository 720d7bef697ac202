"""Image classification with ZSAMTrainer: data, models, metrics and the shared training run.

Importing this package registers the built-in from-scratch CNNs (``cifar_resnet20``,
``cifar_resnet56``, ``vgg16_bn``, ``vgg19_bn``) with ``AutoConfig`` and
``AutoModelForImageClassification``, so a saved one reloads in a fresh process::

    import zsam_hf.vision
    model = AutoModelForImageClassification.from_pretrained("outputs/my-resnet20")

Without that import (on the Hub, say) their checkpoints carry their modeling file and load
with ``trust_remote_code=True``. This ``__init__`` needs only torch and transformers; the rest
of the package (data, models, the run) needs the ``vision`` extra: ``pip install "zsam-hf[vision]"``.
"""

from transformers import AutoConfig, AutoModelForImageClassification

from .modeling_small_cnn import SmallCNNConfig, SmallCNNForImageClassification

AutoConfig.register(SmallCNNConfig.model_type, SmallCNNConfig, exist_ok=True)
AutoModelForImageClassification.register(SmallCNNConfig, SmallCNNForImageClassification, exist_ok=True)
# save_pretrained then writes the modeling file and an auto_map next to the weights (remote code).
SmallCNNConfig.register_for_auto_class()
SmallCNNForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["SmallCNNConfig", "SmallCNNForImageClassification"]
