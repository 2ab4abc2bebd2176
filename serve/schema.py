"""The /classify request and response, parsed and written by hand: strict, and cheap per request.

    request   {"texts": ["...", ...]}   (exactly that key; 1..max_texts non-blank strings of at most
                                         max_chars characters each)
    response  [{"label": ..., "score": ..., "probabilities": {label: p, ...}}, ...]  (one per text)

A request that breaks a rule gets :class:`Invalid`, whose ``details`` use pydantic's shape
(``loc``, ``msg``, ``type``) so that clients see one format whichever layer refused; the
input itself is never echoed.  The same rules are declared to BentoML (service.py) for the
OpenAPI schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


class Invalid(Exception):
    """A request that breaks the schema; ``details`` say where and why."""

    def __init__(self, message: str, details: list[dict]):
        super().__init__(message)
        self.details = details


@dataclass(frozen=True)
class Limits:
    max_texts: int
    max_chars: int


def parse(body: bytes, limits: Limits) -> list[str]:
    """The texts of a request body, or Invalid naming every problem found."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: 10,000 nested brackets
        raise Invalid("the body is not valid JSON", [_error([], "body is not valid JSON", "json_invalid")]) from None
    if not isinstance(data, dict):
        raise Invalid("the body must be a JSON object", [_error([], "expected an object", "model_type")])
    unknown = sorted(k for k in data if k != "texts")
    errors = [_error([k], "unknown field; the request takes only 'texts'", "extra_forbidden") for k in unknown]
    texts = data.get("texts")
    if texts is None:
        errors.append(_error(["texts"], "field required", "missing"))
    elif not isinstance(texts, list):
        errors.append(_error(["texts"], "expected a list of strings", "list_type"))
    elif not 1 <= len(texts) <= limits.max_texts:
        errors.append(
            _error(
                ["texts"],
                f"expected 1 to {limits.max_texts} texts, got {len(texts)}",
                "too_short" if not texts else "too_long",
            )
        )
    else:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                errors.append(_error(["texts", i], "expected a string", "string_type"))
            elif len(text) > limits.max_chars:
                errors.append(
                    _error(["texts", i], f"text longer than {limits.max_chars} characters", "string_too_long")
                )
            elif not text.strip():
                errors.append(_error(["texts", i], "text is empty or only whitespace", "value_error"))
            elif not text.isascii() and not _encodable(text):
                errors.append(_error(["texts", i], "text holds a lone surrogate (not valid Unicode)", "string_unicode"))
    if errors:
        raise Invalid(f"{len(errors)} validation error{'s' if len(errors) > 1 else ''} in the request", errors)
    return texts


def empty_after_tokenizing(indices: list[int]) -> Invalid:
    """The refusal for texts made only of characters the tokenizer's normalizer erases."""
    details = [
        _error(
            ["texts", i],
            "text has no tokens the model knows (only zero-width, format or unknown characters)",
            "value_error",
        )
        for i in indices
    ]
    return Invalid(f"{len(details)} validation error{'s' if len(details) > 1 else ''} in the request", details)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _error(loc: list, msg: str, kind: str) -> dict:
    return {"loc": loc, "msg": msg, "type": kind}


def predictions(probs, labels: list[str]) -> bytes:
    """The response body for float probabilities [texts, labels]."""
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": labels[best], "score": row[best], "probabilities": dict(zip(labels, row, strict=True))})
    return json.dumps(out).encode()
