"""serve/: the selected variant behind an authenticated, batched, observable HTTP API.

    TRIMSERVE_API_KEYS_FILE=keys.txt bentoml serve serve.service:Classifier

Reads top to bottom: read ``ServeConfig`` from ``TRIMSERVE_*`` variables and check the
selected variant's files against their sha256 (at import, see below), declare the request
limits, then the service: load the model, warm it up, classify batches.  Metrics, auth and
the request guard (body size, content type, admission) are ASGI middlewares added at the
end; the model itself is the transport-free ``OnnxClassifier``.

    POST /classify  {"texts": ["...", ...]}
    -> [{"label": "fresh", "score": 0.97, "probabilities": {"fresh": 0.97, "rotten": 0.03}}, ...]

Every error is ``{"error": {"type", "message", "details"}}`` with a type of
serve.refusals.TYPES: validation 400 (empty or whitespace-only text, a non-string, an empty
list, too many texts, a text over max_text_chars, malformed JSON; ``details`` says where),
auth 401, slow_body 408, too_large 413, unsupported_media_type 415, rate_limit 429, overload
503 (over max_concurrency, or queued past the batching deadline), timeout 504.  A text over the
model's token limit is not an error: it is truncated, like at training time, and counted
in ``trimserve_truncated_texts_total``.  Request texts and keys are never logged.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Annotated

import bentoml
from bentoml.exceptions import ServiceUnavailable
from pydantic import AfterValidator, BaseModel, Field, StringConstraints, ValidationError

from serve import metrics
from serve.auth import BearerAuth, KeyStore, RateLimiter
from serve.classifier import OnnxClassifier
from serve.config import ServeConfig, check_device, gpu_of_worker, resolve_variant
from serve.contract import MODEL_FILE, UserError
from serve.guard import RequestGuard
from serve.metrics import RequestMetrics

BACKSTOP_S = 5.0
logger = logging.getLogger("trimserve.serve")
logging.getLogger("trimserve").setLevel(logging.INFO)  # BentoML leaves the root logger at WARNING

# At import, not in __init__: `bentoml serve` imports this module before it starts any
# worker, so a bad setting or a tampered model stops the server with one line. A failure
# inside a worker would instead be respawned every 10 s for ever. `bentoml build` imports
# it too, so a bento can only be built around a verified variant.
try:
    CONFIG = ServeConfig.from_env()
    VARIANT = resolve_variant(CONFIG)
    check_device(CONFIG, VARIANT.directory / MODEL_FILE)
except UserError as err:
    sys.exit(f"trimserve: {err}")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    return text


Text = Annotated[str, StringConstraints(max_length=CONFIG.max_text_chars), AfterValidator(_not_blank)]
Texts = Annotated[
    list[Text],
    Field(
        min_length=1,
        max_length=CONFIG.max_texts_per_request,
        description="texts to classify; each is truncated to the model's max tokens",
    ),
]


class Prediction(BaseModel):
    label: str
    score: float = Field(description="probability of `label`")
    probabilities: dict[str, float] = Field(description="probability of every label")


# No BentoML max_concurrency: trimserve's RequestGuard limits admission itself, answering 503
# with Retry-After and counting it (BentoML's 429 happens outside every user middleware).
# BentoML's timeout is only a backstop: RequestMetrics answers timeouts first, in trimserve's shape.
@bentoml.service(workers=CONFIG.workers, traffic={"timeout": CONFIG.timeout_s + BACKSTOP_S})
class Classifier:
    """Text classifier exported and selected by trimserve (ONNX Runtime)."""

    def __init__(self) -> None:
        start = time.perf_counter()
        metrics.forget_dead_workers()  # a worker killed earlier left its live gauges behind
        metrics.READY.set(0)
        worker = bentoml.server_context.worker_index  # 1-based; with device cuda, worker i runs on GPU i
        self.model = OnnxClassifier.load(
            VARIANT.directory,
            VARIANT.record,
            threads=CONFIG.ort_threads,
            device=CONFIG.device,
            spin=CONFIG.spin,
            device_id=gpu_of_worker(worker) if CONFIG.device == "cuda" else 0,
        )
        metrics.MODEL_INFO.labels(variant=VARIANT.name, sha256=VARIANT.model_sha256).set(1)
        self.ready = False
        logger.info(
            "loaded %s (%d files sha256-verified, max_length %d) on %s with %d threads in %.2f s; worker %s of %d, "
            "batches of up to %d texts",
            VARIANT.name,
            VARIANT.files,
            VARIANT.record.max_length,
            self.model.placement,
            CONFIG.ort_threads,
            time.perf_counter() - start,
            worker or 1,
            CONFIG.workers,
            CONFIG.max_batch_size,
        )

    @bentoml.on_startup
    def warm_up(self) -> None:
        # A full-length batch once, so the first real request does not pay for allocations.
        start = time.perf_counter()
        self.model.predict(["warm-up"] * (CONFIG.max_batch_size - 1) + ["warm-up " * VARIANT.record.max_length])
        self.model.predict(["warm-up"])  # and a lone request: on a GPU the first call of a shape pays for setup
        self.ready = True
        metrics.READY.set(1)
        logger.info("warm-up done in %.2f s; ready", time.perf_counter() - start)

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(
        batchable=CONFIG.batching,
        batch_dim=0,
        max_batch_size=CONFIG.max_batch_size,
        max_latency_ms=CONFIG.max_latency_ms,
    )
    def classify(self, texts: Texts) -> list[Prediction]:
        """Label, its probability and every class probability for each text, in order."""
        start = time.perf_counter()
        encoded = self.model.encode(texts)
        tokenized = time.perf_counter()
        predictions = self.model.to_predictions(self.model.logits(encoded))
        done = time.perf_counter()
        # BentoML only checks the number of requests; a short list would slice silently.
        assert len(predictions) == len(texts), (len(predictions), len(texts))
        metrics.record_batch(
            len(texts),
            encoded.inputs["attention_mask"].sum(axis=1),
            encoded.truncated,
            tokenized - start,
            done - tokenized,
            [p["label"] for p in predictions],
        )
        logger.debug(
            "batch of %d texts, %d tokens, %d truncated: tokenize %.1f ms, infer %.1f ms",
            len(texts),
            encoded.tokens,
            encoded.truncated,
            1e3 * (tokenized - start),
            1e3 * (done - tokenized),
        )
        return predictions


class QuietRejections(logging.Filter):
    """One INFO line instead of the ERROR traceback BentoML logs for a rejected request.

    A pydantic ValidationError's message quotes the offending input, i.e. the request's text:
    the line names the error types and places only.  A ServiceUnavailable is the batching
    deadline (503) under overload: a traceback per request would flood the log exactly then.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            where = "; ".join(
                f"{e['type']} at {'.'.join(map(str, e['loc'])) or 'body'}"
                for e in error.errors(include_input=False, include_context=False, include_url=False)
            )
            self._one_line(record, "invalid request to", f"400: {where}")
        elif isinstance(error, ServiceUnavailable):
            self._one_line(
                record, "overload:", f"503: queued work would miss the {CONFIG.max_latency_ms} ms batching deadline"
            )
        return True

    @staticmethod
    def _one_line(record: logging.LogRecord, what: str, outcome: str) -> None:
        record.msg, record.args = "%s -> %s", (record.getMessage().replace("Exception on", what), outcome)
        record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.INFO, "INFO"


