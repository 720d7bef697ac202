"""zsam-hf: Z-Score Filtered Sharpness-Aware Minimization (ZSharp) for the Hugging Face Trainer."""

from .checkpoint_dirs import IncompleteCheckpointError, last_complete_checkpoint
from .config import ZSAMArgumentsMixin, ZSAMTrainingArguments, with_zsam_arguments
from .mixin import ZSAMTrainerMixin
from .optim import ZSAM
from .perturbation import SharpnessPerturbation
from .selection import interpolated_quantile, zscore_mask
from .sharding import end_process_group
from .trainer import ZSAMSeq2SeqTrainer, ZSAMSeq2SeqTrainingArguments, ZSAMTrainer, with_zsam

__all__ = [
    "IncompleteCheckpointError",
    "SharpnessPerturbation",
    "ZSAM",
    "ZSAMArgumentsMixin",
    "ZSAMSeq2SeqTrainer",
    "ZSAMSeq2SeqTrainingArguments",
    "ZSAMTrainer",
    "ZSAMTrainerMixin",
    "ZSAMTrainingArguments",
    "end_process_group",
    "interpolated_quantile",
    "last_complete_checkpoint",
    "with_zsam",
    "with_zsam_arguments",
    "zscore_mask",
]
__version__ = "0.1.0"
