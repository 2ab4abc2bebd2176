"""The request guard: what a /classify request must pass before BentoML parses it.

One pure ASGI middleware, inside auth (so nobody unauthenticated gets this far):

  size        a Content-Length over ``max_body_bytes`` gets 413 before a byte is read; a body
              without one (chunked) is read up to the limit and gets 413 past it.  BentoML
              itself has no limit: it would read and parse a body of any size.
  type        a content type other than JSON gets 415 (BentoML would parse text/plain as JSON).
  slow body   a body not complete within ``body_timeout_s`` gets 408, so a client that
              trickles bytes cannot hold a slot.
  admission   at most ``max_in_flight`` requests of this worker are being classified; one more
              gets 503 with Retry-After at once, instead of queueing towards a timeout.  The
              body is read before a slot is taken, so slots are only held for model work.
  lag         when the event loop runs more than ``max_lag_s`` behind, new requests get 503
              too.  Past capacity the queue is not in front of the model but in front of this
              middleware: requests wait in socket buffers for the busy event loop to read them,
              which no in-flight count can see.  A timer that measures how late it fires does.

Every refusal is one of serve.refusals' types; RequestMetrics outside counts it.
"""

from __future__ import annotations

import asyncio

from serve import metrics
from serve.refusals import reply

JSON_TYPES = ("application/json",)


class RequestGuard:
    def __init__(
        self,
        app,
        max_body_bytes: int,
        max_in_flight: int,
        body_timeout_s: float = 10.0,
        max_lag_s: float = 0.0,
        path: str = metrics.CLASSIFY_PATH,
    ):
        self.app = app
        self.lag = LoopLag() if max_lag_s > 0 else None
        self.max_lag_s = max_lag_s
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.body_timeout_s = body_timeout_s
        self.path = path
        self.in_flight = 0
        metrics.IN_FLIGHT_LIMIT.set(max_in_flight)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # header names arrive lower-cased
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await reply(send, "validation", "Content-Length is not a number")
        if length is not None and int(length) > self.max_body_bytes:
            return await reply(
                send,
                "too_large",
                f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes} bytes",
            )
        if scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)  # health, metrics, docs; BentoML answers 405 for GET here
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media_type.decode("latin-1") not in JSON_TYPES:
            return await reply(
                send, "unsupported_media_type", "send the body as JSON with 'Content-Type: application/json'"
            )
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
        except TimeoutError:
            return await reply(send, "slow_body", f"request body not complete within {self.body_timeout_s:g} s")
        except ClientGone:
            return None
        if body is None:
            return await reply(send, "too_large", f"request body is over the limit of {self.max_body_bytes} bytes")
        if self.in_flight >= self.max_in_flight:
            return await reply(
                send,
                "overload",
                f"overloaded: {self.max_in_flight} requests in progress; retry shortly",
                [(b"retry-after", b"1")],
            )
        if self.lag is not None and self.lag.seconds() > self.max_lag_s:
            return await reply(
                send,
                "overload",
                f"overloaded: {1e3 * self.lag.seconds():.0f} ms behind; retry shortly",
                [(b"retry-after", b"1")],
            )
        self.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            return await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1
            metrics.IN_FLIGHT.dec()

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


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
        self.task = None

    def seconds(self) -> float:
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.task = loop.create_task(self._run())
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


class ClientGone(Exception):
    """The client disconnected before sending its whole body: nobody to answer."""


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