# The logger of BentoML's api_endpoint_wrapper (1.4); tests/test_serve.py checks the logs stay clean.
logging.getLogger("bentoml._internal.server.http_app").addFilter(QuietRejections())
# Outermost first: RequestMetrics sees every answer, including the 401/429 of auth and the
# 413/415/408/503 of the guard; auth runs before the guard reads any body.
Classifier.add_asgi_middleware(RequestMetrics, timeout_s=CONFIG.timeout_s)
if CONFIG.api_keys:
    rate_limit = RateLimiter(CONFIG.rate_limit_rps, CONFIG.rate_limit_burst) if CONFIG.rate_limit_rps else None
    Classifier.add_asgi_middleware(
        BearerAuth,
        keys=KeyStore(CONFIG.api_keys, path=CONFIG.api_keys_file),
        protect_metrics=CONFIG.protect_metrics,
        rate_limit=rate_limit,
    )
else:
    logger.warning("TRIMSERVE_ALLOW_NO_AUTH is set: serving WITHOUT authentication")
Classifier.add_asgi_middleware(
    RequestGuard,
    max_body_bytes=CONFIG.max_body_bytes,
    max_in_flight=math.ceil(CONFIG.max_concurrency / CONFIG.workers),
    body_timeout_s=CONFIG.body_timeout_s,
    max_lag_s=CONFIG.max_lag_ms / 1e3,
)
