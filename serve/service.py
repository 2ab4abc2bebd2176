"""serve/: the selected variant behind an authenticated, batched, observable HTTP API.

    TRIMSERVE_API_KEYS_FILE=keys.txt bentoml serve serve.service:Classifier

Reads top to bottom: read ``ServeConfig`` from ``TRIMSERVE_*`` variables and check the
selected variant's files against their sha256 (at import, see below), declare the request
schema, then the service: load the model and start its model thread, warm it up.  Requests
go through one ASGI middleware, the gate (serve/gate.py): auth, admission, metrics and the
/classify path itself, tokenize -> queue -> model thread (serve/batching.py) -> JSON.  BentoML
runs the processes, the health, metrics and docs routes, the bento and the container; its
own ``classify`` route below documents the API and serves it when ``TRIMSERVE_FAST_PATH=0``.

    POST /classify  {"texts": ["...", ...]}
    -> [{"label": "fresh", "score": 0.97, "probabilities": {"fresh": 0.97, "rotten": 0.03}}, ...]

Every error is ``{"error": {"type", "message", "details"}}`` with a type of
serve.refusals.TYPES: validation 400 (empty or whitespace-only text, a text the tokenizer
erases entirely, a non-string, an empty list, too many texts, a text over max_text_chars,
an unknown field, malformed JSON; ``details`` says where), auth 401, slow_body 408, too_large
413, unsupported_media_type 415, rate_limit 429, overload 503 (over max_concurrency, the
event loop behind, or queued past the batching deadline), timeout 504.  A text over the
model's token limit is not an error: it is truncated, like at training time, and counted in
``trimserve_truncated_texts_total``.  Request texts and keys are never logged.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Annotated

import bentoml
from bentoml.exceptions import ServiceUnavailable
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from serve import metrics
from serve.auth import KeyStore, RateLimiter
from serve.batching import Batcher, Engine, may_share_calls
from serve.classifier import OnnxClassifier
from serve.config import ServeConfig, available_cores, check_device, gpu_of_worker, resolve_variant
from serve.contract import MODEL_FILE, UserError
from serve.gate import Gate
from serve.schema import Limits

BACKSTOP_S = 5.0  # BentoML's own timeout, after the gate's: only a backstop
UNTRACED = ["/livez", "/readyz", "/healthz", "/metrics"]
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
except UserError as err:  # one line and exit status 2, as every stage's CLI answers bad input
    print(f"trimserve: {err}", file=sys.stderr)
    sys.exit(2)

ENGINE = Engine()  # filled in each worker by Classifier.__init__, served from by the gate
# A variant whose answers depend on their batch neighbours runs one text per model call, on both paths.
INVARIANT, INVARIANCE_NOTE = may_share_calls(VARIANT.record)
BATCHING = CONFIG.batching and INVARIANT


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    return text


# The schema BentoML documents (and checks when TRIMSERVE_FAST_PATH=0); serve/schema.py applies
# the same rules on the gate's path.
Text = Annotated[str, StringConstraints(max_length=CONFIG.max_text_chars), AfterValidator(_not_blank)]
Texts = Annotated[
    list[Text],
    Field(
        min_length=1,
        max_length=CONFIG.max_texts_per_request,
        description="texts to classify; each is truncated to the model's max tokens",
    ),
]


class ClassifyRequest(BaseModel):
    """The request body: ``texts`` and nothing else (an unknown field is a 400, not ignored)."""

    model_config = ConfigDict(extra="forbid")
    texts: Texts


class Prediction(BaseModel):
    label: str
    score: float = Field(description="probability of `label`")
    probabilities: dict[str, float] = Field(description="probability of every label")


# No BentoML max_concurrency (the gate admits, answering 503 with Retry-After and counting it),
# and no BentoML access log (the gate writes one line per request, without BentoML's formatting).
@bentoml.service(
    workers=CONFIG.workers,
    traffic={"timeout": CONFIG.timeout_s + BACKSTOP_S},
    logging={"access": {"enabled": False}},
    metrics={"enabled": CONFIG.bentoml_metrics, "namespace": "bentoml_service"},
    tracing={"excluded_urls": UNTRACED if CONFIG.tracing else [*UNTRACED, "/classify"]},
)
class Classifier:
    """Text classifier exported and selected by trimserve (ONNX Runtime)."""

    def __init__(self) -> None:
        start = time.perf_counter()
        metrics.forget_dead_workers()  # a worker killed earlier left its live gauges behind
        metrics.READY.set(0)
        cores, source = available_cores()
        worker = bentoml.server_context.worker_index  # 1-based; with device cuda, worker i runs on GPU i
        self.model = OnnxClassifier.load(
            VARIANT.directory,
            VARIANT.record,
            threads=CONFIG.ort_threads,
            device=CONFIG.device,
            spin=CONFIG.spin,
            device_id=gpu_of_worker(worker) if CONFIG.device == "cuda" else 0,
        )
        ENGINE.classifier = self.model
        ENGINE.batcher = Batcher(
            self.model,
            CONFIG.max_batch_size if BATCHING else 1,
            CONFIG.max_batch_tokens,
            CONFIG.max_latency_ms / 1e3,
            merge=BATCHING,
            max_padding=CONFIG.max_padding,
        )
        metrics.MODEL_INFO.labels(variant=VARIANT.name, sha256=VARIANT.model_sha256).set(1)
        metrics.THREADS.labels(source="threads").set(CONFIG.ort_threads)
        metrics.THREADS.labels(source="cores").set(cores)
        logger.info(
            "loaded %s (%d files sha256-verified, max_length %d) on %s with %d ONNX Runtime threads "
            "(%d cores from %s) in %.2f s; worker %s of %d, %s",
            VARIANT.name,
            VARIANT.files,
            VARIANT.record.max_length,
            self.model.placement,
            CONFIG.ort_threads,
            cores,
            source,
            time.perf_counter() - start,
            worker or 1,
            CONFIG.workers,
            _batching_note(),
        )

    @bentoml.on_startup
    def warm_up(self) -> None:
        # A full-length batch once, so the first real request does not pay for allocations.
        start = time.perf_counter()
        self.model.predict(["warm-up"] * (CONFIG.max_batch_size - 1) + ["warm-up " * VARIANT.record.max_length])
        # and a lone request: on a GPU the first call of a shape pays for setup
        self.model.predict(["warm-up"])
        ENGINE.ready = True
        metrics.READY.set(1)
        logger.info(
            "warm-up done in %.2f s; ready (%s path)",
            time.perf_counter() - start,
            "trimserve" if CONFIG.fast_path else "BentoML",
        )

    def __is_ready__(self) -> bool:
        return ENGINE.ready

    @bentoml.api(
        batchable=BATCHING,
        batch_dim=0,
        max_batch_size=CONFIG.max_batch_size,
        max_latency_ms=CONFIG.max_latency_ms,
        input_spec=ClassifyRequest,
    )
    def classify(self, texts: Texts) -> list[Prediction]:
        """Label, its probability and every class probability for each text, in order."""
        # not invariant: even a request's own texts run one per call, each answered as if it came alone
        predictions = []
        for call in [texts] if INVARIANT else [[text] for text in texts]:
            start = time.perf_counter()
            predictions += self.model.predict(call)
            metrics.record_batch(len(call), time.perf_counter() - start)
        # BentoML only checks the number of requests; a short list would slice silently.
        assert len(predictions) == len(texts), (len(predictions), len(texts))
        return predictions


def _batching_note() -> str:
    """How texts share model calls, and why, for the start-up line."""
    if not INVARIANT:
        return INVARIANCE_NOTE  # "not batch-invariant (max |dprob| X): one text per model call"
    if not BATCHING:
        return f"one text per model call (TRIMSERVE_BATCHING=0); {INVARIANCE_NOTE}"
    return f"batches of up to {CONFIG.max_batch_size} texts; {INVARIANCE_NOTE}"


class QuietRejections(logging.Filter):
    """One INFO line instead of the ERROR traceback BentoML logs for a rejected request (its route only).

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


