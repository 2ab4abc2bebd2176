"""perf/loadgen: the served classifier under load, MLPerf LoadGen's Server scenario and a closed loop.

Reads top to bottom: pick the variant and the test sentences, then for each serving mode
start a real ``bentoml serve`` on a free loopback port (or use the running server given by
``--url``) and

  warm-up     a few bursts, untimed
  low load    LoadGen's Server scenario at ``--low-rate`` (5 req/s): the served p50 with no queueing
  moderate    the Server scenario at ``--cpu-rate`` (100 req/s): the server's CPU per request, by
              thread, against its own tokenize + model time (trimserve_tokenize/inference_seconds)
  ramp        the Server scenario per rate, until one fails (p99 over the bound or > 1 % failed):
              LoadGen's verdict and percentiles, the answers' status codes, CPU per request
  closed      ``--closed-clients`` (32) clients, each sending its next one-text request when the
              last is answered: sentences/s and latency

Every request is one real test sentence.  With the servers stopped, the raw ``OnnxClassifier``
(tokenize -> ONNX Runtime -> softmax, same variant, same threads, on the server's cores) is
timed at the same arrival gaps as the low-load and moderate phases: on these virtual machines
compute-heavy code runs several times slower right after a core has idled, so a back-to-back
figure would flatter the raw session.  At low load it is also timed with a keep-warm policy
(busy-waiting between calls instead of sleeping), to show what idling costs and what keeping
the core warm would burn.

Modes: ``batching`` is the service's defaults (trimserve's path, continuous batching);
``no-batching`` sets ``TRIMSERVE_BATCHING=0``; ``bentoml`` sets ``TRIMSERVE_FAST_PATH=0``
(BentoML's own route and adaptive batching, the path before trimserve's: the comparison);
``tracing``, ``no-access-log`` and ``no-bentoml-metrics`` flip one switch each, to price it.

    python -m perf.loadgen --server-cpus 0 --client-cpus 1
    python -m perf.loadgen --server-cpus 0 --client-cpus 1 --modes batching tracing no-access-log \
        no-bentoml-metrics --rates 100 --closed-clients 0
    python -m perf.loadgen --url http://127.0.0.1:3000 --api-key-file .keys --variant int8-dynamic
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from export import machine
from perf.openloop import (
    ClientLoop,
    CpuClock,
    LoadBase,
    RateResult,
    Target,
    check_loopback,
    closed_loop,
    metrics_text,
    pick_variant,
    pin,
    placement,
    scored_sentences,
    served,
    server_scenario,
    summarize,
    warm_up,
)
from serve.classifier import OnnxClassifier
from serve.contract import UserError, run_cli
from train.cliargs import ConfigParser, add_config_args, config_from_args

MODES = {
    "batching": {},
    "no-batching": {"TRIMSERVE_BATCHING": "0"},
    "bentoml": {"TRIMSERVE_FAST_PATH": "0"},
    # one switch each, for what a per-request cost is worth (run with a single --rates value)
    "tracing": {"TRIMSERVE_TRACING": "1"},
    "no-access-log": {"TRIMSERVE_ACCESS_LOG": "0"},
    "no-bentoml-metrics": {"TRIMSERVE_BENTOML_METRICS": "0"},
}
GOALS = {
    "cpu_overhead_ms": 1.0,
    "low_load_overhead_ms": 1.5,
    "sustained_rps": 250.0,
    "speedup_vs_before": 2.5,
    "closed_loop_batching_speedup": 1.5,
}


@dataclass(frozen=True)
class LoadConfig(LoadBase):
    url: str | None = field(
        default=None,
        metadata={"help": "load an already running server (loopback only) instead of starting one per mode"},
    )
    api_key_file: str | None = field(default=None, metadata={"help": "bearer key for --url (first line of the file)"})
    modes: tuple[str, ...] = field(
        default=("batching", "no-batching", "bentoml"),
        metadata={"help": "serving modes to start and compare (with --url: the running server as it is)"},
    )
    rates: tuple[float, ...] = field(default=(), metadata={"help": "offered rates in requests/s (default: a ramp)"})
    ramp_start: float = field(default=50.0, metadata={"help": "ramp: first rate, requests/s"})
    ramp_factor: float = field(default=1.25, metadata={"help": "ramp: each rate is the previous one times this"})
    ramp_max: float = field(default=2000.0, metadata={"help": "ramp: never offer more than this, requests/s"})
    duration_s: float = field(default=10.0, metadata={"help": "seconds of arrivals per rate"})
    p99_bound_ms: float = field(default=100.0, metadata={"help": "a rate holds when its p99 is within this..."})
    max_error_share: float = field(default=0.01, metadata={"help": "...and at most this share failed (MLPerf: 1 %%)"})
    low_rate: float = field(default=5.0, metadata={"help": "rate of the low-load phase, requests/s"})
    low_duration_s: float = field(default=20.0, metadata={"help": "seconds of the low-load phase"})
    cpu_rate: float = field(default=100.0, metadata={"help": "rate of the moderate phase (CPU per request)"})
    cpu_duration_s: float = field(default=10.0, metadata={"help": "seconds of the moderate phase"})
    closed_clients: int = field(default=32, metadata={"help": "closed loop: concurrent clients (0: skip)"})
    closed_duration_s: float = field(default=10.0, metadata={"help": "closed loop: seconds"})
    compare_dir: str | None = field(
        default=None,
        metadata={
            "help": "another checkout (e.g. a git worktree of an older commit) whose serve/ is measured too, as mode "
            "'compare', with its own defaults: before/after in one run"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown or not self.modes:
            raise UserError(f"--modes {' '.join(self.modes)} is not valid: expected some of {', '.join(MODES)}")
        if any(r <= 0 for r in self.rates + (self.ramp_start, self.low_rate, self.cpu_rate)) or self.ramp_factor <= 1:
            raise UserError("rates must be > 0 requests/s and --ramp-factor > 1")
        if (
            min(self.duration_s, self.low_duration_s, self.cpu_duration_s, self.closed_duration_s, self.p99_bound_ms)
            <= 0
            or self.closed_clients < 0
        ):
            raise UserError("durations and --p99-bound-ms must be > 0, --closed-clients >= 0")
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
    out = Path(config.output)
    pin(config.client_cpus)
    print(f"loadgen: {target.entry.name}, {len(texts)} test sentences, {threads} ONNX Runtime threads")
    if config.url:
        modes = {"target": measure(config.url, _read_key(config.api_key_file), texts, config, "target", None, out)}
    else:
        modes = {mode: _serve_and_measure(mode, target, texts, config, out) for mode in config.modes}
        if config.compare_dir:
            modes["compare"] = _serve_and_measure("compare", target, texts, config, out, config.compare_dir)
    # The raw session, now that no server competes for the cores; on the server's cores.
    pin(config.server_cpus)
    raw = raw_latency(target, threads, texts, config)
    pin(config.client_cpus)
    report = _report(config, target, threads, modes, raw)
    _write(report, out)
    return report


def _read_key(path: str | None) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"--api-key-file {path} does not exist")
    return Path(path).read_text().split("\n", 1)[0].strip()


def _serve_and_measure(
    mode: str, target: Target, texts: list[str], config: LoadConfig, out: Path, working_dir: str | None = None
) -> dict:
    extra = {} if working_dir else {**config.extra_env, **MODES[mode]}  # another checkout: its own defaults
    env = {**target.server_env(config.thread_count), **extra}
    print(
        f"[{mode}] starting bentoml serve ({' '.join(f'{k}={v}' for k, v in extra.items()) or 'defaults'}"
        f"{f' from {working_dir}' if working_dir else ''})"
    )
    with served(env, working_dir or config.working_dir, config.server_cpus) as (url, key, server):
        return {"server_env": env, **measure(url, key, texts, config, mode, server, out)}


def measure(url: str, key: str | None, texts: list[str], config: LoadConfig, label: str, server, out: Path) -> dict:
    """The phases against one running server; LoadGen's logs go under ``out/loadgen/<label>/``."""
    client = ClientLoop(url, key, config.connections, config.timeout_s)
    cpu = CpuClock(server)
    logs = out / "loadgen" / label
    try:
        client.run(warm_up(client.client, texts, config.warmup_requests))
        low = _at_rate(client, cpu, texts, config.low_rate, config.low_duration_s, config, logs / "low")
        print(f"[{label}] low load {_line(low)}")
        moderate = _at_rate(client, cpu, texts, config.cpu_rate, config.cpu_duration_s, config, logs / "moderate")
        print(f"[{label}] moderate {_line(moderate)}")
        sweep = []
        for rate in config.rates or _ramp(config):
            sweep.append(_at_rate(client, cpu, texts, rate, config.duration_s, config, logs / f"{rate:g}"))
            print(f"[{label}] {_line(sweep[-1])}")
            if not config.rates and not sweep[-1].holds(config.p99_bound_ms, config.max_error_share):
                break  # the ramp stops at the first rate that fails
        closed = _closed(client, cpu, texts, config) if config.closed_clients else None
        if closed:
            print(
                f"[{label}] closed loop, {config.closed_clients} clients: {closed['sentences_per_s']} sentences/s, "
                f"p50 {closed['p50_ms']} p99 {closed['p99_ms']} ms, mean batch {closed['model']['mean_batch']}"
            )
    finally:
        client.close()
    bounds = config.p99_bound_ms, config.max_error_share
    best = sustainable(sweep, *bounds)
    return {
        "status": "ok",
        "low_load": low.to_dict(*bounds),
        "moderate": moderate.to_dict(*bounds),
        "sweep": [r.to_dict(*bounds) for r in sweep],
        "sustainable": best.to_dict(*bounds) if best else None,
        "closed_loop": closed,
    }


