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

from serve import refusals

MS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

TOKENIZE_SECONDS = Histogram(
    "trimserve_tokenize_seconds",
    "Tokenizing one model batch",
    buckets=(
        0.0001,
        0.0002,
        0.0005,
    )
    + MS_BUCKETS[:8],
)
INFERENCE_SECONDS = Histogram("trimserve_inference_seconds", "ONNX Runtime run of one model batch", buckets=MS_BUCKETS)
BATCH_SIZE = Histogram(
    "trimserve_batch_size",
    "Texts per model call (adaptive batching merges requests)",
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
    "trimserve_requests", "/classify responses by HTTP status code (as trimserve's middleware saw them)", ["code"]
)
REQUEST_SECONDS = Histogram(
    "trimserve_request_seconds",
    "/classify from trimserve's middleware to the last byte sent",
    buckets=MS_BUCKETS + (10.0,),
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
# An Info metric would be natural, but BentoML's multiprocess collector refuses it;
# "max" merges the workers' identical values without a per-pid label.
MODEL_INFO = Gauge(
    "trimserve_model_info", "The variant being served (value 1)", ["variant", "sha256"], multiprocess_mode="max"
)

for _reason in refusals.TYPES:
    REJECTED.labels(reason=_reason)  # export zeros, so rate() works from the first rejection
for _result in ("ok", "error"):
    KEY_RELOADS.labels(result=_result)
CLASSIFY_PATH = "/classify"


def record_batch(
    texts: int, tokens_per_text, truncated: int, tokenize_s: float, inference_s: float, labels: list[str]
) -> None:
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
    """Pure ASGI middleware, the outermost of trimserve's: every answer is timed, counted and shaped.

    * status and duration of every /classify request, and the refusal type of every 4xx/5xx
      (it sees the 401/429 of auth and the 413/415/408/503 of the request guard too);
    * an error body produced by someone else (BentoML's validation errors, its batching
      deadline, Starlette's 404) is rewritten into serve.refusals' one shape;
    * a request not answered within ``timeout_s`` gets a 504 ``timeout`` refusal.  BentoML's
      own traffic timeout sits outside every user middleware, so the service sets it a little
      later as a backstop, and this one is what clients see.
    """

    def __init__(self, app, timeout_s: float | None = None):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, held = time.perf_counter(), None, None

        async def shaped(message):
            nonlocal status, held
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400:
                    REJECTED.labels(reason=refusals.type_for(status)).inc()
                    held = (message, [])  # small: wait for the whole body to reshape it
                    return
            elif held is not None:
                held[1].append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                message = await _reshaped(send, held, status)
            await send(message)

        outcome = None
        try:
            if self.timeout_s is None:
                await self.app(scope, receive, shaped)
            else:
                await _within(self.app(scope, receive, shaped), self.timeout_s, lambda: status is not None)
        except TimeoutError:
            status = refusals.TYPES["timeout"]
            REJECTED.labels(reason="timeout").inc()
            await refusals.reply(send, "timeout", f"not answered within {self.timeout_s:g} s")
        except asyncio.CancelledError:  # the client went away (or BentoML's backstop timeout)
            outcome = "cancelled"
            raise
        except Exception:  # Starlette's error middleware, outside this one, answers 500
            outcome = "500"
            raise
        finally:
            if scope["path"] == CLASSIFY_PATH:
                REQUESTS.labels(code=str(status) if status else outcome or "none").inc()
                REQUEST_SECONDS.observe(time.perf_counter() - start)


async def _within(call, timeout_s: float, started) -> None:
    """Run ``call``; TimeoutError (having cancelled it) if its response has not started after ``timeout_s``."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done and not started():
        task.cancel()
        raise TimeoutError
    await task


async def _reshaped(send, held: tuple[dict, list[bytes]], status: int) -> dict:
    """Send the held response start with a reshaped body's length; returns the body message."""
    start, chunks = held
    payload = refusals.reshape(status, b"".join(chunks))
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
    await send(
        {
            **start,
            "headers": headers
            + [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    return {"type": "http.response.body", "body": payload}


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
