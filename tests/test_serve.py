"""serve/: the plain pieces in-process, then the service end to end through a real `bentoml serve`."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
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
from serve.auth import BearerAuth
from serve.config import ServeConfig, resolve_variant
from serve.metrics import CountRejections
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
    keys.write_text("# comment\nalpha\n\n beta \n")
    config = ServeConfig.from_env({"TRIMSERVE_API_KEYS_FILE": str(keys), "TRIMSERVE_MAX_BATCH_SIZE": " 16 ",
                                   "TRIMSERVE_PROTECT_METRICS": "yes", "TRIMSERVE_THREADS": "", "TRIMSERVE_DEVICE": "cpu"})
    assert config.api_keys == ("alpha", "beta") and config.max_batch_size == 16 and config.protect_metrics
    assert config.threads is None and config.ort_threads >= 1 and config.device == "cpu"
    assert "alpha" not in repr(config)
    assert ServeConfig.from_env({"TRIMSERVE_API_KEYS": "a, b,"}).api_keys == ("a", "b")
    assert ServeConfig.from_env({"TRIMSERVE_ALLOW_NO_AUTH": "1"}).api_keys == ()


OPEN = {"TRIMSERVE_ALLOW_NO_AUTH": "1"}


@pytest.mark.parametrize("env, message", [
    ({**OPEN, "TRIMSERVE_MAX_BATCH_SIZE": "lots"}, r"^TRIMSERVE_MAX_BATCH_SIZE='lots' is not valid: expected an integer$"),
    ({**OPEN, "TRIMSERVE_MAX_BATCH_SIZE": "1"}, r"TRIMSERVE_MAX_BATCH_SIZE=1 is not valid: expected an integer >= 2"),
    ({**OPEN, "TRIMSERVE_TIMEOUT_S": "0"}, r"TRIMSERVE_TIMEOUT_S=0.0 is not valid: expected seconds > 0"),
    ({**OPEN, "TRIMSERVE_DEVICE": "tpu"}, r"TRIMSERVE_DEVICE='tpu' is not valid: expected one of auto, cpu, cuda"),
    ({**OPEN, "TRIMSERVE_PROTECT_METRICS": "maybe"}, r"TRIMSERVE_PROTECT_METRICS='maybe' is not valid: expected 1/true/yes"),
    ({**OPEN, "TRIMSERVE_MAX_BATCH": "8"}, r"unknown variable TRIMSERVE_MAX_BATCH; trimserve reads TRIMSERVE_SELECTED, "),
    ({"TRIMSERVE_API_KEYS": " , "}, r"TRIMSERVE_API_KEYS is set but holds no keys"),
    ({"TRIMSERVE_API_KEYS_FILE": "/nonexistent/keys"}, r"TRIMSERVE_API_KEYS_FILE='/nonexistent/keys' is not valid: no such file"),
    ({"TRIMSERVE_API_KEYS": "a", "TRIMSERVE_API_KEYS_FILE": "/k"}, r"both TRIMSERVE_API_KEYS and TRIMSERVE_API_KEYS_FILE"),
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


# --- in-process: auth and rejection counting ---------------------------------------------

def _app(**auth):
    ok = Starlette(routes=[Route(p, lambda r: PlainTextResponse("ok"), methods=["GET", "POST"])
                           for p in ("/classify", "/livez", "/readyz", "/healthz", "/metrics")])
    return CountRejections(BearerAuth(ok, keys=["first-key", "second-key"], **auth))


def _call(app, method: str, path: str, authorization: str | bytes | None = None) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, headers={"authorization": authorization} if authorization else {})
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
        BearerAuth(None, keys=[])


def test_rejections_are_counted_by_reason():
    auth = lambda: REGISTRY.get_sample_value("trimserve_rejected_requests_total", {"reason": "auth"})  # noqa: E731
    before = auth()
    _call(_app(), "POST", "/classify")
    assert auth() == before + 1


# --- end to end: a real `bentoml serve` ----------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(env: dict, tmp: Path, name: str) -> tuple[subprocess.Popen, int, Path]:
    """`bentoml serve` on a free port with its own BENTOML_HOME (it wipes its metrics dir at start)."""
    port, log = _free_port(), tmp / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMSERVE_")}
    full_env.update(BENTOML_HOME=str(tmp / f"{name}-home"), BENTOML_DO_NOT_TRACK="True", **env)
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serve.service:Classifier", "--host",
                                    "127.0.0.1", "--port", str(port), "--working-dir", str(REPO)], cwd=REPO, env=full_env,
                                   start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    return process, port, log


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group stops the arbiter and its workers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Server:
    url: str
    log: Path
    model_sha256: str


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
    process, port, log = _start(env, tmp, "server")
    url, start = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:  # not bound yet, or busy loading: /readyz hangs until the worker is up
                pass
            assert time.monotonic() - start < 120, "server not ready after 120 s"
            time.sleep(0.2)
        print(f"\nbentoml serve ready in {time.monotonic() - start:.1f} s")
        yield Server(url, log, entry["files"]["model.onnx"]["sha256"])
    finally:
        _stop(process)


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


def test_overload_gets_429_and_keeps_serving(server):
    url = server.url
    statuses = _in_threads(80, lambda i: _post(url, {"texts": [f"{FRESH[0]} {i}"] * 8}).status_code)
    assert set(statuses) <= {200, 429, 503} and 429 in statuses, sorted(statuses)
    # 429s are answered before trimserve's middleware; BentoML counts them
    assert any("http_response_code=429" in k and v > 0 for k, v in _metrics(url).items()
               if k.startswith("bentoml_service_request_total{"))
    assert _post(url, {"texts": [FRESH[0]]}).status_code == 200


def test_tampered_model_refuses_to_start(tiny_variants, variant, tmp_path):
    tampered = tmp_path / VARIANT
    shutil.copytree(variant[0], tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.onnx").write_bytes(data)
    process, _, log = _start({"TRIMSERVE_VARIANT_DIR": str(tampered), "TRIMSERVE_MANIFEST": str(tiny_variants / "manifest.json"),
                              "TRIMSERVE_API_KEYS": KEY}, tmp_path, "tampered")
    try:
        assert process.wait(60) != 0
    finally:
        _stop(process)
    output = log.read_text()
    assert "refusing to serve onnx-fp32" in output and "model.onnx (sha256 mismatch)" in output, output[-2000:]
    assert KEY not in output


def test_logs_hold_no_key_and_no_text(server):
    """Last on purpose: by now every other test has sent its texts (all contain MARK) and keys."""
    assert _post(server.url, {"texts": [FRESH[0]]}).status_code == 200
    output = server.log.read_text()
    assert "POST,path=/classify" in output  # the access log is there, so there was something to leak into
    assert "invalid request to /classify [POST] -> 400" in output
    assert KEY not in output and MARK not in output and "wrong-key" not in output
