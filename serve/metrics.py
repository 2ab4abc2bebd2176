"""trimserve's Prometheus metrics, and the /metrics page that shows them next to BentoML's own.

Plain module-level prometheus_client objects: BentoML runs workers in multiprocess mode and
the page sums them over workers.  Buckets are explicit and millisecond-scale because a
MiniLM batch takes milliseconds, not the seconds prometheus_client's defaults are made for.
One histogram per stage of a request: tokenize, queue (waiting for the model thread),
inference (one model call), and the whole request.  Labels only take small fixed sets of
values (class labels, refusal types, status codes), never request text.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import generate_latest

from serve import refusals

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
US_BUCKETS = (0.0001, 0.0002, 0.0005)
MS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

TOKENIZE_SECONDS = Histogram(
    "trimserve_tokenize_seconds", "Tokenizing one request's texts", buckets=US_BUCKETS + MS_BUCKETS[:8]
)
QUEUE_SECONDS = Histogram(
    "trimserve_queue_seconds",
    "From a request's texts being queued to the model thread taking them",
    buckets=US_BUCKETS + MS_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "trimserve_inference_seconds", "One model call: padding, ONNX Runtime, softmax", buckets=US_BUCKETS + MS_BUCKETS
)
BATCH_SIZE = Histogram(
    "trimserve_batch_size",
    "Texts per model call (batching merges requests)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INPUT_TOKENS = Histogram(
    "trimserve_input_tokens",
    "Tokens per text after truncation (sum: tokens processed)",
    buckets=(8, 16, 32, 64, 128, 256, 512),
)
TRUNCATED = Counter("trimserve_truncated_texts", "Texts longer than the model's max length, cut to it")
PREDICTIONS = Counter("trimserve_predictions", "Predictions by predicted label", ["label"])
REJECTED = Counter("trimserve_rejected_requests", "Requests refused, by reason (serve.refusals.TYPES)", ["reason"])
REQUESTS = Counter(
    "trimserve_requests", "/classify answers by HTTP status code, or 'cancelled' (the client left)", ["code"]
)
REQUEST_SECONDS = Histogram(
    "trimserve_request_seconds", "/classify from the gate to the last byte sent", buckets=MS_BUCKETS + (10.0,)
)
# Gauges in multiprocess mode: "livesum" adds up the workers that are alive, "livemin" is 0
# while any live worker is not ready. A killed worker's values are removed at the next start
# (see forget_dead_workers), since it never got to remove them itself.
IN_FLIGHT = Gauge(
    "trimserve_in_flight_requests", "/classify requests admitted and not yet answered", multiprocess_mode="livesum"
)
IN_FLIGHT_LIMIT = Gauge(
    "trimserve_in_flight_limit", "Admitted /classify requests at most; more get 503", multiprocess_mode="livesum"
)
LOOP_LAG = Gauge(
    "trimserve_event_loop_lag_seconds",
    "How late the worker's event loop ran its last 20 ms timer "
    "(max over workers); past capacity requests queue here, unread",
    multiprocess_mode="livemax",
)
READY = Gauge(
    "trimserve_ready", "1 once the model is loaded and warmed up (min over workers)", multiprocess_mode="livemin"
)
API_KEYS = Gauge("trimserve_api_keys", "Bearer keys accepted now", multiprocess_mode="max")
KEY_RELOADS = Counter("trimserve_api_key_reloads", "Re-reads of the keys file after it changed, by result", ["result"])
# An Info metric would be natural, but the multiprocess collector refuses it;
# "max" merges the workers' identical values without a per-pid label.
MODEL_INFO = Gauge(
    "trimserve_model_info", "The variant being served (value 1)", ["variant", "sha256"], multiprocess_mode="max"
)
THREADS = Gauge(
    "trimserve_onnxruntime_threads",
    "ONNX Runtime intra-op threads per worker, and the cores they were sized from",
    ["source"],
    multiprocess_mode="max",
)

for _reason in refusals.TYPES:
    REJECTED.labels(reason=_reason)  # export zeros, so rate() works from the first rejection
for _result in ("ok", "error"):
    KEY_RELOADS.labels(result=_result)
_PREDICTED: dict[str, Counter] = {}


def record_batch(texts: int, inference_s: float) -> None:
    """One model call: its size (texts) and its time (seconds)."""
    BATCH_SIZE.observe(texts)
    INFERENCE_SECONDS.observe(inference_s)


def count_texts(encodings: list) -> None:
    """Tokens per text and truncations of one request's encodings."""
    for e in encodings:
        INPUT_TOKENS.observe(len(e.ids))
        if e.overflowing:
            TRUNCATED.inc()


def count_predictions(labels: list[str], best) -> None:
    """One count per predicted label index in ``best``."""
    for index in best.tolist():
        counter = _PREDICTED.get(labels[index])
        if counter is None:
            counter = _PREDICTED[labels[index]] = PREDICTIONS.labels(label=labels[index])
        counter.inc()


def exposition() -> bytes:
    """The /metrics page: every worker's series summed (BentoML's and trimserve's), in the canonical order.

    Each histogram's samples come as its ``_bucket`` series (ascending ``le``), then ``_count``,
    then ``_sum``, per label set: the text format's order, which strict parsers (fluent-bit,
    OpenMetrics validators) require.  prometheus_client's multiprocess collector emits ``_sum``
    first, and BentoML's own page sorts a copy it then does not print.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
    else:
        registry = REGISTRY
    return generate_latest(_Canonical(registry))


class _Canonical:
    """A registry view whose histograms list their samples in the text format's order."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            if family.type == "histogram":
                family.samples.sort(key=_histogram_order)
            yield family


def _histogram_order(sample) -> tuple:
    labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
    suffix = sample.name.rsplit("_", 1)[-1]
    rank = {"bucket": 0, "count": 1, "sum": 2}.get(suffix, 3)
    return labels, rank, float(sample.labels.get("le", 0)) if rank == 0 else 0.0


def forget_dead_workers() -> None:
    """Drop the live-gauge files of worker processes that no longer exist (killed, never cleaned up)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:  # alive, someone else's
            pass
