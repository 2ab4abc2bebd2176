"""Bearer-key auth as one pure ASGI middleware, so no handler ever checks a key.

Every HTTP request outside the health endpoints (and ``/metrics`` unless protected) needs
``Authorization: Bearer <key>`` with one of the configured keys; anything else gets a 401
JSON body and a ``WWW-Authenticate`` header.  Keys are compared in constant time against
every key, so neither timing nor which key matched leaks.  Nothing here logs.
"""

from __future__ import annotations

import hmac
import json
from typing import Iterable

HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz"})


class BearerAuth:
    def __init__(self, app, keys: Iterable[str], protect_metrics: bool = False):
        self.app = app
        # bytes, because hmac.compare_digest raises on non-ASCII str
        self.keys = tuple(k.encode() for k in keys)
        if not self.keys:
            raise ValueError("BearerAuth needs at least one key")
        self.exempt = HEALTH_PATHS if protect_metrics else HEALTH_PATHS | {"/metrics"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.exempt:  # lifespan and websockets pass through
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            return await _reject(send, "missing API key: send 'Authorization: Bearer <key>'", b"")
        scheme, _, key = header.partition(b" ")
        if scheme.lower() == b"bearer" and self._known(key.strip()):
            return await self.app(scope, receive, send)
        return await _reject(send, "invalid API key", b', error="invalid_token"')

    def _known(self, key: bytes) -> bool:
        found = False
        for candidate in self.keys:  # no early exit: the time taken does not depend on which key matched
            found |= hmac.compare_digest(key, candidate)
        return found


async def _reject(send, message: str, challenge_extra: bytes) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="trimserve"' + challenge_extra)]})
    await send({"type": "http.response.body", "body": body})