# The logger of BentoML's api_endpoint_wrapper (1.4); tests/test_serve_e2e.py checks the logs stay clean.
logging.getLogger("bentoml._internal.server.http_app").addFilter(QuietRejections())
if not CONFIG.api_keys:
    logger.warning("TRIMSERVE_ALLOW_NO_AUTH is set: serving WITHOUT authentication")
Classifier.add_asgi_middleware(
    Gate,
    engine=ENGINE,
    limits=Limits(CONFIG.max_texts_per_request, CONFIG.max_text_chars),
    keys=KeyStore(CONFIG.api_keys, path=CONFIG.api_keys_file) if CONFIG.api_keys else None,
    rate_limit=RateLimiter(CONFIG.rate_limit_rps, CONFIG.rate_limit_burst) if CONFIG.rate_limit_rps else None,
    protect_metrics=CONFIG.protect_metrics,
    max_body_bytes=CONFIG.max_body_bytes,
    body_timeout_s=CONFIG.body_timeout_s,
    max_in_flight=math.ceil(CONFIG.max_concurrency / CONFIG.workers),
    max_lag_s=CONFIG.max_lag_ms / 1e3,
    timeout_s=CONFIG.timeout_s,
    fast_path=CONFIG.fast_path,
    access_log=CONFIG.access_log,
)
