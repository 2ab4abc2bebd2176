"""perf/loadgen: the served classifier under open-loop load (MLPerf's Server scenario).

Reads top to bottom: pick the variant and the test sentences, then for each serving mode
start a real ``bentoml serve`` on a free loopback port (or use the running server given by
``--url``) and

  warm-up    a few bursts, so BentoML's dispatcher has calibrated before anything is timed
  low load   a Poisson stream at ``--low-rate`` (5 req/s): the served p50 with no queueing
  sweep      a Poisson stream per rate (a list, or a ramp that stops once p99 passes the
             bound or errors pass 1 %): achieved throughput, p50/p90/p99, error share

Every request is one real test sentence, sent at its scheduled time whether or not earlier
ones have returned, and its latency runs from that scheduled time to the response, so
waiting inside the client counts.  With the servers stopped, the raw ``OnnxClassifier``
(tokenize -> ONNX Runtime -> softmax, same variant, same threads) is timed on the low-load
sentences in its own warmed block: serving overhead = served p50 - raw p50.

Modes: ``batching`` is the service's defaults (adaptive batching); ``no-batching`` sets
``TRIMSERVE_BATCHING=0`` (one model call per request).

    python -m perf.loadgen --rates 10 20 40 80 --duration-s 5
    python -m perf.loadgen --url http://127.0.0.1:3000 --api-key-file .keys --variant int8-dynamic
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from export import machine
from perf.openloop import (
    CpuClock,
    LoadBase,
    RateResult,
    Target,
    check_loopback,
    fire,
    metrics_text,
    pick_variant,
    pin,
    placement,
    poisson_schedule,
    scored_sentences,
    served,
    session,
    summarize,
    warm_up,
)
from serve.classifier import OnnxClassifier
from serve.contract import UserError, run_cli
from train.cliargs import ConfigParser, add_config_args, config_from_args

MODES = {"batching": {}, "no-batching": {"TRIMSERVE_BATCHING": "0"}}  # extra server env per mode
GOAL_SPEEDUP = 3.0  # batching sustains >= 3x the sentences/s of no batching at the p99 bound
GOAL_OVERHEAD_MS = 3.0  # served p50 at low load <= raw session p50 + 3 ms


@dataclass(frozen=True)
class LoadConfig(LoadBase):
    url: str | None = field(
        default=None,
        metadata={"help": "load an already running server (loopback only) instead of starting one per mode"},
    )
    api_key_file: str | None = field(default=None, metadata={"help": "bearer key for --url (first line of the file)"})
    modes: tuple[str, ...] = field(
        default=tuple(MODES),
        metadata={"help": "serving modes to start and compare (with --url: the running server as it is)"},
    )
    rates: tuple[float, ...] = field(default=(), metadata={"help": "offered rates in requests/s (default: a ramp)"})
    ramp_start: float = field(default=10.0, metadata={"help": "ramp: first rate, requests/s"})
    ramp_factor: float = field(default=1.5, metadata={"help": "ramp: each rate is the previous one times this"})
    ramp_max: float = field(default=1000.0, metadata={"help": "ramp: never offer more than this, requests/s"})
    duration_s: float = field(default=10.0, metadata={"help": "seconds of arrivals per rate"})
    max_requests: int = field(default=3000, metadata={"help": "at most this many requests per rate"})
    p99_bound_ms: float = field(default=100.0, metadata={"help": "a rate holds when its p99 is within this..."})
    max_error_share: float = field(default=0.01, metadata={"help": "...and at most this share failed (MLPerf: 1 %%)"})
    low_rate: float = field(default=5.0, metadata={"help": "rate of the low-load probe for the serving overhead"})
    low_duration_s: float = field(default=10.0, metadata={"help": "seconds of the low-load probe"})

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown or not self.modes:
            raise UserError(f"--modes {' '.join(self.modes)} is not valid: expected some of {', '.join(MODES)}")
        if any(r <= 0 for r in self.rates + (self.ramp_start, self.low_rate)) or self.ramp_factor <= 1:
            raise UserError("rates must be > 0 requests/s and --ramp-factor > 1")
        if min(self.duration_s, self.low_duration_s, self.p99_bound_ms) <= 0 or self.max_requests < 1:
            raise UserError("--duration-s, --low-duration-s and --p99-bound-ms must be > 0, --max-requests >= 1")
        if self.url:
            check_loopback(self.url)


def main(argv: list[str] | None = None) -> dict:
    parser = ConfigParser(prog="python -m perf.loadgen", description=__doc__.split("\n\n")[0])
    add_config_args(parser, LoadConfig)
    return run(config_from_args(LoadConfig, parser.parse_args(argv)))


def run(config: LoadConfig) -> dict:
    target = pick_variant(config)
    texts = scored_sentences(target.manifest, config.seed)
    threads = config.thread_count
    pin(config.client_cpus)
    print(f"loadgen: {target.entry.name}, {len(texts)} test sentences, {threads} ONNX Runtime threads")
    if config.url:
        modes = {"target": measure(config.url, _read_key(config.api_key_file), texts, config)}
    else:
        modes = {mode: _serve_and_measure(mode, target, texts, config) for mode in config.modes}
    # The sentences of the low-load probe, now that no server competes for the cores; on the
    # server's cores, where it would have run.
    pin(config.server_cpus)
    raw = raw_latency(target, threads, texts[: max(10, len(_low_schedule(config)))])
    raw["server_running"] = bool(config.url)  # an idle --url server still holds memory and wakes up now and then
    report = _report(config, target, threads, modes, raw)
    _write(report, Path(config.output))
    return report


def _read_key(path: str | None) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"--api-key-file {path} does not exist")
    return Path(path).read_text().split("\n", 1)[0].strip()


# --- one mode: start the server, measure, stop it ---------------------------------------------


def _serve_and_measure(mode: str, target: Target, texts: list[str], config: LoadConfig) -> dict:
    env = {**target.server_env(config.thread_count), **MODES[mode]}
    print(f"[{mode}] starting bentoml serve ({' '.join(f'{k}={v}' for k, v in MODES[mode].items()) or 'defaults'})")
    with served(env, config.working_dir, config.server_cpus) as (url, key, pid):
        return {"server_env": env, **measure(url, key, texts, config, label=mode, server_pid=pid)}


# --- measuring a running server -----------------------------------------------------------------


def measure(
    url: str,
    key: str | None,
    texts: list[str],
    config: LoadConfig,
    label: str = "target",
    server_pid: int | None = None,
) -> dict:
    """Warm-up, the low-load probe, the rate sweep, and the model calls the sweep caused."""
    return asyncio.run(_measure(url, key, texts, config, label, CpuClock(server_pid)))


async def _measure(url: str, key: str | None, texts: list[str], config: LoadConfig, label: str, cpu: CpuClock) -> dict:
    async with session(url, key, config.connections, config.timeout_s) as client:
        await warm_up(client, texts, config.warmup_requests)
        low = await _at_rate(client, _low_schedule(config), texts, config.low_rate, config.low_duration_s, cpu)
        print(f"[{label}] low load {_line(low)}")
        before = await _model_calls(client)
        sweep = await _sweep(client, texts, config, label, cpu)
        calls = _delta(before, await _model_calls(client))
    bounds = config.p99_bound_ms, config.max_error_share
    best = sustainable(sweep, *bounds)
    return {
        "status": "ok",
        "low_load": low.to_dict(*bounds),
        "sweep": [r.to_dict(*bounds) for r in sweep],
        "sustainable": best.to_dict(*bounds) if best else None,
        "model_calls": calls,
    }


async def _sweep(client, texts: list[str], config: LoadConfig, label: str, cpu: CpuClock) -> list[RateResult]:
    results: list[RateResult] = []
    for rate in config.rates or _ramp(config):
        schedule = poisson_schedule(rate, config.duration_s, config.max_requests, config.seed)
        results.append(await _at_rate(client, schedule, texts, rate, config.duration_s, cpu))
        print(f"[{label}] {_line(results[-1])}")
        if not config.rates and not results[-1].holds(config.p99_bound_ms, config.max_error_share):
            break  # the ramp stops at the first rate that fails
    return results


async def _at_rate(
    client, schedule: np.ndarray, texts: list[str], rate: float, duration_s: float, cpu: CpuClock
) -> RateResult:
    """One open-loop stream, with the CPU time client and server spent per request on it."""
    before = cpu.read()
    result = summarize(await fire(client, schedule, texts), schedule, rate, duration_s)
    result.client_cpu_ms, result.server_cpu_ms = cpu.per_request(before, cpu.read(), result.sent)
    return result


def _low_schedule(config: LoadConfig) -> np.ndarray:
    return poisson_schedule(config.low_rate, config.low_duration_s, config.max_requests, config.seed)


def _ramp(config: LoadConfig) -> Iterator[float]:
    rate = config.ramp_start
    while rate <= config.ramp_max:
        yield round(rate, 1)
        rate *= config.ramp_factor


async def _model_calls(client) -> dict[str, float]:
    """Model calls, texts and model seconds (tokenize + ONNX Runtime) so far, from the service's metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "trimserve_batch_size_count": "calls",
        "trimserve_batch_size_sum": "texts",
        "trimserve_tokenize_seconds_sum": "model_s",
        "trimserve_inference_seconds_sum": "model_s",
    }
    totals = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(await metrics_text(client)):
        for s in family.samples:
            if s.name in wanted:
                totals[wanted[s.name]] += s.value
    return totals


