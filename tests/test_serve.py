"""serve/: the plain pieces in-process, then the service end to end through a real `bentoml serve`."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from export.manifest import load_manifest, ok_variants, variant_dir
from serve.auth import BearerAuth, KeyStore, RateLimiter, digest, parse_keys
from serve.config import ServeConfig, resolve_variant
from serve.guard import RequestGuard
from serve.launch import ServerProcess
from serve.metrics import RequestMetrics
from tests.conftest import REPO
from train.errors import UserError

VARIANT = "onnx-fp32"  # always built, and numerically the fine-tuned model itself
KEY = "tk-" + secrets.token_hex(16)
MARK = "quokkamarker"  # in every text sent, so the log check can look for it
# Clear enough for the tiny fixture model (40 training steps, biased towards "fresh").
FRESH = [f"A masterpiece: moving, funny and beautifully acted. {MARK}", f"A great film. {MARK}"]
ROTTEN = [f"Bad acting, bad script, bad everything. {MARK}", f"Awful, awful, awful. {MARK}"]


# --- in-process: config ----------------------------------------------------------------

def test_config_defaults_and_parsing(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# comment\nalpha\n\n beta \n{digest('gamma').upper().replace('SHA256', 'sha256')}\n")
    config = ServeConfig.from_env({"TRIMSERVE_API_KEYS_FILE": str(keys), "TRIMSERVE_MAX_BATCH_SIZE": " 16 ",
                                   "TRIMSERVE_PROTECT_METRICS": "yes", "TRIMSERVE_THREADS": "", "TRIMSERVE_DEVICE": "cpu"})
    assert config.api_keys == (digest("alpha"), digest("beta"), digest("gamma"))  # kept as digests only
    assert config.max_batch_size == 16 and config.protect_metrics
    assert config.threads is None and config.ort_threads >= 1 and config.device == "cpu"
    assert "alpha" not in repr(config)
    assert ServeConfig.from_env({"TRIMSERVE_API_KEYS": "a, b,"}).api_keys == ("a", "b")
    assert ServeConfig.from_env({"TRIMSERVE_ALLOW_NO_AUTH": "1"}).api_keys == ()


OPEN = {"TRIMSERVE_ALLOW_NO_AUTH": "1"}


@pytest.mark.parametrize("env, message", [
    ({**OPEN, "TRIMSERVE_MAX_BATCH_SIZE": "lots"}, r"^TRIMSERVE_MAX_BATCH_SIZE='lots' is not valid: expected an integer$"),
    ({**OPEN, "TRIMSERVE_MAX_BATCH_SIZE": "1"}, r"TRIMSERVE_MAX_BATCH_SIZE=1 is not valid: expected an integer >= 2"),
    ({**OPEN, "TRIMSERVE_TIMEOUT_S": "0"}, r"TRIMSERVE_TIMEOUT_S=0.0 is not valid: expected seconds > 0"),
    ({**OPEN, "TRIMSERVE_BODY_TIMEOUT_S": "10"}, r"TRIMSERVE_BODY_TIMEOUT_S=10.0 is not valid: expected seconds > 0 and "
                                                  r"below TRIMSERVE_TIMEOUT_S=10.0"),
    ({**OPEN, "TRIMSERVE_DEVICE": "tpu"}, r"TRIMSERVE_DEVICE='tpu' is not valid: expected one of auto, cpu, cuda"),
    ({**OPEN, "TRIMSERVE_PROTECT_METRICS": "maybe"}, r"TRIMSERVE_PROTECT_METRICS='maybe' is not valid: expected 1/true/yes"),
    ({**OPEN, "TRIMSERVE_MAX_BATCH": "8"}, r"unknown variable TRIMSERVE_MAX_BATCH; trimserve reads TRIMSERVE_SELECTED, "),
    ({"TRIMSERVE_API_KEYS": " , "}, r"TRIMSERVE_API_KEYS is set but holds no keys"),
    ({"TRIMSERVE_API_KEYS_FILE": "/nonexistent/keys"}, r"TRIMSERVE_API_KEYS_FILE='/nonexistent/keys' is not valid: no such file"),
    ({"TRIMSERVE_API_KEYS": "a", "TRIMSERVE_API_KEYS_FILE": "/k"}, r"both TRIMSERVE_API_KEYS and TRIMSERVE_API_KEYS_FILE"),
    ({**OPEN, "TRIMSERVE_MAX_BODY_BYTES": "100"}, r"TRIMSERVE_MAX_BODY_BYTES=100 is not valid: expected an integer >= 1024"),
    ({**OPEN, "TRIMSERVE_MAX_LAG_MS": "-1"}, r"TRIMSERVE_MAX_LAG_MS=-1.0 is not valid: expected milliseconds >= 0"),
    ({**OPEN, "TRIMSERVE_RATE_LIMIT_RPS": "-1"}, r"TRIMSERVE_RATE_LIMIT_RPS=-1.0 is not valid: expected requests/s >= 0"),
    ({}, r"no API keys: set TRIMSERVE_API_KEYS_FILE .* or TRIMSERVE_ALLOW_NO_AUTH=1"),
])
def test_config_errors_name_the_variable(env, message):
    with pytest.raises(UserError, match=message):
        ServeConfig.from_env(env)


def test_config_error_never_echoes_a_key():
    with pytest.raises(UserError) as err:
        ServeConfig.from_env({"TRIMSERVE_API_KEYS": "sekrit", "TRIMSERVE_API_KEYS_FILE": "/k"})
    assert "sekrit" not in str(err.value)


def _selection(directory: Path, entry: dict, **changes) -> dict:
    return {"variant": VARIANT, "path": str(directory), "files": entry["files"], "max_length": 64, **changes}


def test_resolve_variant(variant, tmp_path):
    directory, entry, _ = variant
    selected = tmp_path / "selected.json"
    config = ServeConfig(selected=str(selected), allow_no_auth=True)
    with pytest.raises(UserError, match=r"selected.json does not exist; run `make perf`"):
        resolve_variant(config)
    selected.write_text(json.dumps(_selection(directory, entry)))
    resolved = resolve_variant(config)
    assert (resolved.name, resolved.directory, resolved.max_length) == (VARIANT, directory, 64)
    assert resolved.model_sha256 == entry["files"]["model.onnx"]["sha256"]
    selected.write_text(json.dumps(_selection(directory, entry, files={})))
    with pytest.raises(UserError, match=r"selected.json has no files; re-run perf"):
        resolve_variant(config)
    copy = tmp_path / VARIANT
    shutil.copytree(directory, copy)
    (copy / "tokenizer.json").unlink()
    selected.write_text(json.dumps(_selection(copy, entry)))
    with pytest.raises(UserError, match=r"refusing to serve onnx-fp32 from .*: tokenizer.json \(missing\) compared with"):
        resolve_variant(config)
    files = {k: v for k, v in entry["files"].items() if k != "tokenizer.json"}
    selected.write_text(json.dumps(_selection(copy, entry, files=files)))
    with pytest.raises(UserError, match=r"records no sha256 for tokenizer.json of onnx-fp32"):
        resolve_variant(config)
    with pytest.raises(UserError, match=r"variants manifest .*manifest.json does not exist"):
        resolve_variant(ServeConfig(variant_dir=str(copy), allow_no_auth=True))  # none beside the copy
    manifest = tmp_path / "other" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"kind": "trimserve.variants", "variants": []}))
    with pytest.raises(UserError, match=r"variant 'onnx-fp32' is not an ok variant of .*; set TRIMSERVE_MANIFEST"):
        resolve_variant(ServeConfig(variant_dir=str(copy), manifest=str(manifest), allow_no_auth=True))


# --- in-process: auth, keys, rate limit, request guard, metrics ----------------------------

def _ok_app(delay_s: float = 0.0):
    async def ok(request):
        await request.body()
        await asyncio.sleep(delay_s)
        return PlainTextResponse("ok")
    return Starlette(routes=[Route(p, ok, methods=["GET", "POST"])
                             for p in ("/classify", "/livez", "/readyz", "/healthz", "/metrics")])


def _app(keys: KeyStore | None = None, **auth):
    return RequestMetrics(BearerAuth(_ok_app(), keys=keys or KeyStore(["first-key", "second-key"]), **auth))


def _call(app, method: str, path: str, authorization: str | bytes | None = None, headers: dict | None = None,
          **kwargs) -> httpx.Response:
    headers = {**(headers or {}), **({"authorization": authorization} if authorization else {})}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, headers=headers, **kwargs)
    return asyncio.run(go())


def test_bearer_auth_middleware():
    app = _app()
    for authorization in (None, "Bearer wrong", "Basic first-key", "Bearer", "Bearer cl\u00e9".encode()):
        response = _call(app, "POST", "/classify", authorization)
        assert response.status_code == 401, authorization
        assert response.json()["error"] and response.headers["www-authenticate"].startswith('Bearer realm="trimserve"')
    assert 'error="invalid_token"' in _call(app, "POST", "/classify", "Bearer x").headers["www-authenticate"]
    for key in ("first-key", "second-key"):
        assert _call(app, "POST", "/classify", f"bearer {key}").text == "ok"
    assert all(_call(app, "GET", p).status_code == 200 for p in ("/livez", "/readyz", "/healthz", "/metrics"))
    assert _call(_app(protect_metrics=True), "GET", "/metrics").status_code == 401
    with pytest.raises(ValueError, match="at least one key"):
        KeyStore([])


def test_keys_are_kept_as_digests_and_parsed_strictly():
    store = KeyStore(["plain-key", digest("hashed-key")])
    assert "plain-key" not in repr(store.digests) and len(store.digests) == 2
    assert store.match(b"plain-key") == digest("plain-key") and store.match(b"hashed-key") == digest("hashed-key")
    assert store.match(b"sha256:" + digest("hashed-key").encode()) is None  # the digest itself is no key
    with pytest.raises(ValueError, match=r"^line 2 starts with sha256: but is not followed by 64 hex digits$"):
        parse_keys(["ok", "sha256:abc"])


def test_hash_key_cli_prints_the_digest_line(tmp_path):
    run = lambda key: subprocess.run([sys.executable, "-m", "serve", "hash-key"], input=key, capture_output=True,  # noqa: E731
                                     text=True, cwd=REPO)
    done = run("my-secret-key\n")
    assert done.returncode == 0 and done.stdout.strip() == digest("my-secret-key")
    assert parse_keys([done.stdout]) == (digest("my-secret-key"),)  # the line goes into the keys file as is
    empty = run("")
    assert empty.returncode == 1 and empty.stderr.strip() == "trimserve: no key on stdin; e.g. python -m serve hash-key < key.txt"


def test_keys_file_is_reloaded_when_it_changes(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    store = KeyStore(path=keys, check_every_s=0)
    app = _app(store)
    assert _call(app, "POST", "/classify", "Bearer old-key").status_code == 200
    keys.write_text(f"{digest('new-key')}\n")  # rotate: the old key is revoked, the new one hashed at rest
    assert _call(app, "POST", "/classify", "Bearer new-key").status_code == 200
    assert _call(app, "POST", "/classify", "Bearer old-key").status_code == 401
    for broken in ("", "sha256:nothex\n"):  # an unusable file keeps the keys in use
        keys.write_text(broken)
        assert _call(app, "POST", "/classify", "Bearer new-key").status_code == 200
    keys.unlink()
    assert _call(app, "POST", "/classify", "Bearer new-key").status_code == 200
    replacement = tmp_path / "keys.new"  # how a Kubernetes Secret volume updates: a new file moved into place
    replacement.write_text("third-key\n")
    replacement.rename(keys)
    assert _call(app, "POST", "/classify", "Bearer third-key").status_code == 200


def test_rate_limit_is_a_token_bucket_per_key():
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.wait_s("a", now=10.0) for _ in range(4)] == [0, 0, 0, 0.5]
    assert limiter.wait_s("b", now=10.0) == 0  # keys have their own buckets
    assert limiter.wait_s("a", now=10.5) == 0 and limiter.wait_s("a", now=10.5) == 0.5
    assert limiter.wait_s("a", now=100.0) == 0  # refilled, but never above the burst
    assert [limiter.wait_s("a", now=100.0) for _ in range(3)] == [0, 0, 0.5]
    app = _app(rate_limit=RateLimiter(rate=0.5, burst=2))
    statuses = [_call(app, "POST", "/classify", "Bearer first-key") for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[2].headers["retry-after"] == "2" and "rate limit" in statuses[2].json()["error"]
    assert _call(app, "POST", "/classify", "Bearer second-key").status_code == 200


def _guarded(delay_s: float = 0.0, **limits):
    return RequestMetrics(RequestGuard(_ok_app(delay_s), **{"max_body_bytes": 1000, "max_in_flight": 2, **limits}))


def test_guard_limits_body_size_and_type_before_the_app():
    app, json_type = _guarded(), {"content-type": "application/json"}
    assert _call(app, "POST", "/classify", content=b"x" * 1000, headers=json_type).status_code == 200
    too_big = _call(app, "POST", "/classify", content=b"x" * 1001, headers=json_type)
    assert too_big.status_code == 413 and "1001 bytes is over the limit of 1000" in too_big.json()["error"]
    async def chunks():  # no Content-Length: sent chunked
        yield b"x" * 600
        yield b"x" * 600

    chunked = _call(app, "POST", "/classify", content=chunks(), headers=json_type)
    assert "content-length" not in chunked.request.headers and chunked.status_code == 413
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        response = _call(app, "POST", "/classify", content=b"{}", headers={"content-type": content_type} if content_type
                         else {})
        assert response.status_code == 415, content_type
    assert _call(app, "POST", "/classify", content=b"{}", headers={"content-type": "Application/JSON; charset=utf-8"}
                 ).status_code == 200
    assert _call(app, "GET", "/metrics").status_code == 200  # other paths are not the guard's business


def test_guard_admits_a_bounded_number_and_refuses_the_rest_at_once():
    app = _guarded(delay_s=0.5, max_in_flight=2)

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            async def one():
                start = time.perf_counter()
                response = await client.post("/classify", json={})
                return response, time.perf_counter() - start
            return await asyncio.gather(*(one() for _ in range(5)))

    count = lambda code: REGISTRY.get_sample_value("trimserve_requests_total", {"code": code}) or 0  # noqa: E731
    before = count("503")
    results = asyncio.run(burst())
    assert sorted(r.status_code for r, _ in results) == [200, 200, 503, 503, 503]
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and t < 0.25 for r, t in refused)  # at once, not after the work
    assert count("503") == before + 3
    assert REGISTRY.get_sample_value("trimserve_in_flight_requests") == 0
    assert REGISTRY.get_sample_value("trimserve_in_flight_limit") == 2


def test_guard_refuses_new_requests_while_the_event_loop_is_behind():
    async def handler(request):
        if (await request.body()) == b'"block"':
            time.sleep(0.4)  # a stall of the whole event loop, as when it cannot keep up
        return PlainTextResponse("ok")

    app = RequestMetrics(RequestGuard(Starlette(routes=[Route("/classify", handler, methods=["POST"])]),
                                      max_body_bytes=1000, max_in_flight=10, max_lag_s=0.1))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            post = lambda body: client.post("/classify", json=body)  # noqa: E731
            first = await post("hello")  # starts the lag timer
            await asyncio.sleep(0.05)

            async def during_the_stall():
                await asyncio.sleep(0.05)
                return await post("hello")

            stalled, refused = await asyncio.gather(post("block"), during_the_stall())
            await asyncio.sleep(0.1)  # the timer catches up
            return first, stalled, refused, await post("hello")

    first, stalled, refused, later = asyncio.run(scenario())
    assert (first.status_code, stalled.status_code, later.status_code) == (200, 200, 200)
    assert refused.status_code == 503 and "ms behind" in refused.json()["error"]
    assert refused.headers["retry-after"] == "1"


def test_guard_refuses_a_body_that_never_completes():
    async def trickle():
        yield b'{"texts": '
        await asyncio.sleep(5)
        yield b"[]}"

    response = _call(_guarded(body_timeout_s=0.3), "POST", "/classify", content=trickle(),
                     headers={"content-type": "application/json"})
    assert response.status_code == 408


def test_rejections_are_counted_by_reason():
    auth = lambda: REGISTRY.get_sample_value("trimserve_rejected_requests_total", {"reason": "auth"})  # noqa: E731
    before = auth()
    _call(_app(), "POST", "/classify")
    assert auth() == before + 1


# --- end to end: a real `bentoml serve` ----------------------------------------------------

def _start(env: dict, tmp: Path, name: str) -> ServerProcess:
    return ServerProcess(env, tmp / f"{name}.log", home=tmp / f"{name}-home")


@dataclass
class Server:
    url: str
    log: Path
    model_sha256: str
    keys: Path


@pytest.fixture(scope="module")
def variant(tiny_variants) -> tuple[Path, dict, dict]:
    """The served variant's directory, its manifest entry, and the manifest."""
    manifest = load_manifest(tiny_variants)
    entry = next(v for v in ok_variants(manifest) if v["name"] == VARIANT)
    return variant_dir(manifest, entry), entry, manifest


