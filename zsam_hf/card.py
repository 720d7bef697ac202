"""Model cards for models trained with ZSAMTrainer, built with huggingface_hub's card classes.

The Trainer's own card lists neither the SAM hyper-parameters (fields of a
TrainingArguments subclass) nor anything right for a model trained from scratch
("fine-tuned version of []"). This one does both, for any task: the metadata and the
model-index come from ``ModelCardData`` and ``EvalResult`` (so the Hub reads them), the
text from the template that ships inside the package (``model_cards/`` in the repository),
with the command that reproduces the run (secrets redacted) and the papers' BibTeX.
"""

from __future__ import annotations

import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# The template lives in the repository's model_cards/; a wheel carries it as zsam_hf/model_cards/
# (see pyproject.toml), while a source checkout or an editable install reads it in place.
_TEMPLATE_DIRS = (
    Path(__file__).resolve().parent / "model_cards",
    Path(__file__).resolve().parent.parent / "model_cards",
)
TEMPLATE = next((d for d in _TEMPLATE_DIRS if d.is_dir()), _TEMPLATE_DIRS[-1]) / "zsam_model_card.md"
SECRET_FLAGS = ("--hub_token", "--token", "--hf_token")

METHOD_NAMES = {
    "zsam": "Z-Score Filtered Sharpness-Aware Minimization (ZSAM / ZSharp)",
    "sam": "Sharpness-Aware Minimization (SAM)",
    "asam": "Adaptive Sharpness-Aware Minimization (ASAM)",
    "fsam": "Friendly Sharpness-Aware Minimization (F-SAM)",
    "random": "the random-mask control of ZSAM (random entries at ZSAM's density)",
    "none": "the base optimizer alone (no sharpness-aware step)",
}
METHOD_PARAGRAPHS = {
    "zsam": (
        "Each step takes the gradient g, keeps in every weight tensor only the entries whose z-score "
        "|g - mean g| / std g is above the `zsam_quantile` quantile, climbs to w + e with e = rho g~ / ||g~|| "
        "(`global`: one norm over all tensors, the paper's formula; `tensor`: each weight tensor on its own, "
        "the authors' code), takes the gradient there and lets the base optimizer step with it from w."
    ),
    "sam": "Each step climbs to w + rho g / ||g||, takes the gradient there and steps from w with it.",
    "asam": "Each step climbs to w + rho T^2 g / ||T g|| with T = |w| + eta on weights, and steps from w.",
    "fsam": "Each step removes sigma times an EMA of past gradients from g before SAM's ascent.",
    "random": (
        "A control, not a method: each step keeps in every weight tensor as many gradient entries as ZSAM's "
        "z-score filter would, chosen uniformly at random, and climbs to w + e built from them as ZSAM builds it."
    ),
    "none": "No ascent step: a plain Trainer run, kept as a baseline.",
}
# The Hub's task of a model, from the end of its class name (the usual transformers heads).
TASKS_BY_HEAD = {
    "ForImageClassification": "image-classification",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForCausalLM": "text-generation",
    "ForConditionalGeneration": "text2text-generation",  # T5, BART, Marian ...
    "ForSeq2SeqLM": "text2text-generation",
    "ForMaskedLM": "fill-mask",
    "ForAudioClassification": "audio-classification",
}


def task_of(model) -> str | None:
    """The Hub task of a model (``image-classification``, ...) from its head, or None if unknown."""
    base = getattr(model, "get_base_model", None)  # a PEFT wrapper: look at the model inside
    name = type(base() if callable(base) else model).__name__
    return next((task for head, task in TASKS_BY_HEAD.items() if name.endswith(head)), None)


def redact_command(argv: list[str]) -> str:
    """The command line as a shell string, with token values replaced by <redacted>."""
    words, hide_next = [], False
    for word in argv:
        if hide_next:
            words.append("<redacted>")
            hide_next = False
            continue
        flag, sep, _ = word.partition("=")
        if flag in SECRET_FLAGS:
            words.append(f"{flag}=<redacted>" if sep else flag)
            hide_next = not sep
        else:
            words.append(word)
    return shlex.join(words)


@dataclass
class CardContext:
    model_name: str
    sam: dict
    training: dict
    dataset: str | None = None  # Hub id (for metadata) or local description
    dataset_display: str | None = None
    base_model: str | None = None
    license: str = "apache-2.0"
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> {metric: value}
    command: str | None = None
    tags: list[str] = field(default_factory=list)
    task: str | None = None  # the Hub's pipeline tag, e.g. "image-classification"
    trainer_name: str = "ZSAMTrainer"


