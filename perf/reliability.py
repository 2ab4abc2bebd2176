"""perf/reliability: the served classifier past its capacity, and for a long time below it.

Reads top to bottom: take the sustainable rate (loadgen's report, or ``--sustainable-rps``),
then against a fresh real ``bentoml serve`` of the selected variant for each phase

  overload   ``--overload-factor`` (2x) the sustainable rate for ``--overload-s``: the share
             answered 200, the p99 of those, how the rest were refused (503 at once?), and
             requests that got no answer within ``--hang-s`` (hung: must be 0)
  soak       ``--soak-share`` (70 %) of the sustainable rate for ``--soak-s`` (10 min): errors
             (must be 0), the server's resident memory from start to end (growth < 10 %),
             p99 per window, first window to last (drift < 20 %)

Load is MLPerf LoadGen's Server scenario (Poisson arrivals; perf/openloop.py), one test
sentence per request, latency from each query's scheduled issue; the SUT keeps every answer's
status and latency for the refusal, hang and per-window figures.  The server's RSS (arbiter
+ workers) is sampled every ``--rss-every-s``.  Writes reliability.json and reliability.md.

    python -m perf.reliability                    # both phases, ~11.5 min
    python -m perf.reliability --phases overload --overload-s 20
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from export import machine
from perf.openloop import (
    TIMEOUT,
    Answers,
    ClientLoop,
    CpuClock,
    LoadBase,
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
from serve.contract import UserError, run_cli
from train.cliargs import ConfigParser, add_config_args, config_from_args

PHASES = ("overload", "soak")
GOALS = {"soak_errors": 0, "soak_rss_growth": 0.10, "soak_p99_drift": 0.20, "overload_hung": 0}


@dataclass(frozen=True)
class ReliabilityConfig(LoadBase):
    load_report: str = field(
        default="artifacts/perf/load.json",
        metadata={"help": "loadgen report to take the sustainable rate from (its batching mode)"},
    )
    sustainable_rps: float | None = field(
        default=None, metadata={"help": "one replica's sustainable rate, requests/s (default: from --load-report)"}
    )
    phases: tuple[str, ...] = field(default=PHASES, metadata={"help": "what to run"})
    overload_factor: float = field(default=2.0, metadata={"help": "overload: offered rate / sustainable rate"})
    overload_s: float = field(default=30.0, metadata={"help": "overload: seconds of arrivals"})
    hang_s: float = field(default=30.0, metadata={"help": "overload: a request with no answer after this long is hung"})
    soak_share: float = field(default=0.7, metadata={"help": "soak: offered rate / sustainable rate"})
    soak_s: float = field(default=600.0, metadata={"help": "soak: seconds of arrivals"})
    window_s: float = field(default=60.0, metadata={"help": "soak: p99 and RSS per window of this many seconds"})
    rss_every_s: float = field(default=5.0, metadata={"help": "seconds between samples of the server's RSS"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.phases or set(self.phases) - set(PHASES):
            raise UserError(f"--phases {' '.join(self.phases)} is not valid: expected some of {', '.join(PHASES)}")
        if min(
            self.overload_factor,
            self.overload_s,
            self.hang_s,
            self.soak_share,
            self.soak_s,
            self.window_s,
            self.rss_every_s,
        ) <= 0 or (self.sustainable_rps is not None and self.sustainable_rps <= 0):
            raise UserError("rates, shares, factors and durations must be > 0")


def main(argv: list[str] | None = None) -> dict:
    parser = ConfigParser(prog="python -m perf.reliability", description=__doc__.split("\n\n")[0])
    add_config_args(parser, ReliabilityConfig)
    return run(config_from_args(ReliabilityConfig, parser.parse_args(argv)))


def run(config: ReliabilityConfig) -> dict:
    target = pick_variant(config)
    texts = scored_sentences(target.manifest, config.seed)
    sustainable = config.sustainable_rps or _sustainable_from(Path(config.load_report))
    threads = config.thread_count
    pin(config.client_cpus)
    env = {**target.server_env(threads), **config.extra_env}
    print(f"reliability: {target.entry.name}, sustainable {sustainable:g} req/s, {threads} ONNX Runtime threads")
    phases = {}
    for phase in config.phases:
        rate = sustainable * (config.overload_factor if phase == "overload" else config.soak_share)
        duration = config.overload_s if phase == "overload" else config.soak_s
        timeout = config.hang_s if phase == "overload" else config.timeout_s
        with served(env, config.working_dir, config.server_cpus) as (url, key, server):
            raw = _phase(url, key, server, texts, rate, duration, timeout, config, phase)
        phases[phase] = (_overload if phase == "overload" else _soak)(raw, rate, duration, config)
        print(f"[{phase}] {json.dumps(phases[phase]['summary'])}")
    report = {
        "kind": "trimserve.reliability",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine.describe(),
        "variant": target.entry.name,
        "sustainable_rps": sustainable,
        "server_env": env,
        "cpus": {"server": list(config.server_cpus) or "all", "client": list(config.client_cpus) or "all"},
        "config": asdict(config),
        "phases": phases,
        "goals": _goals(phases),
    }
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "reliability.md").write_text(markdown(report))
    print(markdown(report))
    return report


def _sustainable_from(path: Path) -> float:
    if not path.is_file():
        raise UserError(f"{path} does not exist; run python -m perf.loadgen first or pass --sustainable-rps")
    best = (json.loads(path.read_text()).get("modes", {}).get("batching") or {}).get("sustainable")
    if not best:
        raise UserError(f"{path} holds no sustainable rate for the batching mode; pass --sustainable-rps")
    return float(best["offered_rps"])


# --- one phase against one server -----------------------------------------------------------------


def _phase(
    url: str,
    key: str,
    server,
    texts: list[str],
    rate: float,
    duration_s: float,
    timeout_s: float,
    config: ReliabilityConfig,
    phase: str,
) -> dict:
    """Warm up, then LoadGen's Server scenario while a thread samples the server's RSS."""
    client = ClientLoop(url, key, config.connections, timeout_s)
    try:
        client.run(warm_up(client.client, texts, config.warmup_requests))
        rss: list[tuple[float, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(server.pid, config.rss_every_s, rss, stop), daemon=True)
        before, cpu = client.run(_server_view(client.client)), CpuClock(server)
        cpu_before = cpu.read()
        sampler.start()
        answers, loadgen = server_scenario(
            client,
            texts,
            rate,
            duration_s,
            100.0,
            config.seed,
            Path(config.output) / "loadgen" / f"reliability-{phase}",
        )
        stop.set()
        sampler.join()
        rss.append((time.monotonic(), _tree_rss(server.pid)))
        view = _server_delta(before, client.run(_server_view(client.client)))
        cpu_ms = cpu.per_request(cpu_before, cpu.read(), len(answers.status))
        view["client_cpu_ms_per_request"], view["server_cpu_ms_per_request"] = (
            cpu_ms.get("client"),
            cpu_ms.get("server"),
        )
    finally:
        client.close()
    start = rss[0][0] if rss else time.monotonic()
    return {"answers": answers, "loadgen": loadgen, "rss": [(round(t - start, 1), b) for t, b in rss], "server": view}


async def _server_view(client) -> dict:
    """The service's own counts: /classify answers by code and its request-time histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    codes, buckets = {}, {}
    for family in text_string_to_metric_families(await metrics_text(client)):
        for s in family.samples:
            if s.name == "trimserve_requests_total":
                codes[s.labels["code"]] = s.value
            elif s.name == "trimserve_request_seconds_bucket":
                buckets[float(s.labels["le"])] = s.value
    return {"codes": codes, "buckets": buckets}


