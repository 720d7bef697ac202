"""zsam-hf: Z-Score Filtered Sharpness-Aware Minimization (ZSharp) for the Hugging Face Trainer."""

from .config import ZSAMTrainingArguments
from .perturbation import SharpnessPerturbation
from .selection import interpolated_quantile, zscore_mask
from .trainer import ZSAMTrainer

__all__ = [
    "SharpnessPerturbation",
    "ZSAMTrainer",
    "ZSAMTrainingArguments",
    "interpolated_quantile",
    "zscore_mask",
]
__version__ = "0.1.0"
