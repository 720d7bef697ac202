#!/usr/bin/env python
"""Train an image classifier with ZSAM (or SAM, ASAM, Friendly-SAM, or none) through the HF Trainer.

    python scripts/train_image_classification.py            # the offline demo (Fashion-MNIST subset)
    python scripts/train_image_classification.py --dataset_name uoft-cs/cifar10 --model_name_or_path cifar_resnet20
    python scripts/train_image_classification.py args.json  # or args.yaml: the same flags as a file
    python scripts/train_image_classification.py --hp_search_trials 8 --hp_search_rho 0.01:0.5  # choose rho
    accelerate launch --multi_gpu --num_processes 8 scripts/train_image_classification.py ...

Flags: --help lists them all (model, data, and every TrainingArguments/ZSAM field).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import transformers
import yaml
from transformers import HfArgumentParser

from zsam_hf import ZSAMTrainingArguments
from zsam_hf.vision.image_classification import (
    SCRIPT_DEFAULTS,
    DataArguments,
    ModelArguments,
    SetupError,
    end_process_group,
    run,
)
from zsam_hf.vision.search import SearchArguments, run_search

# With no arguments at all: ZSAM on a real dataset that ships with this machine's packages,
# small enough for a laptop CPU in a few minutes.
DEMO_ARGS = [
    "--dataset_name",
    "fashion_mnist",
    "--model_name_or_path",
    "cifar_resnet20",
    "--max_train_samples",
    "6000",
    "--max_eval_samples",
    "2000",
    "--num_train_epochs",
    "3",
    "--output_dir",
    "outputs/zsam-fashion-mnist-demo",
]


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, ZSAMTrainingArguments, SearchArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, ZSAMTrainingArguments, SearchArguments))
    parser.set_defaults(**SCRIPT_DEFAULTS)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        text = Path(argv[0]).read_text()
        values = json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text)
        return parser.parse_dict({**SCRIPT_DEFAULTS, **values})
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    if not argv:
        print(
            "No arguments: running the built-in demo, i.e.\n  python scripts/train_image_classification.py "
            + " ".join(DEMO_ARGS),
            flush=True,
        )
        argv = DEMO_ARGS
    try:
        model_args, data_args, training_args, search_args = parse(argv)
        if search_args.hp_search_trials > 0:
            search = run_search(model_args, data_args, training_args, search_args, argv=[sys.argv[0], *argv])
            print(
                f"{len(search.rows)} trials: {search.output_dir / 'hp_search.md'}, hp_search.csv, hp_search.png"
            )
            print(
                f"best: sam_rho={search.best['sam_rho']:.4g}, eval_accuracy={search.best['eval_accuracy']:.4f}"
            )
            print(f"train it with:\n  {search.command}")
            return 0
        result = run(model_args, data_args, training_args, argv=[sys.argv[0], *argv])
    except (SetupError, ValueError, FileNotFoundError) as err:  # bad arguments, found before training
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key in ("eval_accuracy", "test_accuracy"):
        if key in result.metrics:
            print(f"{key}: {result.metrics[key]:.4f}")
    print(f"Model, image processor and model card saved to {training_args.output_dir}")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        end_process_group()
    sys.exit(code)
