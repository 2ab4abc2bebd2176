"""perf/loadgen: the arrival schedule and the statistics in-process, then one tiny real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perf.loadgen import LoadConfig, _ramp, main, sustainable
from perf.openloop import CONNECTION_ERROR, TIMEOUT, Answers, RateResult, poisson_schedule, summarize
from serve.contract import UserError, run_cli


def test_poisson_schedule_is_seeded_with_mean_gap_one_over_rate():
    times = poisson_schedule(50.0, 400.0, 100_000, seed=1)
    assert np.array_equal(times, poisson_schedule(50.0, 400.0, 100_000, seed=1))
    assert not np.array_equal(times, poisson_schedule(50.0, 400.0, 100_000, seed=2))
    gaps = np.diff(times)
    assert (gaps > 0).all() and times[-1] < 400
    assert abs(gaps.mean() - 1 / 50) < 0.02 / 50  # ~20 000 gaps: within 2 %
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05  # exponential: coefficient of variation 1
    assert len(poisson_schedule(50.0, 400.0, 100, seed=1)) == 100  # bounded in count...
    assert len(poisson_schedule(50.0, 2.0, 100_000, seed=1)) < 150  # ...and in time


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
        np.array([0.010, 0.020, 0.001, 5.0, 0.5, 0.2]), np.array([200, 200, 429, TIMEOUT, 503, CONNECTION_ERROR])
    )
    result = summarize(answers, np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.0]), 2.5, 2.0)
    assert (result.sent, result.ok, result.non_200, result.errors) == (6, 2, {"429": 1, "503": 1}, 2)
    assert result.error_share == 4 / 6 and result.p50_ms == 10.0 and result.p99_ms == 20.0
    assert result.throughput_rps == round(2 / 6.5, 2)  # the window ends with the timed-out request


def test_ramp_grows_geometrically_up_to_its_max():
    assert list(_ramp(LoadConfig(ramp_start=10, ramp_factor=2, ramp_max=80))) == [10, 20, 40, 80]


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
    """Both modes against a real `bentoml serve` of the tiny variant, a second of load each."""
    report = main(
        [
            "--variants",
            str(tiny_fp32),
            "--variant",
            "onnx-fp32",
            "--rates",
            "4",
            "--duration-s",
            "1.5",
            "--low-rate",
            "8",
            "--low-duration-s",
            "1",
            "--warmup-requests",
            "8",
            "--threads",
            "1",
            "--output",
            str(tmp_path),
        ]
    )
    assert json.loads((tmp_path / "load.json").read_text()) == json.loads(json.dumps(report))
    assert report["kind"] == "trimserve.load" and report["variant"]["name"] == "onnx-fp32"
    assert report["threads"] == {"server_ort": 1, "raw_ort": 1, "workers": 1} and report["machine"]["cores"]
    batching = report["modes"]["batching"]
    assert batching["status"] == "ok" and batching["server_env"]["TRIMSERVE_THREADS"] == "1"
    assert [r["offered_rps"] for r in batching["sweep"]] == [4.0]
    for result in [batching["low_load"], *batching["sweep"]]:
        assert result["sent"] > 0 and result["ok"] == result["sent"] and 0 < result["p50_ms"] <= result["p99_ms"]
    assert batching["model_calls"]["texts"] >= batching["sweep"][0]["sent"]
    assert report["raw"]["p50_ms"] > 0 and report["raw"]["threads"] == 1
    assert report["goals"]["serving_overhead_ms"]["value"] is not None
    off = report["modes"]["no-batching"]
    assert off["status"] == "ok" and off["model_calls"]["mean_batch"] == 1.0  # one text per model call
    summary = (tmp_path / "load.md").read_text()
    assert "| mode | offered req/s |" in summary and "| batching | 4.0 |" in summary


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
