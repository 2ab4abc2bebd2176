"""How a classifier is scored, the same way by train/, export/ and perf/.

Needs only numpy and scikit-learn, so perf/ can score ONNX engines without importing torch.
"""

from __future__ import annotations

import numpy as np


def score(logits: np.ndarray, labels: list[str], label_names: list[str]) -> dict:
    """Scores of float logits [n, classes] against ``labels`` (names; column i of the logits is ``label_names[i]``).

    Returns ``{"accuracy", "macro_f1"}`` (floats rounded to 5 digits, the keys every reader
    uses), plus ``per_class`` (``{name: {"precision", "recall", "f1", "support"}}`` in
    ``label_names`` order) and ``confusion_matrix`` (``{"labels": label_names, "matrix":
    rows = true class, columns = predicted class, counts}``).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    unknown = sorted(set(labels) - set(label_names))
    assert not unknown, f"labels {unknown} are not among the model's {label_names}"
    truth = np.array([label_names.index(x) for x in labels])
    preds = np.asarray(logits).argmax(axis=1)
    every = list(range(len(label_names)))
    # zero_division=0: a class never predicted has precision 0, not a warning per call.
    precision, recall, f1, support = precision_recall_fscore_support(truth, preds, labels=every, zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(truth, preds)), 5),
        # Over the classes present in truth or predictions, as the figures before per-class scores were.
        "macro_f1": round(float(f1_score(truth, preds, average="macro")), 5),
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 5),
                "recall": round(float(recall[i]), 5),
                "f1": round(float(f1[i]), 5),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": {
            "labels": list(label_names),
            "matrix": confusion_matrix(truth, preds, labels=every).tolist(),
        },
    }


def per_class_f1_text(metrics: dict) -> str:
    """``"fresh 0.84, rotten 0.82"`` from a :func:`score` result (empty if it has no per-class scores)."""
    return ", ".join(f"{name} {m['f1']:.3f}" for name, m in metrics.get("per_class", {}).items())
