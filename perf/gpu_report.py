"""The GPU check's report: its JSON skeleton, the goals it judges, and the markdown a person reads.

The figures the issue asks for come straight out of ``goals``: fp16 ONNX (IO binding) against
PyTorch eager fp16 at batch 1 (SingleStream p50) and at batch 128 (Offline sentences/s), the
fp16 variant's label agreement with fp32 on the test split, the served requests/s per worker
at p99 <= the bound, and the share of a served request spent outside the model.
"""

from __future__ import annotations

import time
from dataclasses import asdict

GOAL_SINGLE_STREAM = 1.5  # PyTorch fp16 p50 / ONNX fp16 p50 at batch 1
GOAL_OFFLINE = 1.0  # ONNX fp16 / PyTorch fp16 sentences/s at batch 128
GOAL_AGREEMENT = 0.999  # fp16 vs fp32 labels on the test split
OFFLINE_BATCH = 128


def new_report(config, machine: dict) -> dict:
    return {
        "kind": "trimserve.gpu",
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dry_run": config.device == "cpu",
        "machine": machine,
        "config": asdict(config),
        "phases": {},
        "engines": {},
    }


# --- the served phase's figures ------------------------------------------------------------------


def inside_figures(delta: dict) -> dict:
    """What the service's histograms say about one load block (differences of their sums and counts).

    ``outside_model_share`` = 1 - (ONNX Runtime seconds per model call) / (seconds per request,
    from trimserve's middleware to the last byte): at low load a request is one model call of
    its own, so this is the share of its time spent in HTTP, validation, batching, tokenizing
    and answering.  Under load requests share calls, and the figure is per call, not per request.
    """
    requests, calls = delta["requests"], delta["calls"]
    if not requests or not calls:
        return {"requests": int(requests), "calls": int(calls)}
    request_s = delta["request_s"] / requests
    inference_s, tokenize_s = delta["inference_s"] / calls, delta["tokenize_s"] / calls
    return {
        "requests": int(requests),
        "calls": int(calls),
        "mean_batch": round(delta["texts"] / calls, 2),
        "request_ms": round(1e3 * request_s, 3),
        "tokenize_ms_per_call": round(1e3 * tokenize_s, 3),
        "inference_ms_per_call": round(1e3 * inference_s, 3),
        "outside_model_share": round(max(0.0, 1 - inference_s / request_s), 4),
        "outside_tokenize_and_model_share": round(max(0.0, 1 - (inference_s + tokenize_s) / request_s), 4),
    }


def rate_line(block: dict) -> str:
    ms = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    inside = block.get("service", {})
    return (
        f"{block['offered_rps']:g} req/s: {block['sent']} sent, {block['throughput_rps']:.1f} ok/s, "
        f"p50 {ms(block['p50_ms'])} p99 {ms(block['p99_ms'])} ms, {100 * block['error_share']:.1f} % failed, "
        f"mean batch {inside.get('mean_batch', '-')}, model {inside.get('inference_ms_per_call', '-')} ms/call"
    )


# --- goals ---------------------------------------------------------------------------------------


def finish(report: dict) -> None:
    """Add the goals (figures, goal, verdict) to the report."""
    report["goals"] = goals(report)


def _role(report: dict, role: str) -> tuple[str, dict]:
    """The engine playing ``role`` (its name and entry), or the role's name and {} if none ran."""
    for name, entry in report["engines"].items():
        if entry.get("role") == role and entry.get("status") == "ok":
            return name, entry
    return role, {}


