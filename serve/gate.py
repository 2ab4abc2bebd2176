"""The one ASGI middleware every request passes: auth, admission, metrics, refusals, and /classify.

In order, for ``POST /classify``:

  auth        ``Authorization: Bearer <key>`` matched against the key digests (serve/auth.py);
              401, or 429 over the key's rate limit
  size/type   a Content-Length over ``max_body_bytes`` gets 413 before a byte is read, a chunked
              body as soon as it passes the limit; anything but JSON gets 415
  slow body   a body not complete within ``body_timeout_s`` gets 408
  admission   503 with Retry-After at once when ``max_in_flight`` requests of this worker are
              being classified, or while the event loop runs more than ``max_lag_s`` behind
              (past capacity requests wait unread in socket buffers, which no count sees)
  schema      serve/schema.py: 400 for anything but ``{"texts": [...]}`` with valid texts,
              and for texts the tokenizer's normalizer erases entirely
  model       tokenized here (one text: no batch machinery), then queued for the model thread
              (serve/batching.py); 503 if it waited past the batching deadline, 504 if it is not
              answered within ``timeout_s``; a request whose client left is never started
  answer      the JSON predictions, written by hand (serve/schema.py)

Health checks and ``/schema.json`` (what BentoML's clients read before their first call, so a
wrong key shows as the 401 it is) need no key; ``/metrics`` neither unless protected.  Every
other route goes to BentoML behind auth, with its error bodies rewritten into
serve.refusals' one shape.  Metrics, refusals and the access log line are counted here, once.
Nothing here logs a key or a text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from serve import metrics, refusals, schema
from serve.auth import KeyStore, RateLimiter
from serve.batching import Engine, Overdue
from serve.classifier import content_tokens

PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/schema.json"})
CLASSIFY = "/classify"
logger = logging.getLogger("trimserve.access")


class ClientGone(Exception):
    """The client disconnected before its whole body arrived: nobody to answer."""


class Gate:
    """Pure ASGI middleware in front of BentoML's app; see the module docstring.

    ``engine`` is filled by the service once the model is loaded; ``fast_path`` False sends
    /classify on to BentoML's own route and adaptive batching (after the same checks).
    """

    def __init__(
        self,
        app,
        engine: Engine,
        limits: schema.Limits,
        keys: KeyStore | None = None,
        rate_limit: RateLimiter | None = None,
        protect_metrics: bool = False,
        max_body_bytes: int = 4 << 20,
        body_timeout_s: float = 5.0,
        max_in_flight: int = 32,
        max_lag_s: float = 0.2,
        timeout_s: float = 10.0,
        fast_path: bool = True,
        access_log: bool = True,
    ):
        self.app, self.engine, self.limits = app, engine, limits
        self.keys, self.rate_limit = keys, rate_limit
        self.public = PUBLIC_PATHS if protect_metrics else PUBLIC_PATHS | {"/metrics"}
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.max_in_flight, self.max_lag_s, self.timeout_s = max_in_flight, max_lag_s, timeout_s
        self.lag = LoopLag() if max_lag_s > 0 else None
        self.fast_path, self.access_log = fast_path, access_log
        self.in_flight = 0
        metrics.IN_FLIGHT_LIMIT.set(max_in_flight)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan and websockets pass through
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        exchange = Exchange(scope, receive, send)
        try:
            if scope["path"] == CLASSIFY and scope["method"] == "POST":
                await self._classify(exchange)
            elif scope["path"] in self.public or await self._authorized(exchange):
                if scope["path"] == "/metrics":
                    await exchange.respond(200, metrics.exposition(), metrics.CONTENT_TYPE)
                else:
                    await self._forward(exchange, exchange.receive)
        except ClientGone:
            exchange.status = None
        finally:
            if scope["path"] == CLASSIFY:
                metrics.REQUESTS.labels(code=str(exchange.status or "cancelled")).inc()
                metrics.REQUEST_SECONDS.observe(time.perf_counter() - start)
            if self.access_log and scope["path"] not in PUBLIC_PATHS:
                logger.info(
                    "%s %s %s %d bytes in, %d texts, %.1f ms",
                    scope["method"],
                    scope["path"],
                    exchange.status or "cancelled",
                    exchange.body_bytes,
                    exchange.texts,
                    1e3 * (time.perf_counter() - start),
                )

    # --- /classify ------------------------------------------------------------------------

    async def _classify(self, ex: Exchange) -> None:
        if not await self._authorized(ex):
            return
        body = await self._read_body(ex)
        if body is None or not await self._admit(ex):
            return
        self.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            await self._answer(ex, body)
        finally:
            self.in_flight -= 1
            metrics.IN_FLIGHT.dec()

    async def _answer(self, ex: Exchange, body: bytes) -> None:
        classifier = self.engine.classifier
        if not self.engine.ready:
            return await ex.refuse("overload", "the model is still loading; retry shortly", [(b"retry-after", b"1")])
        try:
            texts = schema.parse(body, self.limits)
            ex.texts = len(texts)
            started = time.perf_counter()
            encodings = classifier.tokenize(texts)
            metrics.TOKENIZE_SECONDS.observe(time.perf_counter() - started)
            empty = [i for i, e in enumerate(encodings) if content_tokens(e) == 0]
            if empty:
                raise schema.empty_after_tokenizing(empty)
        except schema.Invalid as err:
            return await ex.refuse("validation", str(err), details=err.details)
        metrics.count_texts(encodings)
        if not self.fast_path:  # BentoML's route and adaptive batching, after the same checks
            return await self._forward(ex, _replay(body, ex.receive))
        probs = await self._infer(ex, encodings)
        if probs is not None:
            metrics.count_predictions(classifier.labels, probs.argmax(axis=1))
            await ex.respond(200, schema.predictions(probs, classifier.labels), b"application/json")

    async def _infer(self, ex: Exchange, encodings: list):
        """Queue the texts for the model thread; the probabilities, or None once a refusal was sent."""
        loop = asyncio.get_running_loop()
        job = self.engine.batcher.submit(encodings, loop)
        gone = loop.create_task(ex.receive())  # returns http.disconnect when the client leaves
        done, _ = await asyncio.wait(
            {job.future, gone}, timeout=self.timeout_s - ex.elapsed(), return_when=asyncio.FIRST_COMPLETED
        )
        if job.future not in done:
            job.abandoned = True  # never started on the model if it has not been yet
            if gone in done:
                raise ClientGone
            gone.cancel()
            return await ex.refuse("timeout", f"not answered within {self.timeout_s:g} s")
        gone.cancel()
        try:
            return job.future.result()
        except Overdue:
            return await ex.refuse(
                "overload", "overloaded: queued past the batching deadline; retry shortly", [(b"retry-after", b"1")]
            )
        except Exception:  # logged by the model thread
            return await ex.refuse("internal", "an unexpected error occurred; the server log has the details")

    # --- the checks ------------------------------------------------------------------------

    async def _authorized(self, ex: Exchange) -> bool:
        """True if no keys are configured or the request carries an accepted key (else 401/429 sent)."""
        if self.keys is None:
            return True
        header = ex.header(b"authorization")
        if header is None:
            await ex.refuse("auth", "missing API key: send 'Authorization: Bearer <key>'", _challenge(b""))
            return False
        scheme, _, key = header.partition(b" ")
        identity = self.keys.match(key.strip()) if scheme.lower() == b"bearer" else None
        if identity is None:
            await ex.refuse("auth", "invalid API key", _challenge(b', error="invalid_token"'))
            return False
        if self.rate_limit is not None:
            wait = self.rate_limit.wait_s(identity)
            if wait > 0:
                await ex.refuse(
                    "rate_limit",
                    f"rate limit of {self.rate_limit.rate:g} requests/s for this key exceeded; retry later",
                    [(b"retry-after", str(math.ceil(wait)).encode())],
                )
                return False
        return True

    async def _read_body(self, ex: Exchange) -> bytes | None:
        """The whole body after the size, type and time checks, or None once a refusal was sent."""
        length = ex.header(b"content-length")
        if length is not None and not length.isdigit():
            return await ex.refuse("validation", "Content-Length is not a number")
        if length is not None and int(length) > self.max_body_bytes:
            return await ex.refuse(
                "too_large", f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes} bytes"
            )
        media_type = (ex.header(b"content-type") or b"").split(b";")[0].strip().lower()
        if media_type != b"application/json":
            return await ex.refuse(
                "unsupported_media_type", "send the body as JSON with 'Content-Type: application/json'"
            )
        try:
            body = await asyncio.wait_for(_read(ex.receive, self.max_body_bytes), self.body_timeout_s)
        except TimeoutError:
            return await ex.refuse("slow_body", f"request body not complete within {self.body_timeout_s:g} s")
        if body is None:
            return await ex.refuse("too_large", f"request body is over the limit of {self.max_body_bytes} bytes")
        ex.body_bytes = len(body)
        return body

    async def _admit(self, ex: Exchange) -> bool:
        """True if this worker takes one more request; else False, with the 503 sent."""
        if self.in_flight >= self.max_in_flight:
            await ex.refuse(
                "overload",
                f"overloaded: {self.max_in_flight} requests in progress; retry shortly",
                [(b"retry-after", b"1")],
            )
            return False
        if self.lag is not None and self.lag.seconds() > self.max_lag_s:
            await ex.refuse(
                "overload",
                f"overloaded: {1e3 * self.lag.seconds():.0f} ms behind; retry shortly",
                [(b"retry-after", b"1")],
            )
            return False
        return True

    # --- everything else: BentoML's app --------------------------------------------------------

    async def _forward(self, ex: Exchange, receive) -> None:
        """BentoML answers; its error bodies are reshaped, and a 504 comes after ``timeout_s``."""
        held: list = []

        async def shaped(message):
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                if ex.status >= 400:
                    metrics.REJECTED.labels(reason=refusals.type_for(ex.status)).inc()
                    held.append(message)  # small: wait for the whole body to reshape it
                    return
            elif held:
                held.append(message)
                if message.get("more_body", False):
                    return
                start, *parts = held
                payload = refusals.reshape(ex.status, b"".join(m.get("body", b"") for m in parts))
                headers = [
                    (k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")
                ]
                await ex.send(
                    {
                        **start,
                        "headers": [
                            *headers,
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                        ],
                    }
                )
                message = {"type": "http.response.body", "body": payload}
            await ex.send(message)

        task = asyncio.ensure_future(self.app(ex.scope, receive, shaped))
        done, _ = await asyncio.wait({task}, timeout=max(0.0, self.timeout_s - ex.elapsed()))
        if not done and ex.status is None:
            task.cancel()
            await ex.refuse("timeout", f"not answered within {self.timeout_s:g} s")
            return
        await task


class Exchange:
    """One HTTP request/response as the gate sees it: headers read once, what was answered."""

    def __init__(self, scope, receive, send):
        self.scope, self.receive, self.send = scope, receive, send
        self.headers = dict(scope["headers"])  # names arrive lower-cased
        self.start = time.perf_counter()
        self.status: int | None = None
        self.body_bytes = 0
        self.texts = 0

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    async def respond(self, status: int, body: bytes, content_type: bytes) -> None:
        self.status = status
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
            }
        )
        await self.send({"type": "http.response.body", "body": body})

    async def refuse(self, kind: str, message: str, headers=(), details=()) -> None:
        """Send a refusal of serve.refusals' closed set, and count it; returns None."""
        self.status = refusals.TYPES[kind]
        metrics.REJECTED.labels(reason=kind).inc()
        await refusals.reply(self.send, kind, message, headers, details)


def _challenge(extra: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"www-authenticate", b'Bearer realm="trimserve"' + extra)]


async def _read(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes; ClientGone if the client leaves."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then waits on the real one (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class LoopLag:
    """How late the event loop runs: a timer every ``every_s`` notes how much later than asked it fired.

    Started by the first request (it needs the running loop).  ``seconds()`` is the larger of
    the last lateness and the time the current timer is overdue, so a loop that stalls
    outright shows as behind at once.
    """

    def __init__(self, every_s: float = 0.02):
        self.every_s = every_s
        self.last_s = 0.0
        self.due = None
        self.loop = None

    def seconds(self) -> float:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # the first request (in tests, each new event loop) starts the timer
            self.loop, self.due, self.last_s = loop, None, 0.0
            loop.create_task(self._run())
            return 0.0
        overdue = loop.time() - self.due if self.due is not None else 0.0
        return max(self.last_s, overdue)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.due = loop.time() + self.every_s
            await asyncio.sleep(self.every_s)
            self.last_s = max(0.0, loop.time() - self.due)
            metrics.LOOP_LAG.set(self.last_s)
