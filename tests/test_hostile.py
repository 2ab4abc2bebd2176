"""The running service against hostile input: a real `bentoml serve`, fuzzed and abused.

One server for the module (serve.launch.ServerProcess) with small limits, then in order:
schemathesis cases generated from the service's own OpenAPI schema, positive and negative;
hand-made hostile requests (malformed, oversized, deeply nested, mistyped, lying about their
length), each of which must get a 4xx with a JSON error and never a 5xx or a hang; and last
the server's health, its memory and its log, which must hold no key, no text and no
traceback.  Every text sent by hand carries MARK so the log check can look for it.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from tokenizers import Tokenizer

from serve.classifier import content_tokens
from serve.launch import ServerProcess
from serve.refusals import TYPES

pytestmark = pytest.mark.slow

VARIANT = "onnx-fp32"
KEY = "tk-" + secrets.token_hex(16)
AUTH = {"authorization": f"Bearer {KEY}"}
MARK = "wombatmarker"  # in every text sent by hand
MAX_TEXTS, MAX_CHARS = 8, 2000
TIMEOUT_S = 10  # TRIMSERVE_TIMEOUT_S' default: BentoML answers a request still running after it
FUZZ_EXAMPLES = 100  # per operation and generation mode: ~200 requests, a few seconds
BODY_LIMIT = 4 * 1024 * 1024  # TRIMSERVE_MAX_BODY_BYTES, set to its default so the test does not move with it
RSS_GROWTH_MB = 300  # generous: the allocator keeps what the largest bodies needed, and ONNX Runtime its arenas
CLIENT_ERROR = frozenset(range(400, 500))
# Answered by trimserve's middlewares, each with a JSON {"error": ...} (serve/service.py's docstring)
TRIMSERVE_REFUSALS = frozenset({401, 408, 413, 415, 429, 503})


@dataclass
class Server:
    process: ServerProcess
    tokenizer: Tokenizer  # the served variant's, to tell which texts the model sees as empty
    rss_warm_mb: float = 0.0
    fuzz_texts: set[str] = field(default_factory=set)  # generated texts, to look for in the log

    @property
    def url(self) -> str:
        return self.process.url


@pytest.fixture(scope="module")
def server(served_variant, tiny_fp32, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "keys").write_text(KEY + "\n")
    env = {
        "TRIMSERVE_VARIANT_DIR": str(served_variant[3]),
        "TRIMSERVE_MANIFEST": str(tiny_fp32 / "manifest.json"),
        "TRIMSERVE_API_KEYS_FILE": str(tmp / "keys"),
        "TRIMSERVE_MAX_TEXTS_PER_REQUEST": str(MAX_TEXTS),
        "TRIMSERVE_MAX_TEXT_CHARS": str(MAX_CHARS),
        "TRIMSERVE_MAX_BODY_BYTES": str(BODY_LIMIT),
        # generous: on a shared 2-core machine a missed batching deadline is a 503, not a wait
        "TRIMSERVE_MAX_LATENCY_MS": "10000",
    }
    with ServerProcess(env, log=tmp / "server.log") as process:
        print(f"\nbentoml serve ready in {process.wait_ready():.1f} s")
        served = Server(process, Tokenizer.from_file(str(served_variant[3] / "tokenizer.json")))
        for i in range(5):  # the first full batches allocate what every later one reuses: not growth
            assert _classify(served, [f"warm-up {i} {MARK}"] * MAX_TEXTS).status_code == 200
        served.rss_warm_mb = _rss_mb(process)
        yield served


def _classify(server: Server, texts: list[str]) -> httpx.Response:
    return httpx.post(f"{server.url}/classify", json={"texts": texts}, headers=AUTH, timeout=30)


def _rss_mb(process: ServerProcess) -> float:
    """Resident memory of the arbiter and all its workers, in MiB."""
    total = 0
    for pid in [process.pid, *process.workers()]:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:  # exited between listing and reading
            pass
    return total / 2**20


def _assert_json_error(response) -> None:
    """An httpx response, or schemathesis' (whose header values are lists)."""
    content_type = response.headers.get("content-type")
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type and content_type.startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"type", "message", "details"} and error["type"] in TYPES, error
    assert TYPES[error["type"]] == response.status_code or (response.status_code, error["type"]) in (
        (405, "not_found"),
        (403, "auth"),
        (422, "validation"),
    ), (response.status_code, error)
    assert isinstance(error["message"], str) and error["message"]


# --- schemathesis: cases generated from the service's own OpenAPI schema -------------------


def test_fuzz_from_the_openapi_schema(server):
    docs = httpx.get(f"{server.url}/docs.json", headers=AUTH, timeout=10)
    assert docs.status_code == 200, docs.text
    schema = schemathesis.openapi.from_dict(docs.json())
    cases, statuses, start = Counter(), Counter(), time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            if mode.is_negative and not (operation.body or list(operation.iter_parameters())):
                continue  # the health and metrics GETs take nothing that could be made invalid
            _fuzz(server, operation, mode, cases, statuses)
    seconds = time.monotonic() - start
    print(f"\nschemathesis: {sum(cases.values())} cases in {seconds:.1f} s")
    for (label, mode, body, status), n in sorted(statuses.items()):
        print(f"  {label} {mode}, {body}: {n} x {status}")
    assert min(cases["POST /classify", "positive"], cases["POST /classify", "negative"]) >= FUZZ_EXAMPLES // 2, cases