def goals(report: dict) -> dict:
    base_name, base = _role(report, "baseline")
    cand_name, cand = _role(report, "candidate")
    found = {}
    b1 = (base.get("single_stream") or {}).get("p50_ms"), (cand.get("single_stream") or {}).get("p50_ms")
    found["single_stream_p50_speedup"] = _goal(
        b1[0] / b1[1] if all(b1) else None,
        GOAL_SINGLE_STREAM,
        f"SingleStream p50: {base_name} / {cand_name}",
        "x",
    )
    batch = _offline_batch(base, cand)
    rates = (
        (base.get("offline_sentences_per_s") or {}).get(batch),
        (cand.get("offline_sentences_per_s") or {}).get(batch),
    )
    found["offline_ratio"] = _goal(
        rates[1] / rates[0] if all(rates) else None,
        GOAL_OFFLINE,
        f"Offline sentences/s at batch {batch}: {cand_name} / {base_name}",
        "x",
    )
    agreement = ((cand.get("agreement") or {}).get("vs ONNX fp32") or {}).get("label_agreement")
    sentences = (report.get("accuracy") or {}).get("test_sentences")
    found["fp16_vs_fp32_label_agreement"] = _goal(
        agreement,
        GOAL_AGREEMENT,
        f"label agreement {cand_name} vs ONNX fp32 on {sentences or '?'} test sentences",
        "share",
    )
    served = report.get("served") or {}
    best = _sustained(served)
    workers = served.get("workers") or 1
    found["served_rps_per_worker"] = {
        "value": round(best["throughput_rps"] / workers, 1) if best else None,
        "label": f"served requests/s per worker at p99 <= {served.get('p99_bound_ms', '?')} ms "
        f"({workers} worker{'s' if workers > 1 else ''}, offered {best['offered_rps'] if best else '-'} req/s)",
        "goal": None,
        "met": None,
    }
    low = (served.get("low_load") or {}).get("service") or {}
    found["outside_model_share"] = {
        "value": low.get("outside_model_share"),
        "label": "share of a served request outside the model, low load "
        f"(request {low.get('request_ms', '-')} ms, ONNX Runtime {low.get('inference_ms_per_call', '-')} ms)",
        "goal": None,
        "met": None,
    }
    return found


def _offline_batch(base: dict, cand: dict) -> str:
    """128, or the largest batch both engines were timed at (dry runs may time smaller ones)."""
    both = set(base.get("offline_sentences_per_s") or {}) & set(cand.get("offline_sentences_per_s") or {})
    if str(OFFLINE_BATCH) in both or not both:
        return str(OFFLINE_BATCH)
    return max(both, key=int)


def _goal(value: float | None, goal: float, label: str, unit: str) -> dict:
    return {
        "value": None if value is None else round(value, 4 if unit == "share" else 2),
        "label": label,
        "goal": goal,
        "unit": unit,
        "met": None if value is None else value >= goal,
    }


def _sustained(served: dict) -> dict | None:
    """The highest rate that holds, going up from the lowest and stopping at the first that fails."""
    best = None
    for block in sorted(served.get("ramp") or [], key=lambda b: b["offered_rps"]):
        if not block["holds"]:
            break
        best = block
    return best


# --- markdown ------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    m = report["machine"]
    title = (
        "# GPU check: DRY RUN on CPU (the code path and report format; these are not GPU figures)"
        if report["dry_run"]
        else f"# GPU check: {m['device_name']}"
    )
    lines = [
        title,
        "",
        f"{report['created']}; {report.get('seconds', '?')} s of a {report['config']['budget_s']:.0f} s budget. "
        + _machine_line(m),
        "",
        *_model_lines(report),
        "",
        "## Goals",
        "",
        "| figure | value | goal | verdict |",
        "|---|---|---|---|",
        *[_goal_row(g) for g in (report.get("goals") or goals(report)).values()],
        "",
        "## Engines",
        "",
        *_engine_table(report),
        "",
        *_served_lines(report),
        "",
        "## Phases",
        "",
        "| phase | status | seconds | note |",
        "|---|---|---|---|",
        *[
            f"| {name} | {p['status']} | {p['seconds']} | {p.get('error') or ''} |"
            for name, p in report["phases"].items()
        ],
    ]
    return "\n".join(lines) + "\n"


def _machine_line(m: dict) -> str:
    gpu = f" ({m['gpu_memory_gib']} GiB, compute capability {m['compute_capability']})" if "gpus" in m else ""
    parts = [
        f"Device: {m['device_name']}{gpu}",
        f"driver {m['driver']}" if m.get("driver") else None,
        f"PyTorch {m['torch']} (CUDA {m['torch_cuda']}, cuDNN {m.get('cudnn')})" if m.get("torch_cuda") else None,
        f"PyTorch {m['torch']}" if not m.get("torch_cuda") else None,
        f"ONNX Runtime {m['onnxruntime']}",
        f"Python {m['python']}",
        f"{m['cpu_cores']} CPU cores",
    ]
    return "; ".join(p for p in parts if p) + "."


def _model_lines(report: dict) -> list[str]:
    model = report.get("model") or {}
    lines = [f"Model: {model.get('description', 'not available')}."] if model else []
    for v in report.get("variants", []):
        check = v.get("check") or {}
        lines.append(
            f"- {v['name']}: {v['status']}"
            + (
                f", validation check against PyTorch fp32 on {v.get('provider')}: label agreement "
                f"{check.get('label_agreement')}, max |dlogit| {check.get('max_abs_logit_diff', 0):.2e}"
                if check
                else ""
            )
            + (f" ({v['error']})" if v.get("error") else "")
        )
    return lines


