"""trimserve's Prometheus metrics, served at /metrics next to BentoML's own ``bentoml_service_*``.

Plain module-level prometheus_client objects: BentoML runs workers in multiprocess mode and
sums them over workers.  Buckets are explicit and millisecond-scale because a MiniLM batch
takes milliseconds, not the seconds prometheus_client's defaults are made for.  Labels only
take small fixed sets of values (class labels, rejection reasons), never request text.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
# An Info metric would be natural, but BentoML's multiprocess collector refuses it;
# "max" merges the workers' identical values without a per-pid label.
MODEL_INFO = Gauge("trimserve_model_info", "The variant being served (value 1)", ["variant", "sha256"],
                   multiprocess_mode="max")

# Which rejections this middleware can see: BentoML answers 429 (max_concurrency) and
# 504 (timeout) outside user middlewares; those appear in bentoml_service_request_total.
REASONS = {401: "auth", 403: "auth", 400: "validation", 413: "validation", 415: "validation", 422: "validation",
           429: "overload", 503: "overload"}
for _reason in set(REASONS.values()):
    REJECTED.labels(reason=_reason)  # export zeros, so rate() works from the first rejection


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


class CountRejections:
    """Pure ASGI middleware counting the 4xx/503 responses of everything inside it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def watch(message):
            if message["type"] == "http.response.start" and message["status"] in REASONS:
                REJECTED.labels(reason=REASONS[message["status"]]).inc()
            await send(message)

        await self.app(scope, receive, watch)
