"""The SAM-family hyper-parameters, added on top of any ``TrainingArguments`` class.

``with_zsam_arguments(SFTConfig)`` is ``SFTConfig`` plus the SAM fields: a dataclass whose only
new fields are the SAM ones, so every field of the base class keeps the base class's own default
(re-declaring them, as ``class C(ZSAMTrainingArguments, SFTConfig)`` does, would reset SFTConfig's
defaults to TrainingArguments'). ``ZSAMTrainingArguments`` is that construction over
``TrainingArguments``.

Every field becomes a command-line flag through ``HfArgumentParser`` (its ``help`` is the
``--help`` text), and every value is checked in ``__post_init__`` before the base class's own
checks, so a bad flag fails before any model or dataset is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .capturable import CAPTURABLE_VARIANTS
from .perturbation import DEFAULT_RHO, NORMALIZATIONS, VARIANTS


def _invalid(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: {allowed}.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class _SAMFields:
    """The SAM-family fields alone (a template: ``with_zsam_arguments`` adds them to a base class)."""

    sam_variant: str = field(
        default="zsam",
        metadata={
            "help": f"Sharpness-aware variant, one of {', '.join(VARIANTS)} ('none' = plain Trainer step; "
            "'random' = the control: as many entries as zsam keeps, chosen at random)."
        },
    )
    sam_rho: float | None = field(
        default=None,
        metadata={
            "help": "Perturbation radius rho > 0. Default: 0.05 for zsam/sam/fsam/random, 0.5 for asam."
        },
    )
    zsam_quantile: float = field(
        default=0.95,
        metadata={"help": "ZSAM Q_p in [0, 1): keep gradient entries whose |z-score| exceeds this quantile."},
    )
    zsam_normalization: str = field(
        default="global",
        metadata={
            "help": "Normalization of e for zsam, sam and random: 'global' (paper's formula, ||e|| = rho) or "
            "'tensor' (released code: each weight tensor's e has norm rho)."
        },
    )
    asam_eta: float = field(default=0.01, metadata={"help": "ASAM eta >= 0 in T = |w| + eta."})
    fsam_sigma: float = field(
        default=1.0, metadata={"help": "Friendly-SAM sigma: weight of the removed EMA."}
    )
    fsam_lambda: float = field(default=0.9, metadata={"help": "Friendly-SAM EMA decay lambda in [0, 1)."})
    sam_interval: int = field(
        default=1,
        metadata={
            "help": "Run the two-pass sharpness-aware step on optimizer steps whose index is a multiple of "
            "this (1 = every step); the other steps are the plain Trainer step."
        },
    )
    sam_start: float = field(
        default=0,
        metadata={
            "help": "Take the two-pass step only from this optimizer step on: a whole number (a step index; "
            "0 = from the start) or a fraction in (0, 1) of the run's total optimizer steps (0.75 = the "
            "last quarter, late-phase SAM). Composes with sam_interval, counted from this step."
        },
    )
    sam_sync_ascent: bool | None = field(
        default=None,
        metadata={
            "help": "All-reduce the ascent gradient across replicas before building e. Default (unset): "
            "per-replica ascent under DDP (the SAM paper's m-sharpness); under FSDP2 the ascent gradient "
            "is always the averaged one (every rank gathers the same weights), so False is refused there."
        },
    )
    sam_capturable: bool = field(
        default=False,
        metadata={
            "help": "Take the ascent with no host synchronization (zsam and sam only): every decision on the "
            "device and w + e in one reused buffer per parameter, so a GPU step runs under "
            "torch.cuda.set_sync_debug_mode('error'). The same weights as the default path, at SAM's memory "
            "between the passes (instead of 0.1-0.15x the parameters for zsam). Not under FSDP2."
        },
    )


def first_sharpness_step(sam_start: float, max_steps: int) -> int:
    """The first optimizer step (0-based) that takes the two-pass step: ``sam_start`` itself, or that
    fraction of the run's ``max_steps`` rounded up."""
    if 0 < sam_start < 1:
        return math.ceil(sam_start * max_steps)
    return int(sam_start)