def _delta(before: dict, after: dict) -> dict:
    calls, texts, model_s = (after[k] - before[k] for k in ("calls", "texts", "model_s"))
    return {
        "calls": int(calls),
        "texts": int(texts),
        "mean_batch": round(texts / calls, 2) if calls else None,
        "model_ms_per_text": round(1e3 * model_s / texts, 2) if texts else None,
    }


# --- statistics ---------------------------------------------------------------------------------


def sustainable(results: list[RateResult], p99_bound_ms: float, max_error_share: float) -> RateResult | None:
    """The highest rate that holds, going up from the lowest and stopping at the first that fails."""
    best = None
    for result in sorted(results, key=lambda r: r.offered_rps):
        if not result.holds(p99_bound_ms, max_error_share):
            break
        best = result
    return best


def _line(r: RateResult) -> str:
    ms = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    return (
        f"{r.offered_rps:g} req/s: {r.sent} sent, {r.throughput_rps:.1f} ok/s, p50 {ms(r.p50_ms)} "
        f"p90 {ms(r.p90_ms)} p99 {ms(r.p99_ms)} ms, {100 * r.error_share:.1f} % failed {r.non_200 or ''}; "
        f"CPU/request: client {ms(r.client_cpu_ms)}, server {ms(r.server_cpu_ms)} ms"
    )