def _server_delta(before: dict, after: dict) -> dict:
    """What the server saw during the phase, and the p50/p99 of its request time (bucket upper bounds)."""
    codes = {c: int(n - before["codes"].get(c, 0)) for c, n in after["codes"].items() if n > before["codes"].get(c, 0)}
    counts = sorted((le, n - before["buckets"].get(le, 0)) for le, n in after["buckets"].items())
    total = counts[-1][1] if counts else 0

    def quantile(q: float) -> float | None:
        return next((1e3 * le for le, n in counts if total and n >= q * total), None)

    return {"codes": codes, "p50_ms_at_most": quantile(0.5), "p99_ms_at_most": quantile(0.99)}


def _sample_rss(pid: int, every_s: float, out: list, stop: threading.Event) -> None:
    while not stop.is_set():
        out.append((time.monotonic(), _tree_rss(pid)))
        stop.wait(every_s)


def _tree_rss(pid: int) -> int:
    """Resident bytes of the server: the arbiter and every worker."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


# --- summaries ----------------------------------------------------------------------------------------


def _overload(raw: dict, rate: float, duration_s: float, config: ReliabilityConfig) -> dict:
    answers: Answers = raw["answers"]
    result = summarize(answers, rate, duration_s)
    refused = answers.latency_s[np.isin(answers.status, (429, 503))].tolist()
    hung = int((answers.status == TIMEOUT).sum())
    summary = {
        "offered_rps": round(rate, 1),
        "sent": result.sent,
        "answered_share": round(result.ok / result.sent, 4),
        "ok_rps": result.throughput_rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "refused": result.non_200,
        "refused_p99_ms": _pct(refused, 99),
        "connection_errors": result.errors - hung,
        "hung": hung,
        "server_saw": raw["server"],
        "loadgen": raw["loadgen"],
    }
    return {"summary": summary, "rss_bytes": raw["rss"]}


def _soak(raw: dict, rate: float, duration_s: float, config: ReliabilityConfig) -> dict:
    answers: Answers = raw["answers"]
    schedule = answers.issued_s
    result = summarize(answers, rate, duration_s)
    windows = []
    for w in range(int(np.ceil(duration_s / config.window_s))):
        inside = (schedule >= w * config.window_s) & (schedule < (w + 1) * config.window_s)
        ok = answers.latency_s[inside & (answers.status == 200)].tolist()
        rss = [b for t, b in raw["rss"] if w * config.window_s <= t < (w + 1) * config.window_s]
        windows.append(
            {
                "start_s": w * config.window_s,
                "sent": int(inside.sum()),
                "errors": int(inside.sum()) - len(ok),
                "p50_ms": _pct(ok, 50),
                "p99_ms": _pct(ok, 99),
                "rss_mb": round(max(rss) / 2**20, 1) if rss else None,
            }
        )
    full = [w for w in windows if w["p99_ms"] is not None]
    rss_start, rss_end = raw["rss"][0][1], raw["rss"][-1][1]
    summary = {
        "offered_rps": round(rate, 1),
        "duration_s": duration_s,
        "sent": result.sent,
        "errors": result.sent - result.ok,
        "error_codes": result.non_200,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_end / rss_start - 1, 4),
        "p99_first_window_ms": full[0]["p99_ms"] if full else None,
        "p99_last_window_ms": full[-1]["p99_ms"] if full else None,
        **p99_drift(windows),
        "server_saw": raw["server"],
        "loadgen": raw["loadgen"],
    }
    return {"summary": summary, "windows": windows, "rss_bytes": raw["rss"]}


def p99_drift(windows: list[dict]) -> dict:
    """Median per-window p99 of the second half against the first half of the soak.

    Medians, so that one odd minute (seen here: the first, at ~0.35-0.6 s) moves neither side.
    """
    p99s = [w["p99_ms"] for w in windows if w["p99_ms"] is not None]
    if len(p99s) < 2:
        return {"p99_first_half_ms": None, "p99_second_half_ms": None, "p99_drift": None}
    first, second = float(np.median(p99s[: len(p99s) // 2])), float(np.median(p99s[len(p99s) // 2 :]))
    return {
        "p99_first_half_ms": round(first, 2),
        "p99_second_half_ms": round(second, 2),
        "p99_drift": round(second / first - 1, 4),
    }


def _pct(latencies_s: list[float], q: float) -> float | None:
    if not latencies_s:
        return None
    return round(float(np.percentile(np.array(latencies_s) * 1e3, q, method="inverted_cdf")), 2)


def _goals(phases: dict) -> dict:
    goals = {}
    if "overload" in phases:
        hung = phases["overload"]["summary"]["hung"]
        goals["overload_hung"] = {"value": hung, "goal": "0", "met": hung == GOALS["overload_hung"]}
    if "soak" in phases:
        s = phases["soak"]["summary"]
        goals["soak_errors"] = {"value": s["errors"], "goal": "0", "met": s["errors"] == GOALS["soak_errors"]}
        goals["soak_rss_growth"] = {
            "value": s["rss_growth"],
            "goal": "< 10 %",
            "met": s["rss_growth"] < GOALS["soak_rss_growth"],
        }
        drift = s["p99_drift"]
        goals["soak_p99_drift"] = {
            "value": drift,
            "goal": "< 20 %",
            "met": None if drift is None else drift < GOALS["soak_p99_drift"],
        }
    return goals


def markdown(report: dict) -> str:
    host, lines = report["machine"], [f"# Reliability: {report['variant']} served by BentoML", ""]
    lines.append(
        f"{host['cpu']}, {host['cores']} cores; {placement(report['cpus'])}; sustainable rate "
        f"{report['sustainable_rps']:g} req/s (p99 <= 100 ms, from loadgen). Open-loop Poisson arrivals, one "
        "sentence per request, latency from the scheduled send time."
    )
    if "overload" in report["phases"]:
        s = report["phases"]["overload"]["summary"]
        lines += [
            "",
            f"## Overload: {s['offered_rps']} req/s ({report['config']['overload_factor']:g}x) for "
            f"{report['config']['overload_s']:g} s",
            "",
            f"- sent {s['sent']}, answered 200: {100 * s['answered_share']:.1f} % ({s['ok_rps']} req/s); "
            f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms of the answered",
            f"- refused: {s['refused'] or 'none'} (p99 time to the refusal {s['refused_p99_ms']} ms); "
            f"connection errors {s['connection_errors']}; hung (no answer in {report['config']['hang_s']:g} s): "
            f"{s['hung']}",
            "- the server's own view (trimserve_requests_total, trimserve_request_seconds): "
            f"{s['server_saw']['codes']}, "
            f"p50 <= {s['server_saw']['p50_ms_at_most']} ms, p99 <= {s['server_saw']['p99_ms_at_most']} ms "
            "(bucket bounds; time from its middleware to the answer, so without the kernel's accept queue)",
            f"- CPU per request: client {s['server_saw']['client_cpu_ms_per_request']} ms, server "
            f"{s['server_saw']['server_cpu_ms_per_request']} ms",
        ]
    if "soak" in report["phases"]:
        s = report["phases"]["soak"]["summary"]
        drift = "-" if s["p99_drift"] is None else f"{100 * s['p99_drift']:+.1f} %"
        lines += [
            "",
            f"## Soak: {s['offered_rps']} req/s ({100 * report['config']['soak_share']:g} %) for {s['duration_s']:g} s",
            "",
            f"- sent {s['sent']}, errors {s['errors']} {s['error_codes'] or ''}; p50 {s['p50_ms']} ms, "
            f"p99 {s['p99_ms']} ms",
            f"- server RSS {s['rss_start_mb']} MB -> {s['rss_end_mb']} MB ({100 * s['rss_growth']:+.1f} %)",
            f"- p99 drift (median of the per-window p99s, second half against first half): "
            f"{s['p99_first_half_ms']} -> {s['p99_second_half_ms']} ms ({drift}); first window "
            f"{s['p99_first_window_ms']} ms, last {s['p99_last_window_ms']} ms",
            "",
            "| window start s | sent | errors | p50 ms | p99 ms | max RSS MB |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {w['start_s']:g} | {w['sent']} | {w['errors']} | {w['p50_ms']} | {w['p99_ms']} | {w['rss_mb']} |"
            for w in report["phases"]["soak"]["windows"]
        ]
    lines += ["", "Goals:"] + [
        f"- {name}: {g['value']} (goal {g['goal']}): "
        f"{'not measured' if g['met'] is None else 'met' if g['met'] else 'NOT met'}"
        for name, g in report["goals"].items()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main)