@pytest.fixture(scope="module")
def server(tiny_variants, variant, tmp_path_factory):
    """The service on a selection file as perf/ writes it, with one key."""
    tmp = tmp_path_factory.mktemp("serve")
    directory, entry, manifest = variant
    selected = tmp / "selected.json"
    selected.write_text(json.dumps({"variant": VARIANT, "manifest": str(tiny_variants / "manifest.json"),
                                    "path": str(directory), "files": entry["files"], "labels": manifest["labels"],
                                    "max_length": manifest["max_length"], "figures": {}}))
    (tmp / "keys").write_text(KEY + "\n")
    env = {"TRIMSERVE_SELECTED": str(selected), "TRIMSERVE_API_KEYS_FILE": str(tmp / "keys"),
           # generous: this shared 2-core machine runs a batch of 32 in ~0.3 s, and a missed
           # deadline is a 503 rather than a wait
           "TRIMSERVE_MAX_LATENCY_MS": "10000", "TRIMSERVE_MAX_CONCURRENCY": "48", "TRIMSERVE_MAX_TEXTS_PER_REQUEST": "8",
           "TRIMSERVE_MAX_TEXT_CHARS": "2000"}
    server = _start(env, tmp, "server")
    try:
        print(f"\nbentoml serve ready in {server.wait_ready(120):.1f} s")
        yield Server(server.url, server.log, entry["files"]["model.onnx"]["sha256"], tmp / "keys")
    finally:
        server.stop()


