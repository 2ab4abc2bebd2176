"""How a variant is judged: scores, the numerical check, batch invariance, and the PyTorch reference logits.

``score`` (train/scoring.py: accuracy, macro-F1, per-class scores, confusion matrix) and
``numeric_check`` need only numpy and scikit-learn, so perf/ can score ONNX engines without
importing torch; ``batch_invariance`` runs a variant's serving classifier; the reference
functions import torch when called.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve.classifier import OnnxClassifier, softmax
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


# A served answer must not depend on what shares its model call: fp32 reorderings move
# probabilities by ~1e-7; dynamic int8 (activation scales over the whole batch) by up to 0.2.
INVARIANCE_TOLERANCE = 1e-4


def batch_invariance(
    classifier: OnnxClassifier,
    texts: list[str],
    seed: int,
    max_texts: int = 256,
    neighbours: int = 7,
    tolerance: float = INVARIANCE_TOLERANCE,
) -> dict:
    """Whether each text gets the same probabilities alone as inside batches of other texts.

    Up to ``max_texts`` of ``texts`` (a sample fixed by ``seed``) each run alone (batch of
    1), then in two arrangements, each covering every text once: random batches of
    ``neighbours + 1`` texts (different lengths and neighbours), and ``neighbours`` texts
    beside one long text of ``classifier.max_length`` tokens (made of the texts themselves),
    so that most of the batch is padding.  The same texts and seed give the same figures.

    Returns ``{"texts", "batches" (mixed model calls), "max_abs_prob_diff" (max over texts,
    arrangements and classes of |p batched - p alone|, probability units), "label_flips"
    (texts whose label differs in some arrangement), "invariant" (max_abs_prob_diff <=
    tolerance), "tolerance"}``.  Raises ValueError when ``texts`` is empty.
    """
    if not texts:
        raise ValueError("batch invariance needs at least one text")
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(texts), size=min(max_texts, len(texts)), replace=False))
    texts = [texts[i] for i in picks]
    alone = np.concatenate([_probs(classifier, [t]) for t in texts])  # [n, labels] float32
    long_text = _long_text(classifier, texts)
    worst = np.zeros(len(texts), dtype=np.float64)
    flipped = np.zeros(len(texts), dtype=bool)
    batches = 0
    for with_long in (False, True):
        order = rng.permutation(len(texts))
        size = neighbours if with_long else neighbours + 1
        for start in range(0, len(texts), size):
            idx = order[start : start + size]
            batch = [texts[i] for i in idx] + ([long_text] if with_long else [])
            probs = _probs(classifier, batch)[: len(idx)]
            worst[idx] = np.maximum(worst[idx], np.abs(probs - alone[idx]).max(axis=1))
            flipped[idx] |= probs.argmax(axis=1) != alone[idx].argmax(axis=1)
            batches += 1
    max_diff = float(worst.max())
    return {
        "texts": len(texts),
        "batches": batches,
        "max_abs_prob_diff": max_diff,
        "label_flips": int(flipped.sum()),
        "invariant": max_diff <= tolerance,
        "tolerance": tolerance,
    }


def _probs(classifier: OnnxClassifier, texts: list[str]) -> np.ndarray:
    return softmax(classifier.logits(classifier.encode(texts)))


def _long_text(classifier: OnnxClassifier, texts: list[str]) -> str:
    """The texts joined until they fill ``max_length`` tokens (a long review next to short ones)."""
    joined = ""
    for text in texts * classifier.max_length:  # each text gives at least one token
        joined = f"{joined} {text}".strip()
        if len(classifier.tokenize([joined])[0].ids) >= classifier.max_length:
            break
    return joined


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
