"""The front doors for Trainers: ``ZSAMTrainer``, ``with_zsam(AnyTrainer, ItsArguments)``, Seq2Seq.

Each is :class:`~zsam_hf.mixin.ZSAMTrainerMixin` over a host Trainer class, paired with the host's
arguments class plus the SAM fields (:func:`~zsam_hf.config.with_zsam_arguments`). TRL stays
optional: nothing here imports it; ``with_zsam(SFTTrainer, SFTConfig)`` builds its pair on demand.
"""

from __future__ import annotations

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from .config import ZSAMTrainingArguments, with_zsam_arguments
from .mixin import ZSAMTrainerMixin

_PAIRS: dict[tuple[type, type], tuple[type, type]] = {}


def with_zsam(trainer_class: type, arguments_class: type | None = None) -> tuple[type, type]:
    """``(trainer class, arguments class)``: ``trainer_class`` with the two-pass step, and
    ``arguments_class`` (default ``TrainingArguments``) plus the SAM fields.

    The trainer keeps everything its class does (its loss, its training-step contexts, its logs);
    the arguments keep every default and every ``__post_init__`` check of their class. The same
    inputs give the same classes::

        from trl import SFTConfig, SFTTrainer
        ZSAMSFTTrainer, ZSAMSFTConfig = zsam_hf.with_zsam(SFTTrainer, SFTConfig)
        trainer = ZSAMSFTTrainer(model=model, args=ZSAMSFTConfig(output_dir="out"), train_dataset=data)
    """
    arguments_class = TrainingArguments if arguments_class is None else arguments_class
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"with_zsam expects a transformers Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, ZSAMTrainerMixin):
        raise TypeError(f"{trainer_class.__name__} already takes the two-pass step (it has ZSAMTrainerMixin)")
    key = (trainer_class, arguments_class)
    if key not in _PAIRS:
        arguments = with_zsam_arguments(arguments_class)
        trainer = type(
            f"ZSAM{trainer_class.__name__}",
            (ZSAMTrainerMixin, trainer_class),
            {
                "_zsam_arguments_class": arguments,
                "__module__": __name__,
                "__doc__": f"{trainer_class.__name__} with the two-pass sharpness-aware step; takes "
                f"{arguments.__name__}.\n\n" + (ZSAMTrainerMixin.__doc__ or ""),
            },
        )
        _PAIRS[key] = (trainer, arguments)
    return _PAIRS[key]


class ZSAMTrainer(ZSAMTrainerMixin, Trainer):
    """A drop-in ``Trainer`` that trains with ZSAM (or SAM, ASAM, Friendly-SAM).

    Pass :class:`~zsam_hf.ZSAMTrainingArguments` as ``args``; everything else is the Trainer's
    constructor. ``with_zsam(Trainer, TrainingArguments)`` returns this pair.
    """

    _zsam_arguments_class = ZSAMTrainingArguments


class ZSAMSeq2SeqTrainer(ZSAMTrainerMixin, Seq2SeqTrainer):
    """``Seq2SeqTrainer`` (translation, summarization; ``predict_with_generate``) with the two-pass step."""

    _zsam_arguments_class = with_zsam_arguments(Seq2SeqTrainingArguments, "ZSAMSeq2SeqTrainingArguments")


ZSAMSeq2SeqTrainingArguments = ZSAMSeq2SeqTrainer._zsam_arguments_class
_PAIRS[(Trainer, TrainingArguments)] = (ZSAMTrainer, ZSAMTrainingArguments)
_PAIRS[(Seq2SeqTrainer, Seq2SeqTrainingArguments)] = (ZSAMSeq2SeqTrainer, ZSAMSeq2SeqTrainingArguments)