def sharpness_step_count(sam_start: float, sam_interval: int, max_steps: int) -> int:
    """How many of a run's ``max_steps`` optimizer steps take the two-pass step (steps s, s + k, ...
    from s = ``first_sharpness_step``): what a schedule costs, machine load aside."""
    return len(range(first_sharpness_step(sam_start, max_steps), max_steps, sam_interval))


class ZSAMArgumentsMixin:
    """Validation, defaults and helpers of the SAM fields, for any ``TrainingArguments`` class.

    SAM family:
        sam_variant: "zsam" (default), "sam", "asam", "fsam", "random" (the control: as many
            entries per weight tensor as zsam keeps, drawn at random each step from (seed, step)),
            or "none" (the plain Trainer step).
        sam_rho: radius of the ascent step; None picks the variant's default
            (0.05 for zsam/sam/fsam, 0.5 for asam).
        sam_interval: the two-pass step runs on every this-many-th optimizer step (default 1:
            every step), counted from ``sam_start``; the others are the plain Trainer step.
        sam_start: the two-pass step only from this optimizer step on: a whole number (a step
            index, default 0), or a fraction in (0, 1) of the run's optimizer steps (0.75: the
            last quarter, "late-phase SAM").
        sam_sync_ascent: all-reduce the ascent gradient across replicas. Unset (None): each DDP
            replica perturbs with its own gradient, as in the SAM paper; under FSDP2 the ascent
            gradient is the averaged one (the only possibility), and False is refused.
        sam_capturable: the ascent with no host synchronization (zsam and sam): the same weights,
            decided on the device, at SAM's memory between the passes (not under FSDP2).
    ZSAM:
        zsam_quantile: Q_p; entries with |z| above this quantile are kept (0.95 keeps 5%).
        zsam_normalization: "global" (the paper: ||e|| = rho) or "tensor" (released code: each
            weight tensor's e has norm rho); applies to zsam, random and sam.
    ASAM / Friendly-SAM:
        asam_eta, fsam_sigma, fsam_lambda.
    """

    _zsam_base: type = TrainingArguments  # the class the SAM fields were added to

    def __post_init__(self):
        self._validate_sam_fields()
        if self.sam_rho is None:
            self.sam_rho = DEFAULT_RHO[self.sam_variant]
        super().__post_init__()

    def _validate_sam_fields(self) -> None:
        if self.sam_variant not in VARIANTS:
            raise _invalid("sam_variant", self.sam_variant, f"expected one of {', '.join(VARIANTS)}")
        if self.sam_rho is not None and not (_is_number(self.sam_rho) and self.sam_rho > 0):
            raise _invalid(
                "sam_rho", self.sam_rho, "expected a finite number > 0 (or None for the variant default)"
            )
        if not (_is_number(self.zsam_quantile) and 0 <= self.zsam_quantile < 1):
            raise _invalid(
                "zsam_quantile", self.zsam_quantile, "expected a number in [0, 1) (0.95 keeps the top 5%)"
            )
        if self.zsam_normalization not in NORMALIZATIONS:
            raise _invalid(
                "zsam_normalization", self.zsam_normalization, f"expected one of {', '.join(NORMALIZATIONS)}"
            )
        if not (_is_number(self.asam_eta) and self.asam_eta >= 0):
            raise _invalid("asam_eta", self.asam_eta, "expected a finite number >= 0")
        if not (_is_number(self.fsam_sigma) and self.fsam_sigma >= 0):
            raise _invalid("fsam_sigma", self.fsam_sigma, "expected a finite number >= 0")
        if not (_is_number(self.fsam_lambda) and 0 <= self.fsam_lambda < 1):
            raise _invalid("fsam_lambda", self.fsam_lambda, "expected a number in [0, 1)")
        if (
            isinstance(self.sam_interval, bool)
            or not isinstance(self.sam_interval, int)
            or self.sam_interval < 1
        ):
            raise _invalid("sam_interval", self.sam_interval, "expected a whole number >= 1 (1 = every step)")
        if (
            not _is_number(self.sam_start)
            or self.sam_start < 0
            or (self.sam_start >= 1 and self.sam_start != int(self.sam_start))
        ):
            raise _invalid(
                "sam_start",
                self.sam_start,
                "expected a whole number of optimizer steps >= 0, or a fraction of the run in (0, 1)",
            )
        if self.sam_start >= 1:
            self.sam_start = int(self.sam_start)  # "--sam_start 500" parses as 500.0
        if self.sam_sync_ascent is not None and not isinstance(self.sam_sync_ascent, bool):
            raise _invalid("sam_sync_ascent", self.sam_sync_ascent, "expected True, False or None (unset)")
        if not isinstance(self.sam_capturable, bool):
            raise _invalid("sam_capturable", self.sam_capturable, "expected True or False")
        if self.sam_capturable and self.sam_variant not in CAPTURABLE_VARIANTS + ("none",):
            raise _invalid(
                "sam_capturable",
                self.sam_capturable,
                f"the ascent without host synchronization covers sam_variant {' and '.join(CAPTURABLE_VARIANTS)}, "
                f"not {self.sam_variant!r} (the others read the host each step): set sam_capturable=False",
            )

    def __getstate__(self) -> dict:
        """Pickles (``training_args.bin``, saved with every checkpoint and uploaded with it)
        never carry the Hub token: it stays in memory, where push_to_hub uses it."""
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    def __reduce__(self):
        # Rebuilt through with_zsam_arguments(base), so a class made at run time unpickles too.
        return _rebuild_arguments, (self._zsam_base, self.__getstate__())

    def sam_start_step(self, max_steps: int) -> int:
        """The first optimizer step that takes the two-pass step, in a run of ``max_steps`` steps."""
        return first_sharpness_step(self.sam_start, max_steps)

    def sam_hyperparameters(self) -> dict:
        """The SAM-family settings that matter for this variant (for cards and logs)."""
        params = {"sam_variant": self.sam_variant}
        if self.sam_variant == "none":
            return params
        params.update(
            sam_rho=self.sam_rho,
            sam_interval=self.sam_interval,
            sam_start=self.sam_start,
            sam_sync_ascent=self.sam_sync_ascent,
        )
        if self.sam_variant in ("zsam", "random"):
            params.update(zsam_quantile=self.zsam_quantile, zsam_normalization=self.zsam_normalization)
        elif self.sam_variant == "sam" and self.zsam_normalization != "global":
            params.update(zsam_normalization=self.zsam_normalization)
        elif self.sam_variant == "asam":
            params.update(asam_eta=self.asam_eta)
        elif self.sam_variant == "fsam":
            params.update(fsam_sigma=self.fsam_sigma, fsam_lambda=self.fsam_lambda)
        return params


