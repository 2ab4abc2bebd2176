"""perf/loadgen: LoadGen's Server scenario and the statistics in-process, then one tiny real run."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from perf.loadgen import LoadConfig, _ramp, main, sustainable
from perf.openloop import (
    CONNECTION_ERROR,
    TIMEOUT,
    Answers,
    ClientLoop,
    RateResult,
    loadgen_summary,
    server_scenario,
    summarize,
)
from serve.contract import UserError, run_cli


def test_loadgen_server_scenario_issues_poisson_queries_at_the_rate(tmp_path):
    """A stand-in HTTP server (aiohttp, in a thread) answers at once: LoadGen issues ~rate x duration queries."""
    from aiohttp import web

    seen = []

    async def classify(request):
        seen.append(time.perf_counter())
        await request.read()
        return web.json_response([{"label": "fresh"}])

    app = web.Application()
    app.router.add_post("/classify", classify)
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(runner.setup(), loop).result()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    asyncio.run_coroutine_threadsafe(site.start(), loop).result()
    port = site._server.sockets[0].getsockname()[1]
    client = ClientLoop(f"http://127.0.0.1:{port}", "key", 16, 5)
    try:
        answers, summary = server_scenario(
            client, ["a", "b"], rate=50, duration_s=2, p99_bound_ms=100, seed=3, log_dir=tmp_path
        )
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
    assert 70 <= len(answers.status) <= 130 and (answers.status == 200).all() and len(seen) == len(answers.status)
    gaps = np.diff(np.sort(answers.issued_s))
    assert gaps.std() / gaps.mean() > 0.6  # Poisson arrivals (CV 1), not a fixed beat (CV 0)
    assert summary["scenario"] == "Server" and summary["result"] in ("VALID", "INVALID")
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] and summary["completed_samples_per_second"] > 30
    assert (tmp_path / "mlperf_log_summary.txt").is_file() and loadgen_summary(tmp_path / "mlperf_log_summary.txt")


def _result(rate: float, p99: float | None, ok: int = 100, sent: int = 100) -> RateResult:
    return RateResult(rate, sent, ok, {"429": sent - ok} if sent > ok else {}, 0, rate, 1.0, 2.0, p99)


def test_sustainable_rate_is_the_highest_that_holds_below_the_first_failure():
    results = [_result(40, 150.0), _result(10, 20.0), _result(20, 60.0), _result(80, 90.0)]  # 80 passes by luck
    assert sustainable(results, 100, 0.01).offered_rps == 20
    assert sustainable(results, 200, 0.01).offered_rps == 80
    assert sustainable([_result(10, 20.0, ok=98)], 100, 0.01) is None  # 2 % failed
    assert sustainable([_result(10, None, ok=0)], 100, 0.01) is None  # nothing answered
    assert sustainable([], 100, 0.01) is None


def test_summarize_counts_codes_and_failures_apart():
    answers = Answers(
        np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.0]),
        np.array([0.010, 0.020, 0.001, 5.0, 0.5, 0.2]),
        np.array([200, 200, 429, TIMEOUT, 503, CONNECTION_ERROR]),
    )
    result = summarize(answers, 2.5, 2.0)
    assert (result.sent, result.ok, result.non_200, result.errors) == (6, 2, {"429": 1, "503": 1}, 2)
    assert result.error_share == 4 / 6 and result.p50_ms == 10.0 and result.p99_ms == 20.0
    assert result.throughput_rps == round(2 / 6.5, 2)  # the window ends with the timed-out request


def test_ramp_grows_geometrically_up_to_its_max():
    assert list(_ramp(LoadConfig(ramp_start=10, ramp_factor=2, ramp_max=80))) == [10, 20, 40, 80]
    with pytest.raises(
        UserError, match=r"--modes fast is not valid: expected some of batching, no-batching, bentoml, tracing"
    ):
        LoadConfig(modes=("fast",))


def test_non_loopback_url_is_refused_in_one_line(capsys):
    with pytest.raises(
        UserError,
        match=r"^--url http://example.com:3000 is not a loopback address; loadgen only "
        r"targets 127.0.0.1, ::1 or localhost$",
    ):
        main(["--url", "http://example.com:3000"])
    for url in ("http://10.1.2.3", "http://localhost.example.com:3000"):
        with pytest.raises(UserError, match="is not a loopback address"):
            LoadConfig(url=url)
    LoadConfig(url="http://[::1]:3000")
    LoadConfig(url="http://localhost:3000")
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["--url", "http://192.168.0.7:3000"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.slow
def test_tiny_real_run(tiny_fp32, tmp_path):
    """Two modes against a real `bentoml serve` of the tiny variant, a second or two of load per phase."""
    args = (
        "--variants",
        tiny_fp32,
        "--variant",
        "onnx-fp32",
        "--modes",
        "batching",
        "bentoml",
        "--rates",
        8,
        "--duration-s",
        1.5,
        "--low-rate",
        8,
        "--low-duration-s",
        1,
        "--cpu-rate",
        10,
        "--cpu-duration-s",
        1,
        "--closed-clients",
        4,
        "--closed-duration-s",
        1,
        "--warmup-requests",
        8,
        "--threads",
        1,
        "--output",
        tmp_path,
    )
    report = main([str(a) for a in args])
    assert json.loads((tmp_path / "load.json").read_text()) == json.loads(json.dumps(report))
    assert report["kind"] == "trimserve.load" and report["variant"]["name"] == "onnx-fp32"
    assert report["threads"] == {"server_ort": 1, "raw_ort": 1, "workers": 1} and report["machine"]["cores"]
    for name in ("batching", "bentoml"):
        mode = report["modes"][name]
        assert mode["status"] == "ok" and mode["server_env"]["TRIMSERVE_THREADS"] == "1"
        assert [r["offered_rps"] for r in mode["sweep"]] == [8.0]
        for result in [mode["low_load"], mode["moderate"], *mode["sweep"]]:
            assert result["sent"] > 0 and result["ok"] == result["sent"] and 0 < result["p50_ms"] <= result["p99_ms"]
            assert result["loadgen"]["scenario"] == "Server" and result["loadgen"]["p50_ms"] > 0
            assert result["cpu_ms"]["server"] > 0 and result["cpu_ms"]["model_ms_per_request"] > 0
        assert mode["closed_loop"]["sentences_per_s"] > 0 and mode["closed_loop"]["ok"] == mode["closed_loop"]["sent"]
    trimserve = report["modes"]["batching"]["moderate"]["cpu_ms"]
    assert trimserve["thread:trimserve-model"] > 0 and trimserve["thread:event-loop"] > 0  # the two threads apart
    assert report["raw"]["low_load"]["p50_ms"] > 0 and report["raw"]["threads"] == 1
    assert report["raw"]["low_load_keep_warm"]["cpu_ms_per_s"] > report["raw"]["low_load"]["cpu_ms_per_s"]
    assert {"cpu_overhead_ms", "low_load_overhead_ms"} <= set(report["goals"])
    assert (tmp_path / "loadgen" / "batching" / "low" / "mlperf_log_summary.txt").is_file()
    summary = (tmp_path / "load.md").read_text()
    assert "| mode | phase | offered req/s |" in summary and "| batching | ramp | 8 |" in summary


@pytest.mark.slow
def test_reliability_tiny_real_run(tiny_fp32, tmp_path):
    """Both phases of perf.reliability against a real server, a few seconds each."""
    from perf.reliability import main as reliability

    report = reliability(
        [
            "--variants",
            str(tiny_fp32),
            "--variant",
            "onnx-fp32",
            "--sustainable-rps",
            "6",
            "--overload-s",
            "1.5",
            "--soak-s",
            "3",
            "--window-s",
            "1",
            "--rss-every-s",
            "0.5",
            "--warmup-requests",
            "8",
            "--threads",
            "1",
            "--output",
            str(tmp_path),
        ]
    )
    assert json.loads((tmp_path / "reliability.json").read_text()) == json.loads(json.dumps(report))
    overload, soak = report["phases"]["overload"]["summary"], report["phases"]["soak"]["summary"]
    assert overload["offered_rps"] == 12.0 and overload["sent"] > 0 and overload["hung"] == 0
    assert overload["loadgen"]["scenario"] == "Server" and soak["loadgen"]["scenario"] == "Server"
    assert 0 < overload["answered_share"] <= 1
    assert soak["offered_rps"] == 4.2 and soak["sent"] > 0 and soak["rss_start_mb"] > 50
    assert len(report["phases"]["soak"]["windows"]) == 3 and soak["p99_drift"] is not None
    assert set(report["goals"]) == {"overload_hung", "soak_errors", "soak_rss_growth", "soak_p99_drift"}
    assert "## Soak: 4.2 req/s (70 %) for 3 s" in (tmp_path / "reliability.md").read_text()


def test_reliability_needs_a_sustainable_rate(tmp_path, tiny_fp32):
    from perf.reliability import main as reliability

    with pytest.raises(
        UserError,
        match=r"missing.json does not exist; run python -m perf.loadgen first or pass "
        r"--sustainable-rps",
    ):
        reliability(
            ["--variants", str(tiny_fp32), "--variant", "onnx-fp32", "--load-report", str(tmp_path / "missing.json")]
        )
    with pytest.raises(UserError, match=r"--server-env 'MAX=1' is not valid: expected TRIMSERVE_NAME=value"):
        reliability(["--server-env", "MAX=1"])
