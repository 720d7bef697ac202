"""Top-1 and top-5 accuracy from class scores, as an `evaluate` metric module.

Shipped with zsam-hf so that ``evaluate.load(<path of this folder>)`` works offline
(``evaluate.load("accuracy")`` fetches its script from the Hub).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Fraction of examples whose label is the top-scoring class (and among the 5 top-scoring classes)."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of per-class score vectors (logits or probabilities), one per example.
    references: list of integer labels.
    top_k: the k of the second accuracy reported, when there are more than k classes (default 5).
Returns:
    accuracy: top-1 accuracy in [0, 1].
    top5_accuracy: top-k accuracy, present only when there are more than k classes.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, top_k: int = 5):
        scores = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references)
        results = {"accuracy": float((scores.argmax(axis=1) == labels).mean())}
        if scores.shape[1] > top_k:
            top = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
            results[f"top{top_k}_accuracy"] = float((top == labels[:, None]).any(axis=1).mean())
        return results