_ARGUMENTS_CLASSES: dict[type, type] = {}


def with_zsam_arguments(base: type, name: str | None = None) -> type:
    """``base`` (a ``TrainingArguments`` subclass) plus the SAM fields; the same class for the same base.

    Only the SAM fields are declared on the new class, so every field of ``base`` keeps ``base``'s
    default and ``base.__post_init__`` still runs (after the SAM fields are checked).
    """
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise TypeError(f"with_zsam_arguments expects a TrainingArguments subclass, got {base!r}")
    if issubclass(base, ZSAMArgumentsMixin):
        return base
    if base not in _ARGUMENTS_CLASSES:
        sam_fields = [(f.name, f.type, f) for f in dataclasses.fields(_SAMFields)]
        cls = dataclasses.make_dataclass(
            name or f"ZSAM{base.__name__}",
            [(n, t, dataclasses.field(default=f.default, metadata=f.metadata)) for n, t, f in sam_fields],
            bases=(ZSAMArgumentsMixin, base),
            namespace={"_zsam_base": base, "__module__": __name__},
        )
        cls.__doc__ = f"{base.__name__} plus the SAM-family fields.\n\n" + (ZSAMArgumentsMixin.__doc__ or "")
        _ARGUMENTS_CLASSES[base] = cls
    return _ARGUMENTS_CLASSES[base]


def _rebuild_arguments(base: type, state: dict):
    cls = with_zsam_arguments(base)
    args = cls.__new__(cls)
    args.__dict__.update(state)
    return args


ZSAMTrainingArguments = with_zsam_arguments(TrainingArguments, "ZSAMTrainingArguments")
ZSAMTrainingArguments.__doc__ = "TrainingArguments for :class:`~zsam_hf.ZSAMTrainer`.\n\n" + (
    ZSAMArgumentsMixin.__doc__ or ""
)
