"""Metrics shipped with the package (loadable offline through `evaluate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOPK_ACCURACY = str(Path(__file__).parent / "topk_accuracy")


def classification_metrics():
    """``compute_metrics`` for the Trainer: top-1 (and top-5) accuracy from the eval logits."""
    import evaluate

    metric = evaluate.load(TOPK_ACCURACY)

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits = (
            eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        )
        return metric.compute(predictions=np.asarray(logits), references=np.asarray(eval_pred.label_ids))

    return compute_metrics
