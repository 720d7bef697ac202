"""zsam-hf: Z-Score Filtered Sharpness-Aware Minimization (ZSharp) for the Hugging Face Trainer."""

from .checkpoint_dirs import IncompleteCheckpointError, last_complete_checkpoint
from .config import ZSAMTrainingArguments
from .perturbation import SharpnessPerturbation
from .selection import interpolated_quantile, zscore_mask
from .trainer import ZSAMTrainer

__all__ = [
    "IncompleteCheckpointError",
    "SharpnessPerturbation",
    "ZSAMTrainer",
    "ZSAMTrainingArguments",
    "interpolated_quantile",
    "last_complete_checkpoint",
    "zscore_mask",
]
__version__ = "0.1.0"