def _fuzz(server: Server, operation, mode: GenerationMode, cases: Counter, statuses: Counter) -> None:
    # derandomize: the same cases on every run and every machine; no database for the same reason
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        cases[operation.label, mode.value] += 1
        response = case.call(base_url=server.url, headers=AUTH, timeout=30)
        body = "no body" if case.body is NOT_SET else "body"
        statuses[operation.label, mode.value, body, response.status_code] += 1
        case.validate_response(response, checks=_checks(mode, response.status_code), headers=AUTH)
        if operation.label == "POST /classify":
            _check_classify(server, case, response, mode)

    run()


def _checks(mode: GenerationMode, status: int) -> list:
    """schemathesis' checks that apply to a response with ``status``.

    The status must be one the schema documents, or one of trimserve's own refusals: BentoML
    writes the schema and knows nothing of the request guard's 413/415/503 or auth's 401.
    Bodies are checked against the schema for 200s only: BentoML documents the 400 body's
    "detail" as a string, but sends pydantic's list of errors there.
    """
    checks = [not_a_server_error, content_type_conformance]
    if mode.is_negative:
        checks.append(negative_data_rejection)
    if status not in TRIMSERVE_REFUSALS:
        checks.append(status_code_conformance)
    if status == 200:
        checks.append(response_schema_conformance)
    return checks


def _check_classify(server: Server, case, response, mode: GenerationMode) -> None:
    if response.status_code != 200:
        _assert_json_error(response)
    texts = case.body.get("texts") if isinstance(case.body, dict) else None
    if isinstance(texts, list):  # distinctive enough to look for in the log
        server.fuzz_texts.update(t for t in texts if isinstance(t, str) and len(t.strip()) >= 16)
    if mode.is_positive:
        _valid_is_accepted(server, case, response)


def _valid_is_accepted(server: Server, case, response) -> None:
    """Schema-valid input gets 200, except what the schema cannot say: a blank text is a 400.

    Blank is whitespace only, or nothing the model's tokenizer keeps (zero-width and control
    characters its normalizer erases).  In place of schemathesis' positive_data_acceptance,
    which would count those 400s as failures.  BentoML's schema does not mark the body
    required either, so a positive case may come without one: a 400 for the missing texts, or
    415 for the missing content type.
    """
    if case.body is NOT_SET:
        assert response.status_code in (400, 415), response.text
        return
    texts = case.body["texts"]
    # The schema's checks come first; the tokenizer's only once they pass.
    blank = [["texts", i] for i, text in enumerate(texts) if not text.strip()] or [
        ["texts", i] for i, text in enumerate(texts) if content_tokens(server.tokenizer.encode(text)) == 0
    ]
    if not blank:
        assert response.status_code == 200, response.text
        assert len(response.json()) == len(texts)
    else:
        assert response.status_code == 400, response.text
        assert [e["loc"] for e in response.json()["error"]["details"]] == blank


# --- hand-made hostile requests -----------------------------------------------------------

JSON = {"content-type": "application/json"}


def _ten_mb() -> bytes:
    return json.dumps({"texts": [MARK + "x" * 10_000_000]}).encode()


def _chunks(body: bytes, size: int = 64 * 1024):
    """An iterator body: httpx sends it with Transfer-Encoding: chunked and no Content-Length."""
    for i in range(0, len(body), size):
        yield body[i : i + size]


def _raw(body: bytes) -> dict:
    return {"content": body, "headers": JSON}


