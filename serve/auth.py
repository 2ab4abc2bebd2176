"""API keys: how they are kept, matched and rate-limited.  The gate (serve/gate.py) asks.

Every HTTP request outside the health endpoints, ``/schema.json`` (and ``/metrics`` unless
protected) needs ``Authorization: Bearer <key>`` with one of the accepted keys; anything else
gets a 401 refusal and a ``WWW-Authenticate`` header.

Keys live in memory only as sha256 digests.  A keys file holds one key per line, either the
key itself or, better, its digest as ``sha256:<64 hex>`` (``python -m serve hash-key``
prints it), so a leaked file or backup gives nobody a key.  The file is re-read when it
changes (checked at most once a second), so keys are added and revoked without a restart;
a file that becomes unreadable or empty keeps the previous keys and is logged.  A presented
key's digest is compared in constant time with every accepted digest.

An optional per-key rate limit (token bucket: ``rate_limit_rps`` sustained, ``burst`` at
once) answers 429 with Retry-After.  It is per worker process.  Nothing here logs a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from serve import metrics

HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
DIGEST_PREFIX = "sha256:"
logger = logging.getLogger("trimserve.auth")


def digest(key: str | bytes) -> str:
    """The form a key is kept in: ``sha256:<hex>``."""
    return DIGEST_PREFIX + hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def parse_keys(lines: Iterable[str]) -> tuple[str, ...]:
    """Digests of the keys in a keys file's lines; blank lines and ``#`` comments are skipped.

    Raises ValueError (naming the line, never its content) for a malformed digest line.
    """
    digests = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(DIGEST_PREFIX):
            hex_part = line[len(DIGEST_PREFIX) :].lower()
            if len(hex_part) != 64 or any(c not in "0123456789abcdef" for c in hex_part):
                raise ValueError(f"line {number} starts with {DIGEST_PREFIX} but is not followed by 64 hex digits")
            digests.append(DIGEST_PREFIX + hex_part)
        else:
            digests.append(digest(line))
    return tuple(dict.fromkeys(digests))


class KeyStore:
    """The accepted keys as digests; from a file, re-read when its inode, size or mtime change."""

    def __init__(self, keys: Iterable[str] = (), path: str | Path | None = None, check_every_s: float = 1.0):
        self.path = Path(path) if path else None
        self.check_every_s = check_every_s
        self.digests = parse_keys(keys) if keys else ()
        self._stamp, self._checked = None, 0.0
        if self.path:
            self._stamp = self._stat()
            self.digests = self._read()
        if not self.digests:
            raise ValueError("KeyStore needs at least one key")
        metrics.API_KEYS.set(len(self.digests))

    def match(self, key: bytes) -> str | None:
        """The matching digest (the key's identity for rate limiting), or None."""
        self._maybe_reload()
        presented, found = digest(key).encode(), None
        for candidate in self.digests:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(presented, candidate.encode()):
                found = candidate
        return found

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.check_every_s:
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            digests = self._read()
            if not digests:
                raise ValueError("it holds no keys")
        except (OSError, ValueError) as err:
            metrics.KEY_RELOADS.labels(result="error").inc()
            logger.warning(
                "keys file %s changed but was not usable (%s); keeping the %d keys in use",
                self.path,
                err if isinstance(err, ValueError) else type(err).__name__,
                len(self.digests),
            )
            return
        self.digests = digests
        metrics.KEY_RELOADS.labels(result="ok").inc()
        metrics.API_KEYS.set(len(digests))
        logger.info("keys file %s re-read: %d keys", self.path, len(digests))

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)  # follows symlinks: a Kubernetes Secret volume swaps a link
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self) -> tuple[str, ...]:
        return parse_keys(self.path.read_text().splitlines())


class RateLimiter:
    """Token bucket per key digest: ``rate`` requests/s sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # digest -> (tokens, time); bounded by the key count

    def wait_s(self, key: str, now: float | None = None) -> float:
        """0 and take a token if one is there; else the seconds until one will be."""
        now = time.monotonic() if now is None else now
        tokens, then = self.buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate
