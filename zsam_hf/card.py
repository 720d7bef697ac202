"""Model cards for models trained with ZSAMTrainer, filled from ``model_cards/`` at save time.

The Trainer's own card lists neither the SAM hyper-parameters (fields of a
TrainingArguments subclass) nor anything right for a model trained from scratch
("fine-tuned version of []"); this one does both, with the command that reproduces the
run (secrets redacted) and the papers' BibTeX.
"""

from __future__ import annotations

import platform
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import yaml

# The template lives in the repository's model_cards/; a wheel carries it as zsam_hf/model_cards/
# (see pyproject.toml), while a source checkout or an editable install reads it in place.
_TEMPLATE_DIRS = (Path(__file__).resolve().parent / "model_cards", Path(__file__).resolve().parent.parent / "model_cards")
TEMPLATE = next((d for d in _TEMPLATE_DIRS if d.is_dir()), _TEMPLATE_DIRS[-1]) / "zsam_image_classification.md"
SECRET_FLAGS = ("--hub_token", "--token", "--hf_token")

METHOD_NAMES = {
    "zsam": "Z-Score Filtered Sharpness-Aware Minimization (ZSAM / ZSharp)",
    "sam": "Sharpness-Aware Minimization (SAM)",
    "asam": "Adaptive Sharpness-Aware Minimization (ASAM)",
    "fsam": "Friendly Sharpness-Aware Minimization (F-SAM)",
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
    "none": "No ascent step: a plain Trainer run, kept as a baseline.",
}


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
    dataset_split: str | None = None
    base_model: str | None = None
    license: str = "apache-2.0"
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> {metric: value}
    command: str | None = None
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str | None = "image-classification"


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and "/" in name and not name.startswith((".", "/", "~"))


def _metadata(ctx: CardContext) -> str:
    meta: dict = {"library_name": "transformers", "license": ctx.license}
    if ctx.pipeline_tag:
        meta["pipeline_tag"] = ctx.pipeline_tag
    variant = ctx.sam.get("sam_variant", "zsam")
    meta["tags"] = list(
        dict.fromkeys(["zsam", "sharpness-aware-minimization", f"{variant}", "zsam-hf", *ctx.tags])
    )
    if _is_hub_id(ctx.dataset):
        meta["datasets"] = [ctx.dataset]
    if _is_hub_id(ctx.base_model):
        meta["base_model"] = ctx.base_model
    meta["metrics"] = ["accuracy"]
    results = []
    for split, values in ctx.metrics.items():
        metrics = [
            {"type": kind, "name": f"{split} {label}", "value": round(values[key], 4)}
            for key, kind, label in (
                ("accuracy", "accuracy", "accuracy"),
                ("top5_accuracy", "top-5-accuracy", "top-5 accuracy"),
            )
            if key in values
        ]
        if metrics:
            dataset = {
                "name": ctx.dataset_display or ctx.dataset or "custom",
                "type": ctx.dataset or "custom",
                "split": split,
            }
            task = {"type": "image-classification", "name": "Image Classification"}
            results.append({"task": task, "dataset": dataset, "metrics": metrics})
    if results:
        meta["model-index"] = [{"name": ctx.model_name, "results": results}]
    return yaml.safe_dump(meta, sort_keys=False).strip()


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
    import accelerate
    import datasets
    import torch
    import transformers

    from . import __version__

    return "\n".join(
        f"- {name} {version}"
        for name, version in (
            ("zsam-hf", __version__), ("Transformers", transformers.__version__), ("PyTorch", torch.__version__),
            ("Datasets", datasets.__version__), ("Accelerate", accelerate.__version__), ("Python", platform.python_version()),
        )
    )  # fmt: skip


def render_model_card(ctx: CardContext) -> str:
    """The card's Markdown, from the template in ``model_cards/``."""
    variant = ctx.sam.get("sam_variant", "zsam")
    if _is_hub_id(ctx.base_model):
        origin = f"This model is a fine-tuned version of [{ctx.base_model}](https://huggingface.co/{ctx.base_model})"
    elif ctx.base_model:
        origin = f"This model is a fine-tuned version of `{ctx.base_model}`"
    else:
        origin = f"This model (`{ctx.training.get('architecture', ctx.model_name)}`) was trained from scratch"
    return Template(TEMPLATE.read_text()).substitute(
        metadata=_metadata(ctx),
        model_name=ctx.model_name,
        origin=origin,
        dataset_display=ctx.dataset_display or ctx.dataset or "a custom dataset",
        method_name=METHOD_NAMES[variant],
        results=_results(ctx),
        method_paragraph=METHOD_PARAGRAPHS[variant],
        sam_table=_table(ctx.sam),
        training_table=_table(ctx.training),
        command=ctx.command or "(not recorded)",
        versions=_versions(),
    )