# name: (httpx.post keyword arguments, the statuses that may answer)
HOSTILE = {
    "malformed JSON": (lambda: _raw(b'{"texts": ["' + MARK.encode() + b'", '), {400}),
    "text/plain": (
        lambda: {"content": json.dumps({"texts": [MARK]}), "headers": {"content-type": "text/plain"}},
        {415},
    ),
    "form-urlencoded": (lambda: {"data": {"texts": MARK}}, {415}),
    "multipart": (
        lambda: {"files": {"texts": ("texts.json", json.dumps({"texts": [MARK]}).encode(), "application/json")}},
        {415},
    ),
    "no body, no content type": (dict, CLIENT_ERROR),
    "no body, JSON content type": (lambda: {"headers": JSON}, {400}),
    "10,000 nested lists": (lambda: _raw(b'{"texts": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"), {400}),
    "10,000 nested objects": (lambda: _raw(b'{"texts": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_000 + b"}"), {400}),
    "invalid UTF-8": (lambda: _raw(b'{"texts": ["\xff\xfe\xc3 ' + MARK.encode() + b'"]}'), {400}),
    "UTF-8-encoded surrogate": (lambda: _raw(b'{"texts": ["\xed\xa0\x80 ' + MARK.encode() + b'"]}'), {400}),
    "lone high surrogate": (lambda: _raw(b'{"texts": ["\\ud800 ' + MARK.encode() + b'"]}'), {400}),
    "lone low surrogate": (lambda: _raw(b'{"texts": ["' + MARK.encode() + b' \\udfff"]}'), {400}),
    # a JSON string may hold NUL; the text is not blank, so classifying it is a fine answer
    "NUL characters": (lambda: {"json": {"texts": [f"a\x00b {MARK}", f"\x00\x00{MARK}"]}}, {200, 400}),
    "10 MB text": (lambda: _raw(_ten_mb()), {413}),
    "10 MB text, chunked": (lambda: {"content": _chunks(_ten_mb()), "headers": JSON}, {413}),
    "10 MB text, no key": (lambda: {**_raw(_ten_mb()), "auth": {}}, {401}),
    "10,000 texts": (lambda: {"json": {"texts": [f"{i} {MARK}" for i in range(10_000)]}}, {400, 413}),
    # extra keys are ignored; ~3 MB, under the body limit, so the parser does see them all
    "200,000 keys": (lambda: {"json": {"texts": [MARK], **{f"k{i}": i for i in range(200_000)}}}, {200, 400}),
    "100,000-digit number": (lambda: _raw(b'{"texts": [' + b"9" * 100_000 + b"]}"), {400}),
    "1e999999": (lambda: _raw(b'{"texts": [1e999999]}'), {400}),
    "null": (lambda: _raw(b"null"), {400}),
    "a list": (lambda: _raw(json.dumps([MARK]).encode()), {400}),
    "a number": (lambda: _raw(b"42"), {400}),
    "a string": (lambda: _raw(json.dumps(MARK).encode()), {400}),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request_gets_a_4xx(server, name):
    build, allowed = HOSTILE[name]
    request = build()
    headers = {**request.pop("auth", AUTH), **request.pop("headers", {})}
    response = httpx.post(f"{server.url}/classify", headers=headers, timeout=60, **request)
    assert response.status_code in allowed, (response.status_code, response.text[:500])
    if response.status_code == 200:
        assert all(p["label"] for p in response.json())
    else:
        _assert_json_error(response)
    assert server.process.process.poll() is None, server.process.last_line()


def _lying_request(server: Server) -> socket.socket:
    """POST /classify whose Content-Length promises 1000 bytes more than it sends; left open."""
    sent = json.dumps({"texts": [f"stalled {MARK}"]}).encode()
    sock = socket.create_connection(("127.0.0.1", server.process.port), timeout=5)
    sock.sendall(
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(sent) + 1000}\r\n\r\n".encode()
        + sent
    )
    return sock


def _read_response(sock: socket.socket, timeout_s: float) -> tuple[int, bytes] | None:
    """Status and body of the response on ``sock``, or None if none came within ``timeout_s``."""
    data, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lengths = [
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        ]
        if lengths and len(body) >= lengths[0]:
            return int(head.split(b" ")[1]), body
    return (int(data.split(b" ")[1]), data.partition(b"\r\n\r\n")[2]) if data else None


def test_lying_content_length_does_not_block_the_server(server):
    sock = _lying_request(server)
    try:
        assert _classify(server, [f"while a body is missing {MARK}"]).status_code == 200
        answer = _read_response(sock, timeout_s=2)  # the client gives up soon: nothing yet, or a 4xx
        assert answer is None or answer[0] in CLIENT_ERROR, answer
    finally:
        sock.close()
    assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
    assert _classify(server, [f"after the liar left {MARK}"]).status_code == 200


def test_body_that_never_completes_gets_a_4xx(server):
    """A client that stops sending is the client's fault: 408 (or 400), not BentoML's 504 timeout."""
    sock = _lying_request(server)
    try:
        answer = _read_response(sock, timeout_s=TIMEOUT_S + 10)
    finally:
        sock.close()
    assert answer is not None, f"no answer within {TIMEOUT_S + 10} s to a body that never completes"
    status, body = answer
    assert status in CLIENT_ERROR, (status, body[:300])
    assert json.loads(body)["error"]["type"] == "slow_body"


# --- afterwards: health, memory, log -------------------------------------------------------


def test_still_serving(server):
    assert server.process.process.poll() is None, server.process.last_line()
    assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
    response = _classify(server, [f"A great film after all that. {MARK}"])
    assert response.status_code == 200 and len(response.json()) == 1


def test_memory_stays_bounded(server):
    rss = _rss_mb(server.process)
    print(f"\nserver RSS: {server.rss_warm_mb:.0f} MiB after warm-up, {rss:.0f} MiB after fuzzing and hostile requests")
    assert rss - server.rss_warm_mb < RSS_GROWTH_MB


def test_log_holds_no_key_no_text_no_traceback(server):
    """Last on purpose: every request of this module has been answered and logged by now."""
    log = server.process.log.read_text(errors="replace")
    assert "POST /classify " in log  # the access log is there, so there was something to leak into
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 500) :][:3000]
    assert KEY not in log and MARK not in log
    leaked = sorted(t for t in server.fuzz_texts if t in log)
    assert not leaked, leaked[:3]