def pretrained_name(model) -> str | None:
    """The checkpoint a model was loaded from (its config's name or path), None if built from scratch."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def card_training_rows(args, model, global_step: int) -> dict:
    """The base optimizer, schedule and batch settings of a run, as the card's table shows them."""
    optimizer = args.optim.value if hasattr(args.optim, "value") else str(args.optim)
    if "adam" in optimizer:
        optimizer += f" (betas=({args.adam_beta1}, {args.adam_beta2}), eps={args.adam_epsilon})"
    scheduler = args.lr_scheduler_type
    rows = {
        "architecture": pretrained_name(model) or type(model).__name__,
        "optimizer": optimizer,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": scheduler.value if hasattr(scheduler, "value") else scheduler,
        "warmup_steps": args.warmup_steps,
        "train_batch_size (per device)": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_devices": args.world_size,
        "total_train_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size,
    }
    if args.max_steps <= 0:
        rows["num_epochs"] = args.num_train_epochs
    else:
        rows["max_steps"] = args.max_steps
    rows.update(
        max_grad_norm=args.max_grad_norm,
        mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        seed=args.seed,
    )
    if global_step:
        rows["optimizer steps run"] = global_step
    return rows


_NOT_CARD_METRICS = (
    "loss",
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "epoch",
    "model_preparation_time",
)


def card_metrics(log_history: list[dict], eval_split: str) -> dict[str, dict[str, float]]:
    """The latest evaluation of each split in the logs: {"validation": {"accuracy": ...}, "test": {...}}.

    Every metric ``compute_metrics`` returned is kept; loss and speed figures are not.
    """
    metrics: dict[str, dict[str, float]] = {}
    for entry in log_history:
        for prefix, split in (("eval_", eval_split), ("test_", "test")):
            found = {
                k[len(prefix) :]: v
                for k, v in entry.items()
                if k.startswith(prefix) and isinstance(v, (int, float)) and not k.endswith(_NOT_CARD_METRICS)
            }
            if found:
                metrics[split] = found
    return metrics


def is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and "/" in name and not name.startswith((".", "/", "~"))


def _eval_results(ctx: CardContext) -> list[EvalResult]:
    dataset = ctx.dataset or "custom"
    return [
        EvalResult(
            task_type=ctx.task or "other",
            dataset_type=dataset,
            dataset_name=ctx.dataset_display or dataset,
            dataset_split=split,
            metric_type=metric,
            metric_name=f"{split} {metric.replace('_', ' ')}",
            metric_value=round(float(value), 4),
        )
        for split, values in ctx.metrics.items()
        for metric, value in values.items()
    ]


def card_data(ctx: CardContext) -> ModelCardData:
    """The card's metadata: library, license, tags, task, base model, datasets, model-index."""
    variant = ctx.sam.get("sam_variant", "zsam")
    results = _eval_results(ctx)
    return ModelCardData(
        library_name="transformers",
        license=ctx.license,
        pipeline_tag=ctx.task,
        tags=list(dict.fromkeys(["zsam-hf", "sharpness-aware-minimization", variant, *ctx.tags])),
        datasets=[ctx.dataset] if is_hub_id(ctx.dataset) else None,
        base_model=ctx.base_model if is_hub_id(ctx.base_model) else None,
        metrics=sorted({r.metric_type for r in results}) or None,
        model_name=ctx.model_name,
        eval_results=results or None,
    )


def _table(rows: dict) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in rows.items())


def _results(ctx: CardContext) -> str:
    if not ctx.metrics:
        return "No evaluation was run."
    lines = ["| split | metric | value |", "|---|---|---|"]
    for split, values in ctx.metrics.items():
        lines += [f"| {split} | {name} | {value:.4f} |" for name, value in values.items()]
    return "\n".join(lines)


def _versions() -> str:
    """The versions of what trained the model: zsam-hf's own dependencies, plus Datasets if it was used."""
    import accelerate
    import torch
    import transformers

    from . import __version__

    versions = [
        ("zsam-hf", __version__),
        ("Transformers", transformers.__version__),
        ("PyTorch", torch.__version__),
        ("Accelerate", accelerate.__version__),
    ]
    datasets = sys.modules.get("datasets")  # never imported just for the card
    if datasets is not None:
        versions.append(("Datasets", datasets.__version__))
    versions.append(("Python", platform.python_version()))
    return "\n".join(f"- {name} {version}" for name, version in versions)


def _origin(ctx: CardContext) -> str:
    if is_hub_id(ctx.base_model):
        return f"This model is a fine-tuned version of [{ctx.base_model}](https://huggingface.co/{ctx.base_model})"
    if ctx.base_model:
        return f"This model is a fine-tuned version of `{ctx.base_model}`"
    return f"This model (`{ctx.training.get('architecture', ctx.model_name)}`) was trained from scratch"


def build_model_card(ctx: CardContext) -> ModelCard:
    """The card (metadata and text) from the template that ships with the package."""
    variant = ctx.sam.get("sam_variant", "zsam")
    return ModelCard.from_template(
        card_data(ctx),
        template_path=str(TEMPLATE),
        model_name=ctx.model_name,
        origin=_origin(ctx),
        dataset_display=ctx.dataset_display or ctx.dataset,
        method_name=METHOD_NAMES[variant],
        results=_results(ctx),
        method_paragraph=METHOD_PARAGRAPHS[variant],
        sam_table=_table(ctx.sam),
        training_table=_table(ctx.training),
        command=ctx.command or "(not recorded)",
        versions=_versions(),
        trainer_name=ctx.trainer_name,
    )


def render_model_card(ctx: CardContext) -> str:
    """The card's Markdown (front matter and text)."""
    return str(build_model_card(ctx))
