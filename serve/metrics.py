"""trimserve's Prometheus metrics, served at /metrics next to BentoML's own ``bentoml_service_*``.

Plain module-level prometheus_client objects: BentoML runs workers in multiprocess mode and
sums them over workers.  Buckets are explicit and millisecond-scale because a MiniLM batch
takes milliseconds, not the seconds prometheus_client's defaults are made for.  Labels only
take small fixed sets of values (class labels, rejection reasons), never request text.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, multiprocess

MS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

TOKENIZE_SECONDS = Histogram("trimserve_tokenize_seconds", "Tokenizing one model batch",
                             buckets=(0.0001, 0.0002, 0.0005,) + MS_BUCKETS[:8])
INFERENCE_SECONDS = Histogram("trimserve_inference_seconds", "ONNX Runtime run of one model batch", buckets=MS_BUCKETS)
BATCH_SIZE = Histogram("trimserve_batch_size", "Texts per model call (adaptive batching merges requests)",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
INPUT_TOKENS = Histogram("trimserve_input_tokens", "Tokens per text after truncation (sum: tokens processed)",
                         buckets=(8, 16, 32, 64, 128, 256, 512))
TRUNCATED = Counter("trimserve_truncated_texts", "Texts longer than the model's max length, cut to it")
PREDICTIONS = Counter("trimserve_predictions", "Predictions by predicted label", ["label"])
REJECTED = Counter("trimserve_rejected_requests", "Requests refused, by reason", ["reason"])
REQUESTS = Counter("trimserve_requests", "/classify responses by HTTP status code (as trimserve's middleware saw them)",
                   ["code"])
REQUEST_SECONDS = Histogram("trimserve_request_seconds", "/classify from trimserve's middleware to the last byte sent",
                            buckets=MS_BUCKETS + (10.0,))
# Gauges in multiprocess mode: "livesum" adds up the workers that are alive, "livemin" is 0
# while any live worker is not ready. A killed worker's values are removed at the next start
# (see forget_dead_workers), since it never got to remove them itself.
IN_FLIGHT = Gauge("trimserve_in_flight_requests", "/classify requests admitted and not yet answered",
                  multiprocess_mode="livesum")
IN_FLIGHT_LIMIT = Gauge("trimserve_in_flight_limit", "Admitted /classify requests at most; more get 503",
                        multiprocess_mode="livesum")
LOOP_LAG = Gauge("trimserve_event_loop_lag_seconds", "How late the worker's event loop ran its last 20 ms timer "
                 "(max over workers); past capacity requests queue here, unread", multiprocess_mode="livemax")
READY = Gauge("trimserve_ready", "1 once the model is loaded and warmed up (min over workers)",
              multiprocess_mode="livemin")
API_KEYS = Gauge("trimserve_api_keys", "Bearer keys accepted now", multiprocess_mode="max")
KEY_RELOADS = Counter("trimserve_api_key_reloads", "Re-reads of the keys file after it changed, by result", ["result"])
# An Info metric would be natural, but BentoML's multiprocess collector refuses it;
# "max" merges the workers' identical values without a per-pid label.
MODEL_INFO = Gauge("trimserve_model_info", "The variant being served (value 1)", ["variant", "sha256"],
                   multiprocess_mode="max")

# What a status code says about a rejection. BentoML's own 504 (timeout) is answered outside
# user middlewares: it shows in bentoml_service_request_total only.
REASONS = {401: "auth", 403: "auth", 400: "validation", 422: "validation", 408: "slow_body", 413: "too_large",
           415: "unsupported_media_type", 429: "rate_limit", 503: "overload"}
for _reason in set(REASONS.values()):
    REJECTED.labels(reason=_reason)  # export zeros, so rate() works from the first rejection
for _result in ("ok", "error"):
    KEY_RELOADS.labels(result=_result)
CLASSIFY_PATH = "/classify"


def record_batch(texts: int, tokens_per_text, truncated: int, tokenize_s: float, inference_s: float,
                 labels: list[str]) -> None:
    """Everything about one model call; ``tokens_per_text`` is an iterable of ints."""
    BATCH_SIZE.observe(texts)
    TOKENIZE_SECONDS.observe(tokenize_s)
    INFERENCE_SECONDS.observe(inference_s)
    for n in tokens_per_text:
        INPUT_TOKENS.observe(n)
    if truncated:
        TRUNCATED.inc(truncated)
    for label in labels:
        PREDICTIONS.labels(label=label).inc()


class RequestMetrics:
    """Pure ASGI middleware: status, duration and rejection reason of every /classify request.

    Outermost of trimserve's middlewares, so it sees the 401/429 of auth and the 413/415/503
    of the request guard as well as the service's own answers.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), None

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status in REASONS:
                    REJECTED.labels(reason=REASONS[status]).inc()
            await send(message)

        outcome = None
        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:  # BentoML's timeout (it answers 504 itself) or a client gone
            outcome = "cancelled"
            raise
        except Exception:  # Starlette's error middleware, outside this one, answers 500
            outcome = "500"
            raise
        finally:
            if scope["path"] == CLASSIFY_PATH:
                REQUESTS.labels(code=str(status) if status else outcome or "none").inc()
                REQUEST_SECONDS.observe(time.perf_counter() - start)


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
