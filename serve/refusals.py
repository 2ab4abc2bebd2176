"""Every way the service can refuse a request: one closed set, one JSON body shape.

Each 4xx/5xx answer, whoever produced it (trimserve's middlewares, BentoML's validation, a
timeout, a bug), reaches the client as

    {"error": {"type": "<one of TYPES>", "message": "<one sentence>", "details": [...]}}

``details`` is empty except for validation errors, where each item is pydantic's
``{"loc": [...], "msg": ..., "type": ...}`` (never the input itself).  Metrics count
refusals by the same ``type`` names.
"""

from __future__ import annotations

import json

# type -> HTTP status.  The closed set: metrics labels and the README's table come from it.
TYPES: dict[str, int] = {
    "auth": 401,
    "validation": 400,
    "not_found": 404,  # an unknown path, or a method the path does not take (405)
    "slow_body": 408,
    "too_large": 413,
    "unsupported_media_type": 415,
    "rate_limit": 429,
    "internal": 500,
    "overload": 503,
    "timeout": 504,
}
_BY_STATUS = {status: name for name, status in TYPES.items()} | {403: "auth", 405: "not_found", 422: "validation"}


def type_for(status: int) -> str:
    """The refusal type of an HTTP error status (anything unknown >= 500 is ``internal``)."""
    return _BY_STATUS.get(status) or ("internal" if status >= 500 else "validation")


def body(kind: str, message: str, details: list[dict] | tuple = ()) -> bytes:
    """The JSON body of a refusal; ``kind`` must be one of :data:`TYPES`."""
    assert kind in TYPES, kind
    return json.dumps({"error": {"type": kind, "message": message, "details": list(details)}}).encode()


async def reply(
    send, kind: str, message: str, headers: list[tuple[bytes, bytes]] | tuple = (), details: list[dict] | tuple = ()
) -> None:
    """Send a whole refusal over ASGI ``send``: status from ``kind``, JSON body, extra ``headers``."""
    payload = body(kind, message, details)
    await send(
        {
            "type": "http.response.start",
            "status": TYPES[kind],
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def reshape(status: int, payload: bytes) -> bytes:
    """Rewrite an error body someone else produced (BentoML, Starlette) into trimserve's shape.

    A body already in the shape is returned as it is.  BentoML's validation error
    ``{"error": "2 validation errors for ...", "detail": [pydantic errors]}`` keeps its
    errors' ``loc``/``msg``/``type`` as ``details``; other bodies keep their message when it
    is a plain string and say nothing more (a 500's message never carries internals).
    """
    try:
        data = json.loads(payload) if payload else None
    except ValueError:
        data = payload.decode("utf-8", "replace").strip() or None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "type" in data["error"]:
        return payload
    kind = type_for(status)
    if isinstance(data, list) and len(data) == 1:  # BentoML sends some errors as a one-item list
        data = data[0]
    message = data.get("error") if isinstance(data, dict) else data
    details = []
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        details = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in data["detail"] if isinstance(e, dict)]
    if kind in ("internal", "overload", "timeout") or not isinstance(message, str):
        message = {
            "internal": "an unexpected error occurred; the server log has the details",
            "timeout": "the request took too long",
            "overload": "overloaded: queued work would miss the batching deadline; retry shortly",
            "not_found": "no such endpoint",
        }.get(kind, "the request is not valid")
    return body(kind, message, details)