def _post(url: str, body, key: str | None = KEY) -> httpx.Response:
    """POST /classify with ``body`` as JSON (raw when it is bytes) and the key."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(f"{url}/classify", content=body, headers={**headers, "content-type": "application/json"},
                          timeout=30)
    return httpx.post(f"{url}/classify", json=body, headers=headers, timeout=30)


def _metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics as {'name{label=value,...}': value}."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            out[s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"] = s.value
    return out


def test_auth(server):
    url = server.url
    for key in (None, "wrong-key"):
        response = _post(url, {"texts": [f"fine {MARK}"]}, key=key)
        assert response.status_code == 401 and "API key" in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{url}/docs.json", timeout=10).status_code == 401
    docs = httpx.get(f"{url}/docs.json", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert "/classify" in docs.json()["paths"]
    assert _post(url, {"texts": [f"fine {MARK}"]}).status_code == 200
    assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
    assert _metrics(url)["trimserve_rejected_requests_total{reason=auth}"] >= 2


def test_predictions(server):
    url = server.url
    response = _post(url, {"texts": FRESH + ROTTEN})
    assert response.status_code == 200
    predictions = response.json()
    assert [p["label"] for p in predictions] == ["fresh"] * len(FRESH) + ["rotten"] * len(ROTTEN)
    for p in predictions:
        assert set(p["probabilities"]) == {"fresh", "rotten"}
        assert p["score"] == p["probabilities"][p["label"]] == max(p["probabilities"].values())
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5


def test_sync_http_client(server):
    import bentoml

    url = server.url
    with bentoml.SyncHTTPClient(url, token=KEY, timeout=30) as client:
        assert client.classify(texts=[FRESH[0]])[0]["label"] == "fresh"


@pytest.mark.parametrize("body, where", [
    ({"texts": [""]}, ["texts", 0]),
    ({"texts": ["   \n"]}, ["texts", 0]),
    ({"texts": [f"ok {MARK}", 42]}, ["texts", 1]),
    ({"texts": [f"too many {MARK}"] * 9}, ["texts"]),
    ({"texts": []}, ["texts"]),
    ({"texts": f"not a list {MARK}"}, ["texts"]),
    ({"text": [f"wrong field {MARK}"]}, ["texts"]),
    ({"texts": [MARK + "x" * 2000]}, ["texts", 0]),
    (b'{"texts": ["unterminated ' + MARK.encode(), []),
])
def test_validation_errors_are_json_400(server, body, where):
    url = server.url
    response = _post(url, body)
    assert response.status_code == 400
    assert response.json()["detail"][0]["loc"] == where
    assert _post(url, {"texts": [FRESH[0]]}).status_code == 200  # still serving


def test_long_text_is_truncated_and_counted(server):
    url = server.url
    counter = "trimserve_truncated_texts_total{}"
    before = _metrics(url)[counter]
    response = _post(url, {"texts": [" ".join([f"great {MARK}"] * 100), FRESH[0]]})
    assert response.status_code == 200 and len(response.json()) == 2
    assert _metrics(url)[counter] == before + 1


def test_metrics_move(server):
    url = server.url
    before = _metrics(url)
    assert _post(url, {"texts": FRESH + ROTTEN}).status_code == 200
    after = _metrics(url)
    grew = lambda name: after[name] > before.get(name, 0)  # noqa: E731
    assert grew("trimserve_batch_size_count{}") and grew("trimserve_inference_seconds_count{}")
    assert grew("trimserve_tokenize_seconds_count{}") and grew("trimserve_input_tokens_sum{}")
    assert grew("trimserve_predictions_total{label=fresh}") and grew("trimserve_predictions_total{label=rotten}")
    assert after["trimserve_rejected_requests_total{reason=validation}"] >= 9
    assert [k for k, v in after.items() if k.startswith("trimserve_model_info{") and v == 1] == \
        [f"trimserve_model_info{{sha256={server.model_sha256},variant={VARIANT}}}"]
    assert any(k.startswith("bentoml_service_request_total{") for k in after)


def _in_threads(n: int, fn) -> list:
    """``fn(i)`` for i in range(n), all released at once from n threads; the results in order."""
    results, barrier = [None] * n, threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_requests_are_batched(server):
    url = server.url
    merged = lambda m: m["trimserve_batch_size_count{}"] - m["trimserve_batch_size_bucket{le=1.0}"]  # noqa: E731
    before = _metrics(url)
    # One text per request, so any model call with more than one text merged requests.
    # BentoML's dispatcher runs its first ~10 calls one by one while it calibrates: retry.
    for _ in range(3):
        statuses = _in_threads(32, lambda i: _post(url, {"texts": [f"{FRESH[i % 2]} {i}"]}).status_code)
        assert set(statuses) == {200}
        after = _metrics(url)
        if merged(after) > merged(before):
            break
    assert merged(after) > merged(before), "no model call merged two requests"
    calls = after["trimserve_batch_size_count{}"] - before["trimserve_batch_size_count{}"]
    texts = after["trimserve_batch_size_sum{}"] - before["trimserve_batch_size_sum{}"]
    print(f"\n{texts:.0f} texts in {calls:.0f} model calls")


def test_overload_gets_503_at_once_and_keeps_serving(server):
    url = server.url
    before = _metrics(url)["trimserve_rejected_requests_total{reason=overload}"]
    responses = _in_threads(80, lambda i: _post(url, {"texts": [f"{FRESH[0]} {i}"] * 8}))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses, sorted(statuses)
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.json()["error"] and r.headers.get("retry-after") for r in refused if "overloaded" in r.text)
    # the guard's 503s and BentoML's batching-deadline 503s both count as overload
    assert _metrics(url)["trimserve_rejected_requests_total{reason=overload}"] == before + len(refused)
    assert _metrics(url)["trimserve_in_flight_requests{}"] == 0
    assert _post(url, {"texts": [FRESH[0]]}).status_code == 200


def test_keys_file_change_takes_effect_without_restart(server):
    new_key = "tk-" + secrets.token_hex(16)
    assert _post(server.url, {"texts": [FRESH[0]]}, key=new_key).status_code == 401
    server.keys.write_text(f"{KEY}\n{digest(new_key)}\n")
    time.sleep(1.1)  # the file is looked at once a second at most
    assert _post(server.url, {"texts": [FRESH[0]]}, key=new_key).status_code == 200
    assert _metrics(server.url)["trimserve_api_keys{}"] == 2


@pytest.mark.parametrize("fault", ["truncated", "replaced", "missing"])
def test_damaged_model_file_refuses_to_start(tiny_variants, variant, tmp_path, fault):
    damaged = tmp_path / VARIANT
    shutil.copytree(variant[0], damaged)
    model = damaged / "model.onnx"
    if fault == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif fault == "replaced":  # another valid ONNX model under the same name
        other = next(v for v in ok_variants(variant[2]) if v["name"] == "int8-dynamic")
        shutil.copy(variant_dir(variant[2], other) / "model.onnx", model)
    else:
        model.unlink()
    server = _start({"TRIMSERVE_VARIANT_DIR": str(damaged), "TRIMSERVE_MANIFEST": str(tiny_variants / "manifest.json"),
                     "TRIMSERVE_API_KEYS": KEY}, tmp_path, fault)
    try:
        assert server.process.wait(60) != 0
    finally:
        server.stop()
    output = server.log.read_text()
    expected = "model.onnx (missing)" if fault == "missing" else "model.onnx (sha256 mismatch)"
    assert f"trimserve: refusing to serve onnx-fp32 from {damaged}: {expected}" in output, output[-2000:]
    assert KEY not in output


# --- lifecycle: a server of its own, since these tests kill it -------------------------------

HEAVY = {"texts": [f"{FRESH[0]} " * 6] * 32}  # 32 texts of ~64 tokens: a full model batch per request


@pytest.fixture(scope="module")
def disposable(variant, tiny_variants, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    (tmp / "keys").write_text(KEY + "\n")
    env = {"TRIMSERVE_VARIANT_DIR": str(variant[0]), "TRIMSERVE_MANIFEST": str(tiny_variants / "manifest.json"),
           "TRIMSERVE_API_KEYS_FILE": str(tmp / "keys"), "TRIMSERVE_MAX_LATENCY_MS": "60000",
           "TRIMSERVE_TIMEOUT_S": "60", "TRIMSERVE_THREADS": "1"}
    server = _start(env, tmp, "lifecycle")
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


def _in_background(n: int, body: dict, url: str) -> tuple[list, list[threading.Thread]]:
    """n requests started at once from threads; each result is a status code or an exception's name."""
    results: list = [None] * n

    def one(i: int) -> None:
        try:
            results[i] = httpx.post(f"{url}/classify", json=body, headers={"authorization": f"Bearer {KEY}"},
                                    timeout=60).status_code
        except httpx.HTTPError as err:
            results[i] = type(err).__name__

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return results, threads