def _at_rate(
    client: ClientLoop, cpu: CpuClock, texts: list[str], rate: float, duration_s: float, config: LoadConfig, logs: Path
) -> RateResult:
    """One Server-scenario run, with CPU per request and the server's model figures over it."""
    before, model_before = cpu.read(), _model_figures(client)
    answers, loadgen = server_scenario(client, texts, rate, duration_s, config.p99_bound_ms, config.seed, logs)
    result = summarize(answers, rate, duration_s)
    result.cpu_ms = {
        **cpu.per_request(before, cpu.read(), result.sent),
        **_model_delta(model_before, _model_figures(client), result.sent),
    }
    result.loadgen = loadgen
    return result


def _closed(client: ClientLoop, cpu: CpuClock, texts: list[str], config: LoadConfig) -> dict:
    before, model_before = cpu.read(), _model_figures(client)
    answers = closed_loop(client, texts, config.closed_clients, config.closed_duration_s)
    result = summarize(answers, 0.0, config.closed_duration_s)
    model = _model_delta(model_before, _model_figures(client), result.sent)
    return {
        "clients": config.closed_clients,
        "duration_s": config.closed_duration_s,
        "sent": result.sent,
        "ok": result.ok,
        "non_200": result.non_200,
        "sentences_per_s": result.throughput_rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "cpu_ms": cpu.per_request(before, cpu.read(), result.sent),
        "model": model,
    }


