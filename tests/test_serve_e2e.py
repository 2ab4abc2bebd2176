"""serve/ end to end: the service through a real `bentoml serve` (slow: each server takes seconds to start)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.auth import digest
from serve.launch import ServerProcess
from tests.test_serve import FRESH, MARK, ROTTEN, VARIANT, _select

pytestmark = pytest.mark.slow

KEY = "tk-" + secrets.token_hex(16)


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
def server(served_variant, tiny_fp32, tmp_path_factory):
    """The service on a selection file as perf/ writes it, with one key."""
    tmp = tmp_path_factory.mktemp("serve")
    entry = served_variant[1]
    selected = _select(tmp / "selected.json", tiny_fp32 / "manifest.json")
    (tmp / "keys").write_text(KEY + "\n")
    env = {
        "TRIMSERVE_SELECTED": str(selected),
        "TRIMSERVE_API_KEYS_FILE": str(tmp / "keys"),
        # generous: this shared 2-core machine runs a batch of 32 in ~0.3 s, and a missed
        # deadline is a 503 rather than a wait
        "TRIMSERVE_MAX_LATENCY_MS": "10000",
        "TRIMSERVE_MAX_CONCURRENCY": "48",
        "TRIMSERVE_MAX_TEXTS_PER_REQUEST": "8",
        "TRIMSERVE_MAX_TEXT_CHARS": "2000",
    }
    server = _start(env, tmp, "server")
    try:
        print(f"\nbentoml serve ready in {server.wait_ready(120):.1f} s")
        yield Server(server.url, server.log, entry.files["model.onnx"]["sha256"], tmp / "keys")
    finally:
        server.stop()


def _post(url: str, body, key: str | None = KEY) -> httpx.Response:
    """POST /classify with ``body`` as JSON (raw when it is bytes) and the key."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(
            f"{url}/classify", content=body, headers={**headers, "content-type": "application/json"}, timeout=30
        )
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
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
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
    from bentoml.exceptions import BentoMLException

    url = server.url
    with bentoml.SyncHTTPClient(url, token=KEY, timeout=30) as client:
        assert client.classify(texts=[FRESH[0]])[0]["label"] == "fresh"
    # A wrong key shows as the 401 it is: the schema the client reads first needs no key.
    with bentoml.SyncHTTPClient(url, token="wrong-key", timeout=30) as client:
        with pytest.raises(BentoMLException, match=r"invalid API key") as err:
            client.classify(texts=[FRESH[0]])
    assert err.value.error_code == 401


@pytest.mark.parametrize(
    "body, where",
    [
        ({"texts": [""]}, ["texts", 0]),
        ({"texts": ["   \n"]}, ["texts", 0]),
        ({"texts": [f"ok {MARK}", 42]}, ["texts", 1]),
        ({"texts": [f"too many {MARK}"] * 9}, ["texts"]),
        ({"texts": []}, ["texts"]),
        ({"texts": f"not a list {MARK}"}, ["texts"]),
        ({"text": [f"wrong field {MARK}"]}, ["texts"]),
        ({"texts": [f"ok {MARK}"], "labels": ["fresh"]}, ["labels"]),
        ({"texts": [f"ok {MARK}", "\u200b\u200d\ufeff\u00ad"]}, ["texts", 1]),
        ({"texts": [MARK + "x" * 2000]}, ["texts", 0]),
        (b'{"texts": ["unterminated ' + MARK.encode(), []),
    ],
)
def test_validation_errors_are_json_400(server, body, where):
    url = server.url
    response = _post(url, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "validation" and error["message"] and where in [d["loc"] for d in error["details"]]
    assert all(set(d) == {"loc", "msg", "type"} for d in error["details"])  # never the input itself
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
    assert after["trimserve_rejected_requests_total{reason=validation}"] >= 11
    assert [k for k, v in after.items() if k.startswith("trimserve_model_info{") and v == 1] == [
        f"trimserve_model_info{{sha256={server.model_sha256},variant={VARIANT}}}"
    ]
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
    # One text per request, so any model call with more than one text merged requests; the
    # requests that arrive while the model thread is busy share its next call.
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
    # Texts at the model's max length keep the model busy long enough that 160 requests released
    # together exceed the 48 admitted, however fast the machine (short texts raced it: a quiet
    # machine answered 80 of them before the last ones arrived).
    long = " ".join([FRESH[0]] * 8)
    responses = _in_threads(160, lambda i: _post(url, {"texts": [f"{long} {i}"] * 8}))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses, sorted(statuses)
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.json()["error"]["type"] == "overload" and r.headers.get("retry-after") for r in refused)
    # the admission's 503s and the batching deadline's both count as overload
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
def test_damaged_model_file_refuses_to_start(tiny_fp32, served_variant, tmp_path, fault):
    damaged = tmp_path / VARIANT
    shutil.copytree(served_variant[3], damaged)
    model = damaged / "model.onnx"
    if fault == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif fault == "replaced":  # another valid ONNX model under the same name: one weight changed
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(model))
        weight = graph.graph.initializer[-1]
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 1e-3, weight.name))
        onnx.save(graph, str(model))
    else:
        model.unlink()
    server = _start(
        {
            "TRIMSERVE_VARIANT_DIR": str(damaged),
            "TRIMSERVE_MANIFEST": str(tiny_fp32 / "manifest.json"),
            "TRIMSERVE_API_KEYS": KEY,
        },
        tmp_path,
        fault,
    )
    try:
        assert server.process.wait(60) == 2  # the exit status of bad input, as the CLIs
    finally:
        server.stop()
    output = server.log.read_text()
    expected = "model.onnx (missing)" if fault == "missing" else "model.onnx (sha256 mismatch)"
    assert (
        f"trimserve: variant onnx-fp32 in {damaged} does not match {tiny_fp32 / 'manifest.json'}: {expected}; "
        "re-run `python -m export`" in output
    ), output[-2000:]
    assert KEY not in output