def _wait_in_flight(url: str, at_least: int, timeout_s: float = 30) -> float:
    start = time.monotonic()
    while (value := _metrics(url)["trimserve_in_flight_requests{}"]) < at_least:
        assert time.monotonic() - start < timeout_s, f"only {value} requests in flight"
        time.sleep(0.05)
    return value


def test_killed_worker_is_restarted_and_its_requests_fail_fast(disposable):
    url, (worker,) = disposable.url, disposable.workers()
    results, threads = _in_background(12, HEAVY, url)
    _wait_in_flight(url, 6)
    os.kill(worker, signal.SIGKILL)
    start = time.monotonic()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung after its worker died"
    print(f"\nworker killed: {results} within {time.monotonic() - start:.1f} s")
    assert any(isinstance(r, str) for r in results), "no request was in flight when the worker died"
    assert set(results) <= {200, 503, "ReadError", "RemoteProtocolError", "WriteError", "ConnectError"}, results
    disposable.wait_ready(120)
    assert disposable.workers() and disposable.workers() != [worker]
    assert _post(url, {"texts": [FRESH[0]]}).status_code == 200
    metrics = _metrics(url)
    assert metrics["trimserve_in_flight_requests{}"] == 0  # the dead worker's gauges were dropped
    assert metrics["trimserve_ready{}"] == 1