def _ramp(config: LoadConfig) -> Iterator[float]:
    rate = config.ramp_start
    while rate <= config.ramp_max:
        yield round(rate, 1)
        rate *= config.ramp_factor


def _model_figures(client: ClientLoop) -> dict[str, float]:
    """Model calls, texts and seconds in tokenize and in model calls so far, from the service's metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "trimserve_batch_size_count": "calls",
        "trimserve_batch_size_sum": "texts",
        "trimserve_tokenize_seconds_sum": "tokenize_s",
        "trimserve_inference_seconds_sum": "inference_s",
    }
    totals = dict.fromkeys(wanted.values(), 0.0)
    with contextlib.suppress(Exception):  # a --url server without trimserve's metrics: no model figures
        for family in text_string_to_metric_families(client.run(metrics_text(client.client))):
            for s in family.samples:
                if s.name in wanted:
                    totals[wanted[s.name]] += s.value
    return totals


def _model_delta(before: dict, after: dict, requests: int) -> dict:
    calls, texts = after["calls"] - before["calls"], after["texts"] - before["texts"]
    tokenize, inference = after["tokenize_s"] - before["tokenize_s"], after["inference_s"] - before["inference_s"]
    per = lambda s: round(1e3 * s / requests, 3) if requests else None  # noqa: E731
    return {
        "model_calls": int(calls),
        "texts": int(texts),
        "mean_batch": round(texts / calls, 2) if calls else None,
        "tokenize_ms_per_request": per(tokenize),
        "inference_ms_per_request": per(inference),
        "model_ms_per_request": per(tokenize + inference),
    }


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
    lg = r.loadgen or {}
    return (
        f"{r.offered_rps:g} req/s: {r.sent} sent, {r.throughput_rps:.1f} ok/s, p50 {ms(r.p50_ms)} "
        f"p90 {ms(r.p90_ms)} p99 {ms(r.p99_ms)} ms, {100 * r.error_share:.1f} % failed {r.non_200 or ''}; "
        f"LoadGen {lg.get('result')}; CPU/request: client {r.cpu_ms.get('client')}, server "
        f"{r.cpu_ms.get('server')}, model {r.cpu_ms.get('model_ms_per_request')} ms"
    )


# --- the raw session at the same arrival gaps ------------------------------------------------------


def raw_latency(target: Target, threads: int, texts: list[str], config: LoadConfig, warmup: int = 20) -> dict:
    """``OnnxClassifier.predict([text])`` in-process, one call per scheduled arrival, as the server would.

    Arrivals follow a Poisson schedule at the low-load and moderate rates (the gaps the served
    requests had); between calls the thread sleeps, or (``keep_warm``) busy-waits, which keeps
    the core from idling at the price of burning it.  Same session settings as the service's
    defaults (spinning off).
    """
    classifier = OnnxClassifier.load(target.directory, target.record, threads=threads, device="cpu", spin=False)
    for text in texts[:warmup]:
        classifier.predict([text])
    runs = {}
    for name, rate, duration, keep_warm in (
        ("low_load", config.low_rate, config.low_duration_s, False),
        ("low_load_keep_warm", config.low_rate, config.low_duration_s, True),
        ("moderate", config.cpu_rate, config.cpu_duration_s, False),
    ):
        runs[name] = _raw_at_rate(classifier, texts, rate, min(duration, 10.0), keep_warm, config.seed)
        print(
            f"[raw] {name}: p50 {runs[name]['p50_ms']:.2f} p99 {runs[name]['p99_ms']:.2f} ms, CPU "
            f"{runs[name]['cpu_ms_per_call']:.2f} ms per call ({runs[name]['cpu_ms_per_s']:.0f} ms of CPU per s)"
        )
    return {"threads": threads, "calls_per_run": {k: v["calls"] for k, v in runs.items()}, **runs}


def _raw_at_rate(
    classifier: OnnxClassifier, texts: list[str], rate: float, duration_s: float, keep_warm: bool, seed: int
) -> dict:
    rng = np.random.default_rng([seed, round(rate * 1000)])
    gaps = rng.exponential(1 / rate, size=int(rate * duration_s * 2) + 10)
    schedule = np.cumsum(gaps)
    schedule = schedule[schedule < duration_s]
    times = []
    cpu_start, start = time.process_time(), time.perf_counter()
    for i, at in enumerate(schedule):
        while (now := time.perf_counter() - start) < at:
            if not keep_warm:
                time.sleep(at - now)
        began = time.perf_counter()
        classifier.predict([texts[i % len(texts)]])
        times.append(1e3 * (time.perf_counter() - began))
    cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - start
    p50, p90, p99 = np.percentile(times, [50, 90, 99], method="inverted_cdf").round(3).tolist()
    return {
        "rate": rate,
        "keep_warm": keep_warm,
        "calls": len(times),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "cpu_ms_per_call": round(1e3 * cpu_s / len(times), 3),
        "cpu_ms_per_s": round(1e3 * cpu_s / wall_s, 1),
    }


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
            "library": f"aiohttp {_version('aiohttp')} driven by mlcommons-loadgen {_version('mlcommons-loadgen')}",
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
    found = {p: _version(p) for p in ("bentoml", "onnxruntime", "onnxruntime-gpu", "aiohttp", "mlcommons-loadgen")}
    return {p: v for p, v in found.items() if v}


def goals(modes: dict, raw: dict) -> dict:
    """The serving goals, each measured in this run."""
    main_mode = modes.get("batching") or modes.get("target") or {}
    out = {}
    moderate = (main_mode.get("moderate") or {}).get("cpu_ms", {})
    if moderate.get("server") is not None and moderate.get("model_ms_per_request") is not None:
        value = round(moderate["server"] - moderate["model_ms_per_request"], 3)
        out["cpu_overhead_ms"] = _goal(
            value,
            GOALS["cpu_overhead_ms"],
            "<=",
            "server CPU per request minus its own tokenize + model time, at the moderate rate",
        )
    low = main_mode.get("low_load") or {}
    if low.get("p50_ms") is not None:
        value = round(low["p50_ms"] - raw["low_load"]["p50_ms"], 3)
        out["low_load_overhead_ms"] = _goal(
            value,
            GOALS["low_load_overhead_ms"],
            "<=",
            "served p50 minus the raw session's p50 at the same arrival gaps",
        )
    held = {m: (r.get("sustainable") or {}).get("offered_rps") for m, r in modes.items()}
    if held.get("batching") or held.get("target"):
        value = held.get("batching") or held.get("target")
        out["sustained_rps"] = _goal(
            value,
            GOALS["sustained_rps"],
            ">=",
            "highest Server-scenario rate with p99 within the bound and <= 1 % failed",
        )
        before = "compare" if held.get("compare") else "bentoml" if held.get("bentoml") else None
        if before:
            out["speedup_vs_before"] = _goal(
                round(value / held[before], 2),
                GOALS["speedup_vs_before"],
                ">=",
                f"sustained rate against the '{before}' mode in this run",
            )
    closed = {m: (r.get("closed_loop") or {}).get("sentences_per_s") for m, r in modes.items()}
    if closed.get("batching") and closed.get("no-batching"):
        out["closed_loop_batching_speedup"] = _goal(
            round(closed["batching"] / closed["no-batching"], 2),
            GOALS["closed_loop_batching_speedup"],
            ">=",
            "sentences/s with 32 closed-loop clients, batching on / off",
        )
    return out


def _goal(value, goal: float, sense: str, what: str) -> dict:
    met = value is not None and (value <= goal if sense == "<=" else value >= goal)
    return {"value": value, "goal": f"{sense} {goal:g}", "met": met, "what": what}


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
        f"# Load test: {report['variant']['name']} served by BentoML",
        "",
        f"{host['cpu']}, {host['cores']} cores, {report['threads']['server_ort']} ONNX Runtime threads, 1 worker; "
        f"{placement(report['cpus'])}. MLPerf LoadGen Server scenario (Poisson arrivals), "
        f"{config['duration_s']:g} s per rate, one sentence per request; a rate holds when p99 <= "
        f"{config['p99_bound_ms']:g} ms and <= {100 * config['max_error_share']:g} % fail. Latency runs from "
        "each query's scheduled issue. CPU per request: server (all its processes) and its threads "
        "(event loop: HTTP, auth, JSON, tokenizing; model thread: padding, ONNX Runtime); model = the server's "
        "own tokenize + inference time.",
        "",
        "| mode | phase | offered req/s | sent | ok/s | p50 ms | p99 ms | failed | LoadGen | holds "
        "| CPU ms/req server | event loop | model thread | tokenize+model | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, result in report["modes"].items():
        lines += _mode_rows(mode, result)
    lines += [
        "",
        "Closed loop (each client sends its next request when the last is answered):",
        "",
        "| mode | clients | sentences/s | p50 ms | p99 ms | mean batch | server CPU ms/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, result in report["modes"].items():
        c = result.get("closed_loop")
        if c:
            lines.append(
                f"| {mode} | {c['clients']} | {c['sentences_per_s']} | {c['p50_ms']} | {c['p99_ms']} | "
                f"{c['model']['mean_batch']} | {c['cpu_ms'].get('server')} |"
            )
    raw = report["raw"]
    lines += [
        "",
        "Raw session (OnnxClassifier.predict, in-process, same arrival gaps, on the server's cores):",
        "",
        "| run | rate | calls | p50 ms | p99 ms | CPU ms/call | CPU ms per second |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("low_load", "low_load_keep_warm", "moderate"):
        r = raw[name]
        lines.append(
            f"| {name} | {r['rate']:g} | {r['calls']} | {r['p50_ms']} | {r['p99_ms']} | {r['cpu_ms_per_call']} "
            f"| {r['cpu_ms_per_s']} |"
        )
    lines += ["", "Goals:"] + [
        f"- {name}: {g['value']} (goal {g['goal']}; {g['what']}): {'met' if g['met'] else 'NOT met'}"
        for name, g in report["goals"].items()
    ]
    return "\n".join(lines) + "\n"


def _mode_rows(mode: str, result: dict) -> list[str]:
    rows = []
    phases = [("low load", result["low_load"]), ("moderate", result["moderate"])]
    phases += [("ramp", r) for r in result["sweep"]]
    for phase, r in phases:
        cpu = r["cpu_ms"]
        rows.append(
            f"| {mode} | {phase} | {r['offered_rps']:g} | {r['sent']} | {r['throughput_rps']} | {r['p50_ms']} "
            f"| {r['p99_ms']} | {100 * r['error_share']:.1f} % | {(r.get('loadgen') or {}).get('result')} "
            f"| {'yes' if r['holds'] else 'no'} | {cpu.get('server')} | {cpu.get('thread:event-loop')} "
            f"| {cpu.get('thread:trimserve-model')} | {cpu.get('model_ms_per_request')} | {cpu.get('mean_batch')} |"
        )
    return rows


if __name__ == "__main__":
    run_cli(main)
