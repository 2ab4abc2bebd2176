"""serve/: the plain pieces in-process (config, variant resolution, auth, guard, metrics, refusals).

The service through a real `bentoml serve` is in test_serve_e2e.py."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serve.auth import KeyStore, RateLimiter, digest, parse_keys
from serve.batching import Batcher, Engine, chunk_bounds
from serve.classifier import OnnxClassifier
from serve.config import ServeConfig, check_device, gpu_of_worker, resolve_variant, visible_gpus
from serve.contract import Selection, UserError, sha256_file, write
from serve.gate import Gate
from serve.schema import Limits
from tests.conftest import REPO

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
    config = ServeConfig.from_env(
        {
            "TRIMSERVE_API_KEYS_FILE": str(keys),
            "TRIMSERVE_MAX_BATCH_SIZE": " 16 ",
            "TRIMSERVE_PROTECT_METRICS": "yes",
            "TRIMSERVE_THREADS": "",
            "TRIMSERVE_DEVICE": "cpu",
        }
    )
    assert config.api_keys == (digest("alpha"), digest("beta"), digest("gamma"))  # kept as digests only
    assert config.max_batch_size == 16 and config.protect_metrics
    assert config.threads is None and config.ort_threads >= 1 and config.device == "cpu"
    assert "alpha" not in repr(config)
    assert ServeConfig.from_env({"TRIMSERVE_API_KEYS": "a, b,"}).api_keys == ("a", "b")
    assert ServeConfig.from_env({"TRIMSERVE_ALLOW_NO_AUTH": "1"}).api_keys == ()


OPEN = {"TRIMSERVE_ALLOW_NO_AUTH": "1"}


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {**OPEN, "TRIMSERVE_MAX_BATCH_SIZE": "lots"},
            r"^TRIMSERVE_MAX_BATCH_SIZE='lots' is not valid: expected an integer$",
        ),
        (
            {**OPEN, "TRIMSERVE_MAX_BATCH_SIZE": "1"},
            r"TRIMSERVE_MAX_BATCH_SIZE=1 is not valid: expected an integer >= 2",
        ),
        ({**OPEN, "TRIMSERVE_TIMEOUT_S": "0"}, r"TRIMSERVE_TIMEOUT_S=0.0 is not valid: expected seconds > 0"),
        (
            {**OPEN, "TRIMSERVE_BODY_TIMEOUT_S": "10"},
            r"TRIMSERVE_BODY_TIMEOUT_S=10.0 is not valid: expected seconds > 0 and "
            r"below TRIMSERVE_TIMEOUT_S=10.0",
        ),
        ({**OPEN, "TRIMSERVE_DEVICE": "tpu"}, r"TRIMSERVE_DEVICE='tpu' is not valid: expected one of auto, cpu, cuda"),
        (
            {**OPEN, "TRIMSERVE_PROTECT_METRICS": "maybe"},
            r"TRIMSERVE_PROTECT_METRICS='maybe' is not valid: expected 1/true/yes",
        ),
        (
            {**OPEN, "TRIMSERVE_MAX_BATCH": "8"},
            r"unknown variable TRIMSERVE_MAX_BATCH; trimserve reads TRIMSERVE_SELECTED, ",
        ),
        ({"TRIMSERVE_API_KEYS": " , "}, r"TRIMSERVE_API_KEYS is set but holds no keys"),
        (
            {"TRIMSERVE_API_KEYS_FILE": "/nonexistent/keys"},
            r"TRIMSERVE_API_KEYS_FILE='/nonexistent/keys' is not valid: no such file",
        ),
        (
            {"TRIMSERVE_API_KEYS": "a", "TRIMSERVE_API_KEYS_FILE": "/k"},
            r"both TRIMSERVE_API_KEYS and TRIMSERVE_API_KEYS_FILE",
        ),
        (
            {**OPEN, "TRIMSERVE_MAX_BODY_BYTES": "100"},
            r"TRIMSERVE_MAX_BODY_BYTES=100 is not valid: expected an integer >= 1024",
        ),
        ({**OPEN, "TRIMSERVE_MAX_LAG_MS": "-1"}, r"TRIMSERVE_MAX_LAG_MS=-1.0 is not valid: expected milliseconds >= 0"),
        ({**OPEN, "TRIMSERVE_MAX_PADDING": "-0.5"}, r"TRIMSERVE_MAX_PADDING=-0.5 is not valid: expected a share >= 0"),
        (
            {**OPEN, "TRIMSERVE_RATE_LIMIT_RPS": "-1"},
            r"TRIMSERVE_RATE_LIMIT_RPS=-1.0 is not valid: expected requests/s >= 0",
        ),
        ({}, r"no API keys: set TRIMSERVE_API_KEYS_FILE .* or TRIMSERVE_ALLOW_NO_AUTH=1"),
    ],
)
def test_config_errors_name_the_variable(env, message):
    with pytest.raises(UserError, match=message):
        ServeConfig.from_env(env)


def test_config_error_never_echoes_a_key():
    with pytest.raises(UserError) as err:
        ServeConfig.from_env({"TRIMSERVE_API_KEYS": "sekrit", "TRIMSERVE_API_KEYS_FILE": "/k"})
    assert "sekrit" not in str(err.value)


def test_cuda_takes_the_gpu_defaults_unless_set(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cpu = ServeConfig.from_env(OPEN)
    assert (cpu.workers, cpu.max_batch_size, cpu.max_concurrency) == (1, 32, 32)
    gpu = ServeConfig.from_env({**OPEN, "TRIMSERVE_DEVICE": "cuda"})
    assert (gpu.workers, gpu.max_batch_size, gpu.max_concurrency) == (2, 128, 512)  # one worker per GPU
    one = ServeConfig.from_env({**OPEN, "TRIMSERVE_DEVICE": "cuda", "TRIMSERVE_WORKERS": "1"})
    assert (one.workers, one.max_batch_size, one.max_concurrency) == (1, 128, 256)
    set_ = ServeConfig.from_env({**OPEN, "TRIMSERVE_DEVICE": "cuda", "TRIMSERVE_MAX_CONCURRENCY": "8"})
    assert (set_.workers, set_.max_concurrency) == (2, 8)
    assert [gpu_of_worker(i) for i in (None, 1, 2, 3)] == [0, 0, 1, 0]


@pytest.mark.parametrize("visible, gpus", [("0,1,2", 3), ("1", 1), ("", 0), ("0,-1,2", 1), ("-1", 0)])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, visible, gpus):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus() == gpus


def test_device_cuda_refuses_a_cpu_only_onnxruntime(served_variant):
    directory = served_variant[3]
    with pytest.raises(UserError, match=r"^TRIMSERVE_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider"):
        check_device(ServeConfig(device="cuda", allow_no_auth=True), directory / "model.onnx")
    check_device(ServeConfig(device="cpu", allow_no_auth=True), directory / "model.onnx")  # nothing to check
    with pytest.raises(UserError, match=r"^device cuda was asked for, but ONNX Runtime runs .* on CPUExecution"):
        OnnxClassifier.load(directory, served_variant[2], device="cuda")


def _select(path: Path, manifest_file: Path, variant: str = VARIANT) -> Path:
    """A selection file as perf/ writes it, pointing at ``manifest_file`` by relative path and sha256."""
    return write(
        path,
        Selection(
            variant=variant,
            manifest=os.path.relpath(manifest_file, path.parent),
            manifest_sha256=sha256_file(manifest_file),
            rule={"by": "test"},
        ),
    )


def test_resolve_variant(served_variant, tiny_fp32, tmp_path):
    manifest, entry, record, directory = served_variant
    selected = tmp_path / "selected.json"
    config = ServeConfig(selected=str(selected), allow_no_auth=True)
    with pytest.raises(UserError, match=r"selected.json does not exist; `python -m perf` writes it"):
        resolve_variant(config)
    _select(selected, tiny_fp32 / "manifest.json")
    resolved = resolve_variant(config)
    assert (resolved.name, resolved.directory.resolve(), resolved.record) == (VARIANT, directory.resolve(), record)
    assert resolved.record.max_length == 64 and resolved.model_sha256 == entry.files["model.onnx"]["sha256"]
    selected.write_text(json.dumps({"kind": "trimserve.selection", "version": 1, "variant": VARIANT}))
    with pytest.raises(
        UserError,
        match=r"selected.json is not a valid trimserve.selection record \(missing manifest, "
        r"manifest_sha256, rule\); re-run `python -m perf`",
    ):
        resolve_variant(config)
    selected.write_text(json.dumps({"kind": "trimserve.selection", "version": 9}))
    with pytest.raises(UserError, match=r"has version 9 of trimserve.selection, this trimserve reads version 1"):
        resolve_variant(config)

    copy = tmp_path / "variants"  # a manifest changed after the selection was made
    shutil.copytree(tiny_fp32, copy)
    _select(selected, copy / "manifest.json")
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text().replace('"seconds"', '"seconds" '))
    with pytest.raises(UserError, match=r"was made for another .*manifest.json \(sha256 differs\)"):
        resolve_variant(config)
    _select(selected, copy / "manifest.json")
    (copy / VARIANT / "tokenizer.json").unlink()
    with pytest.raises(
        UserError,
        match=r"variant onnx-fp32 in .* does not match .*manifest.json: tokenizer.json "
        r"\(missing\); re-run `python -m export`",
    ):
        resolve_variant(config)
    _select(selected, copy / "manifest.json", variant="int8-dynamic")
    with pytest.raises(UserError, match=r"'int8-dynamic' is not an ok variant of .*; choose one of onnx-fp32"):
        resolve_variant(config)

    with pytest.raises(UserError, match=r"none does not exist; `python -m export` writes it"):
        resolve_variant(
            ServeConfig(variant_dir=str(copy / VARIANT), manifest=str(tmp_path / "none"), allow_no_auth=True)
        )
    with pytest.raises(UserError, match=r"holds no readable variant.json; TRIMSERVE_VARIANT_DIR must name a variant"):
        resolve_variant(ServeConfig(variant_dir=str(tmp_path), manifest=str(copy), allow_no_auth=True))
    shutil.copy(tiny_fp32 / VARIANT / "tokenizer.json", copy / VARIANT / "tokenizer.json")
    by_dir = resolve_variant(ServeConfig(variant_dir=str(copy / VARIANT), allow_no_auth=True))
    assert by_dir.record == record


# --- in-process: the gate (auth, guard, schema, model path) around a real tiny model ----------------

LIMITS = Limits(max_texts=8, max_chars=2000)
GOOD = {"texts": ["A masterpiece: moving, funny and beautifully acted."]}
KEYS = ("first-key", "second-key")


@pytest.fixture(scope="module")
def engine(served_variant) -> Engine:
    _, _, record, directory = served_variant
    classifier = OnnxClassifier.load(directory, record, threads=1)
    return Engine(classifier, Batcher(classifier, 8, 1024, max_queue_s=5.0), ready=True)


def test_model_calls_group_texts_of_similar_length():
    lengths = [10, 10, 11, 12, 20, 21, 22, 60, 300]
    bounds = chunk_bounds(lengths, max_batch_size=32, max_batch_tokens=4096, max_padding=0.1)
    assert bounds == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 9)]  # every call covered once, in order
    for start, end in bounds:
        chunk = lengths[start:end]
        assert len(chunk) * max(chunk) <= 1.1 * sum(chunk)
    assert chunk_bounds([5] * 10, 4, 4096, 0.1) == [(0, 4), (4, 8), (8, 10)]  # max_batch_size
    assert chunk_bounds([50] * 4, 32, 100, 0.1) == [(0, 2), (2, 4)]  # max_batch_tokens
    assert chunk_bounds([500], 32, 100, 0.1) == [(0, 1)]  # too long for the token limit: runs alone
    assert chunk_bounds([10, 20, 30], 32, 4096, 10.0) == [(0, 3)]  # padding allowed: one call
    with pytest.raises(ValueError, match="sorted"):
        chunk_bounds([3, 2], 32, 4096, 0.1)


def _ok_app(delay_s: float = 0.0):
    """BentoML's stand-in behind the gate: answers "ok" on the routes the gate passes through."""

    async def ok(request):
        await request.body()
        await asyncio.sleep(delay_s)
        return PlainTextResponse("ok")

    paths = ("/classify", "/livez", "/readyz", "/healthz", "/metrics", "/schema.json", "/docs.json")
    return Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in paths])


