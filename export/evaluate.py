"""How a variant is judged: scores, the numerical check, and the PyTorch reference logits.

``score`` (train/scoring.py: accuracy, macro-F1, per-class scores, confusion matrix) and
``numeric_check`` need only numpy and scikit-learn, so perf/ can score ONNX engines without
importing torch; the reference functions import torch when called.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.scoring import score

# Numerical check tolerances per kind of variant, against the PyTorch model it came from.
# fp32 exports differ by float reordering only; fusions approximate GELU/LayerNorm a little;
# int8 moves logits visibly, so for it the label agreement is what counts.
TOLERANCES = {
    "fp32": {"max_abs_logit_diff": 1e-3, "min_label_agreement": 0.999},
    "optimized": {"max_abs_logit_diff": 2e-2, "min_label_agreement": 0.995},
    "fp16": {"max_abs_logit_diff": 5e-2, "min_label_agreement": 0.99},
    "int8": {"max_abs_logit_diff": 2.5, "min_label_agreement": 0.95},
}


def numeric_check(logits: np.ndarray, reference: np.ndarray, tolerance: dict) -> dict:
    """Compare a variant's logits [n, classes] with its PyTorch model's on the same texts.

    ``tolerance`` is one of :data:`TOLERANCES`.  Returns the label agreement (share of equal
    argmax), the max |logit difference|, the tolerance, ``passed`` and the sample count.
    """
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    max_diff = float(np.abs(logits - reference).max())
    return {
        "label_agreement": round(agreement, 5),
        "max_abs_logit_diff": max_diff,
        "tolerance": tolerance,
        "passed": bool(agreement >= tolerance["min_label_agreement"] and max_diff <= tolerance["max_abs_logit_diff"]),
        "samples": int(len(logits)),
    }


@dataclass
class Reference:
    """A PyTorch model's float32 logits [n, classes] on validation and test, and its scores there."""

    validation: np.ndarray
    test: np.ndarray
    validation_metrics: dict
    test_metrics: dict


def torch_reference(model, tokenizer, splits, max_length: int, batch_size: int = 64) -> Reference:
    """Logits and scores of a PyTorch classifier on ``splits.validation`` and ``splits.test``."""
    logits = {}
    metrics = {}
    for part in ("validation", "test"):
        frame = getattr(splits, part)
        logits[part] = batched_torch_logits(model, tokenizer, frame["text"].tolist(), max_length, batch_size)
        metrics[part] = score(logits[part], frame["label"].tolist(), splits.label_names)
    return Reference(logits["validation"], logits["test"], metrics["validation"], metrics["test"])


def batched_torch_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """float32 logits [len(texts), classes] of a PyTorch classifier, in batches padded to their longest text."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            out.append(model(**batch).logits.float().numpy())
    return np.concatenate(out)