def test_device_cuda_without_cuda_refuses_to_start_in_one_line(tiny_fp32, served_variant, tmp_path):
    server = _start(
        {
            "TRIMSERVE_VARIANT_DIR": str(served_variant[3]),
            "TRIMSERVE_MANIFEST": str(tiny_fp32 / "manifest.json"),
            "TRIMSERVE_API_KEYS": KEY,
            "TRIMSERVE_DEVICE": "cuda",
        },
        tmp_path,
        "cuda",
    )
    try:
        assert server.process.wait(60) != 0
    finally:
        server.stop()
    refusals = [line for line in server.log.read_text().splitlines() if line.startswith("trimserve:")]
    assert refusals == [
        "trimserve: TRIMSERVE_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider; "
        "install onnxruntime-gpu (pip install .[gpu]) on a machine with CUDA"
    ]
    assert "Traceback" not in server.log.read_text()


# --- lifecycle: a server of its own, since these tests kill it -------------------------------

HEAVY = {"texts": [f"{FRESH[0]} " * 6] * 32}  # 32 texts of ~64 tokens: a full model batch per request


@pytest.fixture(scope="module")
def disposable(served_variant, tiny_fp32, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    (tmp / "keys").write_text(KEY + "\n")
    env = {
        "TRIMSERVE_VARIANT_DIR": str(served_variant[3]),
        "TRIMSERVE_MANIFEST": str(tiny_fp32 / "manifest.json"),
        "TRIMSERVE_API_KEYS_FILE": str(tmp / "keys"),
        "TRIMSERVE_MAX_LATENCY_MS": "60000",
        "TRIMSERVE_TIMEOUT_S": "60",
        "TRIMSERVE_THREADS": "1",
    }
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
            results[i] = httpx.post(
                f"{url}/classify", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60
            ).status_code
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
        late = httpx.post(
            f"{url}/classify", json={"texts": [FRESH[0]]}, headers={"authorization": f"Bearer {KEY}"}, timeout=30
        ).status_code
    except httpx.HTTPError as err:
        late = type(err).__name__
    for t in threads:
        t.join(60)
    code = disposable.process.wait(30)
    drained = time.monotonic() - start
    print(
        f"\nSIGTERM with {admitted:.0f} requests in flight: {results}; late request: {late}; "
        f"exit {code} after {drained:.1f} s"
    )
    assert results == [200] * 16
    assert late != 200 and late in {503, "ConnectError", "ReadError", "RemoteProtocolError"}, late
    assert code == 0 and drained < 30


def test_logs_hold_no_key_and_no_text(server):
    """Last on purpose: by now every other test has sent its texts (all contain MARK) and keys."""
    assert _post(server.url, {"texts": [FRESH[0]]}).status_code == 200
    output = server.log.read_text()
    assert "POST /classify 200 " in output  # the access log is there, so there was something to leak into
    assert "POST /classify 400 " in output and "POST /classify 401 " in output
    assert KEY not in output and MARK not in output and "wrong-key" not in output
    assert "Traceback" not in output


def test_two_workers_count_together_and_the_metrics_page_parses_strictly(served_variant, tiny_fp32, tmp_path, prom):
    """With 2 workers every counter is the sum over both, and /metrics passes promtool's strict parser."""
    (tmp_path / "keys").write_text(KEY + "\n")
    env = {
        "TRIMSERVE_VARIANT_DIR": str(served_variant[3]),
        "TRIMSERVE_MANIFEST": str(tiny_fp32 / "manifest.json"),
        "TRIMSERVE_API_KEYS_FILE": str(tmp_path / "keys"),
        "TRIMSERVE_WORKERS": "2",
        "TRIMSERVE_THREADS": "1",
        "TRIMSERVE_MAX_CONCURRENCY": "80",
    }
    server = _start(env, tmp_path, "two")
    try:
        server.wait_ready(120)
        assert len(server.workers()) == 2
        statuses = _in_threads(40, lambda i: _post(server.url, {"texts": [f"{FRESH[i % 2]} {i}"]}).status_code)
        assert statuses == [200] * 40
        page = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    metrics = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            metrics[s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"] = s.value
    assert metrics["trimserve_requests_total{code=200}"] == 40  # both workers' counts, summed
    assert metrics["trimserve_input_tokens_count{}"] == 40 and metrics["trimserve_batch_size_sum{}"] == 40
    assert metrics["trimserve_in_flight_limit{}"] == 80  # 40 per worker, summed
    check = subprocess.run([str(prom.promtool), "check", "metrics"], input=page, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # lint findings print as warnings, errors fail
    assert "error" not in (check.stdout + check.stderr).lower(), check.stdout + check.stderr