def _gate(engine: Engine, app=None, keys=KEYS, **options) -> Gate:
    store = keys if isinstance(keys, KeyStore) else KeyStore(keys) if keys else None
    return Gate(app or _ok_app(), engine, LIMITS, keys=store, **options)


def _call(
    app, method: str, path: str, authorization: str | bytes | None = None, headers: dict | None = None, **kwargs
) -> httpx.Response:
    headers = {**(headers or {}), **({"authorization": authorization} if authorization else {})}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def _classify(app, body=GOOD, key: str | None = "first-key", **kwargs) -> httpx.Response:
    return _call(app, "POST", "/classify", f"Bearer {key}" if key else None, json=body, **kwargs)


def test_the_gate_answers_classify_with_the_models_own_probabilities(engine):
    texts = ["A great film.", "Awful, awful, awful.", " ".join(["long"] * 300)]
    response = _classify(_gate(engine), {"texts": texts})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    expected = engine.classifier.predict(texts)  # the same model called directly, batch of 3
    got = response.json()
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    for served, direct in zip(got, expected, strict=True):
        assert set(served["probabilities"]) == {"fresh", "rotten"}
        assert served["score"] == pytest.approx(direct["score"], abs=1e-5)
        assert served["score"] == max(served["probabilities"].values())


def test_bearer_auth(engine):
    app = _gate(engine)
    for authorization in (None, "Bearer wrong", "Basic first-key", "Bearer", "Bearer cl\u00e9".encode()):
        response = _call(app, "POST", "/classify", authorization, json=GOOD)
        assert response.status_code == 401, authorization
        assert response.json()["error"]["type"] == "auth"
        assert response.headers["www-authenticate"].startswith('Bearer realm="trimserve"')
    assert 'error="invalid_token"' in _classify(app, key="x").headers["www-authenticate"]
    for key in KEYS:
        assert _classify(app, key=key).status_code == 200
    assert _call(app, "GET", "/docs.json").status_code == 401  # every other route needs a key too
    assert _call(app, "GET", "/docs.json", "Bearer first-key").text == "ok"
    # health, and the schema BentoML's clients fetch first (so a wrong key shows as the 401 it is)
    assert all(_call(app, "GET", p).text == "ok" for p in ("/livez", "/readyz", "/healthz", "/schema.json"))
    assert _call(app, "GET", "/metrics").headers["content-type"].startswith("text/plain; version=")
    assert _call(_gate(engine, protect_metrics=True), "GET", "/metrics").status_code == 401
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
    def run(key: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "serve", "hash-key"], input=key, capture_output=True, text=True, cwd=REPO
        )

    done = run("my-secret-key\n")
    assert done.returncode == 0 and done.stdout.strip() == digest("my-secret-key")
    assert parse_keys([done.stdout]) == (digest("my-secret-key"),)  # the line goes into the keys file as is
    empty = run("")
    assert empty.returncode == 2
    assert empty.stderr.strip() == "trimserve: no key on stdin; e.g. python -m serve hash-key < key.txt"