def _goal_row(g: dict) -> str:
    value = g["value"]
    if value is None:
        shown = "not measured"
    elif g.get("unit") == "share":
        shown = f"{100 * value:.2f} %"
    elif g.get("unit") == "x":
        shown = f"{value:.2f}x"
    else:
        shown = f"{value:g}" if not isinstance(value, float) or value >= 1 else f"{100 * value:.1f} %"
    if g["goal"] is None:
        goal, verdict = "(reported)", "-"
    else:
        goal = f">= {100 * g['goal']:.1f} %" if g.get("unit") == "share" else f">= {g['goal']:g}x"
        verdict = "not measured" if g["met"] is None else "met" if g["met"] else "NOT met"
    return f"| {g['label']} | {shown} | {goal} | {verdict} |"


def _engine_table(report: dict) -> list[str]:
    batches = report["config"]["offline_batches"]
    lines = [
        "| engine | runs on | test acc | vs PyTorch fp32: agree, max abs dlogit | vs ONNX fp32: agree, max abs dlogit "
        "| p50 ms | p90 ms | p99 ms | " + " | ".join(f"b{b} sent/s" for b in batches) + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(batches),
    ]
    for name, e in report["engines"].items():
        if e.get("status") != "ok" and "single_stream" not in e:
            lines.append(f"| {name} | {e.get('status')}: {e.get('error', '')} |" + " |" * (6 + len(batches)))
            continue
        agree = e.get("agreement") or {}
        ss = e.get("single_stream") or {}
        off = e.get("offline_sentences_per_s") or {}
        status = "" if e.get("status") == "ok" else f" ({e.get('status')}: {e.get('error')})"
        lines.append(
            f"| {name}{' (' + e['role'] + ')' if e.get('role') else ''} | {e.get('placement', '')}{status} "
            f"| {(e.get('accuracy') or {}).get('accuracy', '-')} | {_agree(agree.get('vs PyTorch fp32'))} "
            f"| {_agree(agree.get('vs ONNX fp32'))} | {ss.get('p50_ms', '-')} | {ss.get('p90_ms', '-')} "
            f"| {ss.get('p99_ms', '-')} | " + " | ".join(str(off.get(str(b), "-")) for b in batches) + " |"
        )
    method = (report.get("timing") or {}).get("method")
    return lines + (["", f"Method: {method}"] if method else [])


def _agree(a: dict | None) -> str:
    return "-" if not a else f"{100 * a['label_agreement']:.2f} %, {a['max_abs_logit_diff']:.2e}"


def _served_lines(report: dict) -> list[str]:
    served = report.get("served")
    if not served:
        return ["## Served", "", "Not measured (see Phases)."]
    device = report["machine"]["device"]
    lines = [
        f"## Served: bentoml serve, {served['variant']}, TRIMSERVE_DEVICE={device}",
        "",
        f"Server cores {served['server_cpus']}, load generator cores {served['client_cpus'] or 'all'}; one sentence "
        f"per request, open loop (Poisson arrivals, latency from each request's scheduled time); a rate holds when "
        f"p99 <= {served.get('p99_bound_ms')} ms and <= 1 % fail. Service columns are the service's own histograms: "
        "model = ONNX Runtime per model call, request = trimserve's middleware to the last byte.",
        "",
        f"Start-up line: `{served.get('startup_line') or 'not found in the log'}`",
        "",
        "| offered req/s | sent | ok/s | p50 ms | p99 ms | failed | holds | mean batch | model ms/call | request ms "
        "| outside model | client CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    blocks = ([("low load", served["low_load"])] if served.get("low_load") else []) + [
        (None, b) for b in served.get("ramp", [])
    ]
    for label, b in blocks:
        s = b.get("service", {})
        share = s.get("outside_model_share")
        lines.append(
            f"| {b['offered_rps']:g}{' (' + label + ')' if label else ''} | {b['sent']} | {b['throughput_rps']} "
            f"| {b['p50_ms']} | {b['p99_ms']} | {100 * b['error_share']:.1f} % | {'yes' if b['holds'] else 'no'} "
            f"| {s.get('mean_batch', '-')} | {s.get('inference_ms_per_call', '-')} | {s.get('request_ms', '-')} "
            f"| {'-' if share is None else f'{100 * share:.0f} %'} | {b.get('client_cpu_ms')} |"
        )
    return lines