def test_sigterm_answers_every_admitted_request_then_exits(disposable):
    url = disposable.url
    results, threads = _in_background(16, HEAVY, url)
    admitted = _wait_in_flight(url, 16)
    disposable.terminate()  # SIGTERM to the arbiter only, as `docker stop` or the kubelet sends it
    start = time.monotonic()
    time.sleep(0.5)
    try:  # a new connection after SIGTERM is refused, not served and not left hanging
        late = httpx.post(f"{url}/classify", json={"texts": [FRESH[0]]}, headers={"authorization": f"Bearer {KEY}"},
                          timeout=30).status_code
    except httpx.HTTPError as err:
        late = type(err).__name__
    for t in threads:
        t.join(60)
    code = disposable.process.wait(30)
    drained = time.monotonic() - start
    print(f"\nSIGTERM with {admitted:.0f} requests in flight: {results}; late request: {late}; "
          f"exit {code} after {drained:.1f} s")
    assert results == [200] * 16
    assert late != 200 and late in {503, "ConnectError", "ReadError", "RemoteProtocolError"}, late
    assert code == 0 and drained < 30


def test_logs_hold_no_key_and_no_text(server):
    """Last on purpose: by now every other test has sent its texts (all contain MARK) and keys."""
    assert _post(server.url, {"texts": [FRESH[0]]}).status_code == 200
    output = server.log.read_text()
    assert "POST,path=/classify" in output  # the access log is there, so there was something to leak into
    assert "invalid request to /classify [POST] -> 400" in output
    assert KEY not in output and MARK not in output and "wrong-key" not in output
    assert "Traceback" not in output

