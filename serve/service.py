"""serve/: the selected variant behind an authenticated, batched, observable HTTP API.

    TRIMSERVE_API_KEYS_FILE=keys.txt bentoml serve serve.service:Classifier

Reads top to bottom: read ``ServeConfig`` from ``TRIMSERVE_*`` variables and check the
selected variant's files against their sha256 (at import, see below), declare the request
limits, then the service: load the model, warm it up, classify batches.  Auth and
rejection counting are ASGI middlewares added at the end; the model itself is the
transport-free ``OnnxClassifier``.

    POST /classify  {"texts": ["...", ...]}
    -> [{"label": "fresh", "score": 0.97, "probabilities": {"fresh": 0.97, "rotten": 0.03}}, ...]

Errors are JSON: 400 (validation: empty or whitespace-only text, a non-string, an empty
list, too many texts, a text over max_text_chars, malformed JSON), 401 (auth), 429 (over
max_concurrency), 503 (queued past the batching deadline), 504 (timeout).  A text over the
model's token limit is not an error: it is truncated, like at training time, and counted
in ``trimserve_truncated_texts_total``.  Request texts and keys are never logged.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Annotated

import bentoml
from pydantic import AfterValidator, BaseModel, Field, StringConstraints, ValidationError

from serve import metrics
from serve.auth import BearerAuth
from serve.classifier import OnnxClassifier
from serve.config import ServeConfig, check_device, resolve_variant
from train.errors import UserError

logger = logging.getLogger("trimserve.serve")
logger.setLevel(logging.INFO)  # BentoML leaves the root logger at WARNING

# At import, not in __init__: `bentoml serve` imports this module before it starts any
# worker, so a bad setting or a tampered model stops the server with one line. A failure
# inside a worker would instead be respawned every 10 s for ever. `bentoml build` imports
# it too, so a bento can only be built around a verified variant.
try:
    CONFIG = ServeConfig.from_env()
    check_device(CONFIG)
    VARIANT = resolve_variant(CONFIG)
except UserError as err:
    sys.exit(f"trimserve: {err}")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    return text


Text = Annotated[str, StringConstraints(max_length=CONFIG.max_text_chars), AfterValidator(_not_blank)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=CONFIG.max_texts_per_request,
                                    description="texts to classify; each is truncated to the model's max tokens")]


class Prediction(BaseModel):
    label: str
    score: float = Field(description="probability of `label`")
    probabilities: dict[str, float] = Field(description="probability of every label")


@bentoml.service(workers=CONFIG.workers, traffic={"timeout": CONFIG.timeout_s, "max_concurrency": CONFIG.max_concurrency})
class Classifier:
    """Text classifier exported and selected by trimserve (ONNX Runtime)."""

    def __init__(self) -> None:
        start = time.perf_counter()
        self.model = OnnxClassifier(VARIANT.directory, threads=CONFIG.ort_threads, device=CONFIG.device,
                                    max_length=VARIANT.max_length, spin=CONFIG.spin)
        metrics.MODEL_INFO.labels(variant=VARIANT.name, sha256=VARIANT.model_sha256).set(1)
        self.ready = False
        logger.info("loaded %s (%d files sha256-verified, max_length %d) on %s with %d threads in %.2f s",
                    VARIANT.name, VARIANT.files, VARIANT.max_length, self.model.provider, CONFIG.ort_threads,
                    time.perf_counter() - start)

    @bentoml.on_startup
    def warm_up(self) -> None:
        # A full-length batch once, so the first real request does not pay for allocations.
        start = time.perf_counter()
        self.model.predict(["warm-up"] * (CONFIG.max_batch_size - 1) + ["warm-up " * VARIANT.max_length])
        self.ready = True
        logger.info("warm-up done in %.2f s; ready", time.perf_counter() - start)

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(batchable=CONFIG.batching, batch_dim=0, max_batch_size=CONFIG.max_batch_size,
                 max_latency_ms=CONFIG.max_latency_ms)
    def classify(self, texts: Texts) -> list[Prediction]:
        """Label, its probability and every class probability for each text, in order."""
        start = time.perf_counter()
        encoded = self.model.encode(texts)
        tokenized = time.perf_counter()
        predictions = self.model.to_predictions(self.model.logits(encoded))
        done = time.perf_counter()
        # BentoML only checks the number of requests; a short list would slice silently.
        assert len(predictions) == len(texts), (len(predictions), len(texts))
        metrics.record_batch(len(texts), encoded.inputs["attention_mask"].sum(axis=1), encoded.truncated,
                             tokenized - start, done - tokenized, [p["label"] for p in predictions])
        logger.debug("batch of %d texts, %d tokens, %d truncated: tokenize %.1f ms, infer %.1f ms", len(texts),
                     encoded.tokens, encoded.truncated, 1e3 * (tokenized - start), 1e3 * (done - tokenized))
        return predictions


class HideRequestText(logging.Filter):
    """Log a rejected request's error types and places, not the traceback BentoML logs.

    A pydantic ValidationError's message quotes the offending input, i.e. the request's text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            where = "; ".join(f"{e['type']} at {'.'.join(map(str, e['loc'])) or 'body'}"
                              for e in error.errors(include_input=False, include_context=False, include_url=False))
            record.msg, record.args = "%s -> 400: %s", (record.getMessage().replace("Exception on", "invalid request to"), where)
            record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.INFO, "INFO"
        return True


# The logger of BentoML's api_endpoint_wrapper (1.4); tests/test_serve.py checks the logs stay clean.
logging.getLogger("bentoml._internal.server.http_app").addFilter(HideRequestText())
# Outermost first: count every rejection, including the 401s of the auth inside it.
Classifier.add_asgi_middleware(metrics.CountRejections)
if CONFIG.api_keys:
    Classifier.add_asgi_middleware(BearerAuth, keys=CONFIG.api_keys, protect_metrics=CONFIG.protect_metrics)
else:
    logger.warning("TRIMSERVE_ALLOW_NO_AUTH is set: serving WITHOUT authentication")