# --- the raw session ------------------------------------------------------------------------------


def raw_latency(target: Target, threads: int, texts: list[str], warmup: int = 20) -> dict:
    """``OnnxClassifier.predict([text])`` in-process, warmed, one sentence after another.

    Same session settings as the service's defaults (ServeConfig: spinning off), so the
    difference is the serving path alone.
    """
    classifier = OnnxClassifier.load(target.directory, target.record, threads=threads, device="cpu", spin=False)
    for text in (texts * warmup)[:warmup]:
        classifier.predict([text])
    times = []
    for text in texts * 2:  # two passes over the low-load sentences
        start = time.perf_counter()
        classifier.predict([text])
        times.append(1e3 * (time.perf_counter() - start))
    p50, p90, p99 = np.percentile(times, [50, 90, 99], method="inverted_cdf").round(3).tolist()
    print(f"[raw] OnnxClassifier.predict, {len(times)} calls: p50 {p50:.2f} p90 {p90:.2f} ms")
    return {"calls": len(times), "threads": threads, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99}


# --- the report -----------------------------------------------------------------------------------


def _report(config: LoadConfig, target: Target, threads: int, modes: dict, raw: dict) -> dict:
    return {
        "kind": "trimserve.load",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine.describe(),
        "threads": {"server_ort": threads, "raw_ort": threads, "workers": 1},
        "cpus": {"server": list(config.server_cpus) or "all", "client": list(config.client_cpus) or "all"},
        "variant": {
            "name": target.entry.name,
            "path": str(target.directory),
            "sha256": target.entry.files["model.onnx"]["sha256"],
        },
        "client": {
            "library": f"aiohttp {_version('aiohttp')}, asyncio",
            "host": "same machine as the server",
            "texts_per_request": 1,
        },
        "versions": _versions(),
        "config": asdict(config),
        "modes": modes,
        "raw": raw,
        "goals": goals(modes, raw),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return version(package)
    return None


def _versions() -> dict:
    found = {p: _version(p) for p in ("bentoml", "onnxruntime", "onnxruntime-gpu", "aiohttp")}
    return {p: v for p, v in found.items() if v}


def goals(modes: dict, raw: dict) -> dict:
    """The two targets: batching speed-up at the p99 bound, and serving overhead at low load."""
    held = {m: (r.get("sustainable") or {}).get("throughput_rps") for m, r in modes.items() if r["status"] == "ok"}
    speedup = None
    if held.get("batching") and held.get("no-batching"):
        speedup = round(held["batching"] / held["no-batching"], 2)
    base = modes.get("batching", modes.get("target", {}))
    overhead = None
    if base.get("status") == "ok" and base["low_load"]["p50_ms"] is not None:
        overhead = round(base["low_load"]["p50_ms"] - raw["p50_ms"], 2)
    return {
        "batching_speedup": {
            "value": speedup,
            "goal": f">= {GOAL_SPEEDUP:g}x",
            "sustained_ok_rps": held,
            "met": None if speedup is None else speedup >= GOAL_SPEEDUP,
        },
        "serving_overhead_ms": {
            "value": overhead,
            "goal": f"<= {GOAL_OVERHEAD_MS:g} ms p50 over raw",
            "met": None if overhead is None else overhead <= GOAL_OVERHEAD_MS,
        },
    }


def _write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = markdown(report)
    (out / "load.md").write_text(summary)
    print(summary)
    print(f"wrote {out / 'load.json'} and {out / 'load.md'}")


def markdown(report: dict) -> str:
    config, host = report["config"], report["machine"]
    lines = [
        f"# Load test: {report['variant']['name']} served by BentoML (open loop, Poisson arrivals)",
        "",
        f"{host['cpu']}, {host['cores']} cores, {report['threads']['server_ort']} ONNX Runtime threads, "
        f"1 worker; {placement(report['cpus'])}. {config['duration_s']:g} s per rate, one sentence per request; "
        f"a rate holds when p99 <= {config['p99_bound_ms']:g} ms and <= {100 * config['max_error_share']:g} % "
        "fail. Latency runs from each request's scheduled send time.",
        "",
        "| mode | offered req/s | sent | ok/s | p50 ms | p90 ms | p99 ms | failed | holds "
        "| CPU ms/req client, server |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, result in report["modes"].items():
        lines += _mode_rows(mode, result)
    lines += ["", *_goal_lines(report)]
    return "\n".join(lines) + "\n"


def _mode_rows(mode: str, result: dict) -> list[str]:
    if result["status"] != "ok":
        return [f"| {mode} | not measured: {result['reason'].split(';')[0]} | | | | | | | | |"]
    low = {**result["low_load"], "offered_rps": f"{result['low_load']['offered_rps']:g} (low load)"}
    return [
        f"| {mode} | {r['offered_rps']} | {r['sent']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p90_ms']} "
        f"| {r['p99_ms']} | {100 * r['error_share']:.1f} % | {'yes' if r['holds'] else 'no'} "
        f"| {r['client_cpu_ms']}, {r['server_cpu_ms']} |"
        for r in [low, *result["sweep"]]
    ]


def _goal_lines(report: dict) -> list[str]:
    lines = []
    for mode, result in report["modes"].items():
        if result["status"] == "ok":
            best, calls = result["sustainable"], result["model_calls"]
            lines.append(
                f"- {mode}: sustainable rate {best['offered_rps'] if best else 'none'} req/s "
                f"({best['throughput_rps'] if best else 0} sentences/s); sweep made {calls['calls']} model "
                f"calls for {calls['texts']} texts (mean batch {calls['mean_batch']}, tokenize + ONNX Runtime "
                f"{calls['model_ms_per_text']} ms per text)"
            )
    speedup, overhead, raw = report["goals"]["batching_speedup"], report["goals"]["serving_overhead_ms"], report["raw"]
    lines.append(
        f"- batching speed-up at the bound: {speedup['value'] or '-'}x (goal {speedup['goal']}): {_met(speedup['met'])}"
    )
    during = " (timed beside the idle --url server)" if raw["server_running"] else ""
    lines.append(
        f"- serving overhead at low load: {overhead['value']} ms p50 over the raw session's "
        f"{raw['p50_ms']} ms{during} (goal {overhead['goal']}): {_met(overhead['met'])}"
    )
    return lines


def _met(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "NOT met"


if __name__ == "__main__":
    run_cli(main)