def test_keys_file_is_reloaded_when_it_changes(engine, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    app = _gate(engine, keys=KeyStore(path=keys, check_every_s=0))
    assert _classify(app, key="old-key").status_code == 200
    keys.write_text(f"{digest('new-key')}\n")  # rotate: the old key is revoked, the new one hashed at rest
    assert _classify(app, key="new-key").status_code == 200
    assert _classify(app, key="old-key").status_code == 401
    for broken in ("", "sha256:nothex\n"):  # an unusable file keeps the keys in use
        keys.write_text(broken)
        assert _classify(app, key="new-key").status_code == 200
    keys.unlink()
    assert _classify(app, key="new-key").status_code == 200
    replacement = tmp_path / "keys.new"  # how a Kubernetes Secret volume updates: a new file moved into place
    replacement.write_text("third-key\n")
    replacement.rename(keys)
    assert _classify(app, key="third-key").status_code == 200


def test_rate_limit_is_a_token_bucket_per_key(engine):
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.wait_s("a", now=10.0) for _ in range(4)] == [0, 0, 0, 0.5]
    assert limiter.wait_s("b", now=10.0) == 0  # keys have their own buckets
    assert limiter.wait_s("a", now=10.5) == 0 and limiter.wait_s("a", now=10.5) == 0.5
    assert limiter.wait_s("a", now=100.0) == 0  # refilled, but never above the burst
    assert [limiter.wait_s("a", now=100.0) for _ in range(3)] == [0, 0, 0.5]
    app = _gate(engine, rate_limit=RateLimiter(rate=0.5, burst=2))
    statuses = [_classify(app) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[2].headers["retry-after"] == "2" and "rate limit" in statuses[2].json()["error"]["message"]
    assert _classify(app, key="second-key").status_code == 200


def _json_of_size(size: int) -> bytes:
    """A valid request body of exactly ``size`` bytes."""
    frame = b'{"texts": [""]}'
    return frame[:12] + b"a" * (size - len(frame)) + frame[12:]


def test_guard_limits_body_size_and_type_before_parsing(engine):
    app, json_type = _gate(engine, max_body_bytes=1000), {"content-type": "application/json"}
    assert (
        _call(app, "POST", "/classify", "Bearer first-key", content=_json_of_size(1000), headers=json_type).status_code
        == 200
    )
    too_big = _call(app, "POST", "/classify", "Bearer first-key", content=_json_of_size(1001), headers=json_type)
    assert too_big.status_code == 413 and "1001 bytes is over the limit of 1000" in too_big.json()["error"]["message"]

    async def chunks():  # no Content-Length: sent chunked
        yield b"x" * 600
        yield b"x" * 600

    chunked = _call(app, "POST", "/classify", "Bearer first-key", content=chunks(), headers=json_type)
    assert "content-length" not in chunked.request.headers and chunked.status_code == 413
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        response = _call(
            app,
            "POST",
            "/classify",
            "Bearer first-key",
            content=json.dumps(GOOD),
            headers={"content-type": content_type} if content_type else {},
        )
        assert response.status_code == 415, content_type
        assert response.json()["error"]["type"] == "unsupported_media_type"
    charset = {"content-type": "Application/JSON; charset=utf-8"}
    assert (
        _call(app, "POST", "/classify", "Bearer first-key", content=json.dumps(GOOD), headers=charset).status_code
        == 200
    )


@pytest.mark.parametrize(
    "body, where, why",
    [
        ({"texts": [""]}, ["texts", 0], "empty or only whitespace"),
        ({"texts": ["ok", "\u200b\u200c\u200d\ufeff"]}, ["texts", 1], "no tokens the model knows"),
        ({"texts": ["\u00ad", "\u0301"]}, ["texts", 0], "no tokens the model knows"),
        ({"texts": ["\ue000"]}, ["texts", 0], "no tokens the model knows"),  # private use: [UNK]? no: erased
        ({"texts": ["ok", 42]}, ["texts", 1], "expected a string"),
        ({"texts": ["a"] * 9}, ["texts"], "expected 1 to 8 texts, got 9"),
        ({"texts": []}, ["texts"], "expected 1 to 8 texts, got 0"),
        ({"texts": "one"}, ["texts"], "expected a list of strings"),
        ({"texts": ["ok"], "labels": ["fresh"]}, ["labels"], "unknown field; the request takes only 'texts'"),
        ({"text": ["ok"]}, ["texts"], "field required"),
        ({"texts": ["x" * 2001]}, ["texts", 0], "text longer than 2000 characters"),
        (b'{"texts": ["unterminated', [], "body is not valid JSON"),
        (b'{"texts": ["\\ud800 lone"]}', ["texts", 0], "lone surrogate"),
        (b"[1, 2]", [], "expected an object"),
    ],
)
def test_schema_is_strict_and_says_where(engine, body, where, why):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = _call(
        _gate(engine),
        "POST",
        "/classify",
        "Bearer first-key",
        content=content,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "validation" and error["message"]
    assert any(d["loc"] == where and why in d["msg"] for d in error["details"]), error["details"]
    assert all(set(d) == {"loc", "msg", "type"} for d in error["details"])  # never the input itself


def test_guard_admits_a_bounded_number_and_refuses_the_rest_at_once(engine):
    app = _gate(engine, app=_ok_app(delay_s=0.5), fast_path=False, max_in_flight=2)

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:

            async def one():
                start = time.perf_counter()
                response = await client.post("/classify", json=GOOD, headers={"authorization": "Bearer first-key"})
                return response, time.perf_counter() - start

            return await asyncio.gather(*(one() for _ in range(5)))

    count = lambda code: REGISTRY.get_sample_value("trimserve_requests_total", {"code": code}) or 0  # noqa: E731
    before = count("503")
    results = asyncio.run(burst())
    assert sorted(r.status_code for r, _ in results) == [200, 200, 503, 503, 503]
    assert [r.text for r, _ in results if r.status_code == 200] == ["ok", "ok"]  # forwarded to the app behind
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and t < 0.25 for r, t in refused)  # at once, not after the work
    assert count("503") == before + 3
    assert REGISTRY.get_sample_value("trimserve_in_flight_requests") == 0
    assert REGISTRY.get_sample_value("trimserve_in_flight_limit") == 2


def test_guard_refuses_new_requests_while_the_event_loop_is_behind(engine):
    async def handler(request):
        if b"block" in await request.body():
            time.sleep(0.4)  # a stall of the whole event loop, as when it cannot keep up
        return PlainTextResponse("ok")

    app = _gate(
        engine, app=Starlette(routes=[Route("/classify", handler, methods=["POST"])]), fast_path=False, max_lag_s=0.1
    )

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            auth = {"authorization": "Bearer first-key"}
            post = lambda text: client.post("/classify", json={"texts": [text]}, headers=auth)  # noqa: E731
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
    assert refused.status_code == 503 and "ms behind" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"


def test_guard_refuses_a_body_that_never_completes(engine):
    async def trickle():
        yield b'{"texts": '
        await asyncio.sleep(5)
        yield b"[]}"

    response = _call(
        _gate(engine, body_timeout_s=0.3),
        "POST",
        "/classify",
        "Bearer first-key",
        content=trickle(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 408 and response.json()["error"]["type"] == "slow_body"


def test_rejections_are_counted_by_reason(engine):
    auth = lambda: REGISTRY.get_sample_value("trimserve_rejected_requests_total", {"reason": "auth"})  # noqa: E731
    before = auth()
    _classify(_gate(engine), key=None)
    assert auth() == before + 1


def _busy(engine: Engine, texts: int = 128) -> None:
    """Occupy the model thread for a while with one big request of long texts, straight into the queue."""
    long_text = engine.classifier.tokenize([" ".join(["film"] * 200)])
    loop = asyncio.new_event_loop()
    engine.batcher.submit(long_text * texts, loop)  # its result is delivered to a loop nobody runs: dropped


def _model_calls() -> float:
    return REGISTRY.get_sample_value("trimserve_batch_size_count") or 0.0


def test_concurrent_requests_share_model_calls(engine):
    app = _gate(engine)

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            auth = {"authorization": "Bearer first-key"}
            return await asyncio.gather(
                *(client.post("/classify", json={"texts": [f"A fine film {i}."]}, headers=auth) for i in range(16))
            )

    before = _model_calls()
    _busy(engine, texts=64)  # while the model thread is busy, the 16 requests queue and then share calls
    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 16
    calls = _model_calls() - before - 64 / 8  # the busy request ran in 8 calls of 8 texts
    assert calls <= 4, f"16 requests that queued together took {calls:.0f} model calls"


def test_a_request_past_its_deadline_gets_504_and_never_reaches_the_model(engine):
    timeouts = lambda: REGISTRY.get_sample_value("trimserve_rejected_requests_total", {"reason": "timeout"})  # noqa: E731
    before_timeouts, before_texts = timeouts(), REGISTRY.get_sample_value("trimserve_batch_size_sum")
    _busy(engine)
    started = time.perf_counter()
    response = _classify(_gate(engine, timeout_s=0.1))
    assert response.status_code == 504 and time.perf_counter() - started < 0.4
    assert response.json()["error"] == {"type": "timeout", "message": "not answered within 0.1 s", "details": []}
    assert timeouts() == before_timeouts + 1
    _wait_idle(engine)
    # The model ran the 128 texts of the busy request, and not the abandoned one.
    assert REGISTRY.get_sample_value("trimserve_batch_size_sum") - before_texts == 128


def test_a_request_whose_client_left_never_reaches_the_model(engine):
    cancelled = lambda: REGISTRY.get_sample_value("trimserve_requests_total", {"code": "cancelled"}) or 0  # noqa: E731
    before, before_texts = cancelled(), REGISTRY.get_sample_value("trimserve_batch_size_sum")
    _busy(engine)
    body = json.dumps(GOOD).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/classify",
        "headers": [
            (b"authorization", b"Bearer first-key"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    asyncio.run(_gate(engine)(scope, receive, send))
    assert sent == [] and cancelled() == before + 1  # nobody to answer, counted as cancelled
    _wait_idle(engine)
    assert REGISTRY.get_sample_value("trimserve_batch_size_sum") - before_texts == 128


def _wait_idle(engine: Engine, timeout_s: float = 60) -> None:
    """Until the model thread has taken every queued job and finished its round."""
    start = time.monotonic()
    while engine.batcher.queue or engine.batcher.busy:
        assert time.monotonic() - start < timeout_s, "the model thread did not finish"
        time.sleep(0.02)


def test_threads_follow_the_cgroup_cpu_quota(tmp_path):
    from serve.config import available_cores, cpu_quota

    affinity = len(os.sched_getaffinity(0))
    assert cpu_quota(tmp_path) is None and available_cores(tmp_path) == (affinity, "CPU affinity")
    (tmp_path / "cpu.max").write_text("max 100000\n")  # cgroup v2, no limit
    assert cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # docker run --cpus=0.5
    assert cpu_quota(tmp_path) == 0.5 and available_cores(tmp_path) == (1, "cgroup CPU quota 0.5")
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 1.5
    assert available_cores(v1) == ((2, "cgroup CPU quota 1.5") if affinity > 2 else (affinity, "CPU affinity"))
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1) is None


def test_metrics_page_lists_histograms_in_the_canonical_order():
    from prometheus_client.parser import text_string_to_metric_families

    from serve import metrics

    metrics.QUEUE_SECONDS.observe(0.003)
    page = metrics.exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(page)}
    assert "trimserve_queue_seconds" in families and "trimserve_requests" in families
    for family in families.values():
        if family.type != "histogram":
            continue
        names = [s.name.rsplit("_", 1)[-1] for s in family.samples]
        assert names == ["bucket"] * (len(names) - 2) + ["count", "sum"], (family.name, names)
        bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")


def _raw_app(status: int, body: bytes, content_type: bytes = b"application/json", delay_s: float = 0.0):
    """An ASGI app that answers ``status`` with ``body``, as BentoML or Starlette would, after ``delay_s``."""

    async def app(scope, receive, send):
        await asyncio.sleep(delay_s)
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body[:5], "more_body": True})
        await send({"type": "http.response.body", "body": body[5:]})

    return app


BENTOML_400 = json.dumps(
    {
        "error": "1 validation error for Input",
        "detail": [
            {
                "type": "string_too_short",
                "loc": ["texts", 0],
                "msg": "String should have at least 1 character",
                "url": "https://errors.pydantic.dev/2/v/string_too_short",
            }
        ],
    }
).encode()


@pytest.mark.parametrize(
    "status, body, content_type, expected",
    [
        (
            400,
            BENTOML_400,
            b"application/json",
            {
                "type": "validation",
                "message": "1 validation error for Input",
                "details": [
                    {"loc": ["texts", 0], "msg": "String should have at least 1 character", "type": "string_too_short"}
                ],
            },
        ),
        (404, b"Not Found", b"text/plain", {"type": "not_found", "message": "Not Found", "details": []}),
        (
            405,
            b"Method Not Allowed",
            b"text/plain",
            {"type": "not_found", "message": "Method Not Allowed", "details": []},
        ),
        (
            500,
            b'{"error": "An unexpected error has occurred, please check the server log."}',
            b"application/json",
            {
                "type": "internal",
                "message": "an unexpected error occurred; the server log has the details",
                "details": [],
            },
        ),
        (
            503,
            b'{"error": "An unexpected error has occurred"}',
            b"application/json",
            {
                "type": "overload",
                "message": "overloaded: queued work would miss the batching deadline; retry shortly",
                "details": [],
            },
        ),
    ],
)
def test_every_error_body_from_behind_the_gate_gets_one_shape(engine, status, body, content_type, expected):
    response = _call(_gate(engine, app=_raw_app(status, body, content_type), keys=None), "GET", "/docs.json")
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert response.json() == {"error": expected}
    assert int(response.headers["content-length"]) == len(response.content)
    ok = _call(_gate(engine, app=_raw_app(200, b'[{"label": "fresh"}]'), keys=None), "GET", "/docs.json")
    assert ok.json() == [{"label": "fresh"}]  # successes pass untouched


def test_a_route_behind_the_gate_over_the_timeout_gets_504_in_the_same_shape(engine):
    count = lambda: REGISTRY.get_sample_value("trimserve_rejected_requests_total", {"reason": "timeout"})  # noqa: E731
    before = count()
    slow = _gate(engine, app=_raw_app(200, b"[]", delay_s=1.0), keys=None, timeout_s=0.2)
    start = time.perf_counter()
    response = _call(slow, "GET", "/docs.json")
    assert time.perf_counter() - start < 0.8
    assert response.status_code == 504
    assert response.json() == {"error": {"type": "timeout", "message": "not answered within 0.2 s", "details": []}}
    assert count() == before + 1
    fast = _gate(engine, app=_raw_app(200, b"[]", delay_s=0.05), keys=None, timeout_s=0.5)
    assert _call(fast, "GET", "/docs.json").json() == []


def test_refusal_types_are_a_closed_set_with_one_status_each():
    from serve import refusals

    assert set(refusals.TYPES) == {
        "auth",
        "validation",
        "not_found",
        "slow_body",
        "too_large",
        "unsupported_media_type",
        "rate_limit",
        "internal",
        "overload",
        "timeout",
    }
    assert [refusals.type_for(s) for s in (401, 403, 400, 422, 413, 415, 429, 503, 504, 500, 502)] == [
        "auth",
        "auth",
        "validation",
        "validation",
        "too_large",
        "unsupported_media_type",
        "rate_limit",
        "overload",
        "timeout",
        "internal",
        "internal",
    ]
    with pytest.raises(AssertionError):
        refusals.body("teapot", "no")
