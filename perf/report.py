"""Turn perf results into ratios, a Pareto front, a markdown report and plots (Pareto front, confusion matrix)."""

from __future__ import annotations

from pathlib import Path


def add_ratios(results: dict, baseline_a: str, baseline_b: str) -> None:
    """Speed-ups against both baselines: >1 means faster than the baseline."""
    by_name = {e["name"]: e for e in results["entries"]}
    for entry in results["entries"]:
        ratios = {}
        for tag, base_name in (("vs_a", baseline_a), ("vs_b", baseline_b)):
            base = by_name[base_name]
            if "single_stream" in entry:
                for stat in ("p50", "p90", "p99", "mean"):
                    ratios[f"single_stream_{stat}_{tag}"] = round(
                        base["single_stream"][f"{stat}_ms"] / entry["single_stream"][f"{stat}_ms"], 2
                    )
            if "offline" in entry:
                for b, fig in entry["offline"].items():
                    ratios[f"offline_b{b}_{tag}"] = round(
                        fig["sentences_per_s"] / base["offline"][b]["sentences_per_s"], 2
                    )
            if "sweep" in entry and tag == "vs_a":
                ratios["sweep_vs_a"] = {
                    k: round(base["sweep"][k]["p50_ms"] / v["p50_ms"], 2) for k, v in entry["sweep"].items()
                }
        entry["speedup"] = ratios


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Names of the (name, latency, accuracy) points no other point beats on both axes."""
    front = set()
    for name, lat, acc in points:
        dominated = any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for n2, l2, a2 in points if n2 != name)
        if not dominated:
            front.add(name)
    return front


HELD_OUT = "test"  # the split the report shows as the result: never used to select


def mark_pareto(results: dict) -> None:
    """``entry["pareto"]``: on the front of SingleStream p50 against held-out (test) accuracy."""
    timed = [e for e in results["entries"] if "single_stream" in e]
    front = pareto_front([(e["name"], e["single_stream"]["p50_ms"], _acc(e)) for e in timed])
    for entry in results["entries"]:
        entry["pareto"] = entry["name"] in front


def _acc(entry: dict, name: str = HELD_OUT) -> float:
    return entry["accuracy"][name]["accuracy"]


def _paired(entry: dict, name: str) -> str:
    """The paired difference to onnx-fp32 in accuracy points, with its 95 % interval."""
    p = entry.get("paired", {}).get(name)
    if p is None:
        return ""
    if p["discordant"] == 0:
        return "same answers"
    return f"{p['difference'] * 100:+.2f} [{p['low'] * 100:+.2f}, {p['high'] * 100:+.2f}]"


def markdown_table(results: dict) -> str:
    """One row per entry: accuracy on every scored set with the paired difference to onnx-fp32, size, speed."""
    offline_batches = [str(b) for b in results["config"]["offline_batches"]]
    sets = list(results["sets"])
    head = ["entry"]
    for name in sets:
        head += [f"{name} acc", f"{name} vs fp32, points [95 % CI]"]
    head += [f"{HELD_OUT} macro-F1", "model MB", "p50 ms", "p90 ms", "p99 ms", "p50 vs a", "p50 vs b"]
    head += [f"b{b} sent/s" for b in offline_batches] + ["peak RSS MB", "batch-invariant", "Pareto"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    selected = results.get("selection", {}).get("variant")
    for e in results["entries"]:
        ss, sp = e.get("single_stream", {}), e.get("speedup", {})
        name = f"**{e['name']}** (selected)" if e["name"] == selected else e["name"]
        cells = [name]
        for s in sets:
            cells += [f"{_acc(e, s):.4f}", _paired(e, s)]
        invariance = e.get("batch_invariance")
        cells += [
            f"{e['accuracy'][HELD_OUT]['macro_f1']:.4f}",
            f"{e['bytes'] / 1e6:.1f}",
            _f(ss.get("p50_ms")),
            _f(ss.get("p90_ms")),
            _f(ss.get("p99_ms")),
            _x(sp.get("single_stream_p50_vs_a")),
            _x(sp.get("single_stream_p50_vs_b")),
        ]
        cells += [_f(e.get("offline", {}).get(b, {}).get("sentences_per_s"), 0) for b in offline_batches]
        cells += [_f(e.get("memory", {}).get("peak_rss_mb"), 0)]
        if invariance is None:
            cells.append("")
        else:
            flips = f", {invariance['label_flips']} flips" if invariance.get("label_flips") else ""
            cells.append(f"{'yes' if invariance['invariant'] else 'no'} ({invariance['max_abs_prob_diff']:.0e}{flips})")
        cells.append("yes" if e.get("pareto") else "")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_class_table(results: dict) -> str:
    """Test F1 of every class (columns) for every entry (rows); empty without per-class scores."""
    entries = [e for e in results["entries"] if "per_class" in e["accuracy"][HELD_OUT]]
    if not entries:
        return ""
    classes = list(entries[0]["accuracy"][HELD_OUT]["per_class"])
    rows = ["| entry | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    for e in entries:
        per_class = e["accuracy"][HELD_OUT]["per_class"]
        rows.append(f"| {e['name']} | " + " | ".join(f"{per_class[c]['f1']:.4f}" for c in classes) + " |")
    return "\n".join(rows)


def class_report(metrics: dict) -> str:
    """Precision, recall, F1 and support per class, then the confusion matrix, as markdown tables."""
    per_class, confusion = metrics["per_class"], metrics["confusion_matrix"]
    rows = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    rows += [
        f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
        for c, m in per_class.items()
    ]
    labels = confusion["labels"]
    rows += ["", "| true \\ predicted | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    rows += [
        f"| {t} | " + " | ".join(map(str, counts)) + " |" for t, counts in zip(labels, confusion["matrix"], strict=True)
    ]
    return "\n".join(rows)


def sweep_table(results: dict) -> str:
    entries = [e for e in results["entries"] if "sweep" in e]
    if not entries:
        return ""
    shapes = list(entries[0]["sweep"])
    rows = ["| entry | " + " | ".join(shapes) + " |", "|" + "---|" * (len(shapes) + 1)]
    for e in entries:
        rows.append(f"| {e['name']} | " + " | ".join(_f(e["sweep"][s]["p50_ms"]) for s in shapes) + " |")
    return "\n".join(rows)


def markdown(results: dict) -> str:
    m = results["machine"]
    sel = results["selection"]
    lines = [
        "# trimserve perf report",
        "",
        f"{results['created']} on {m['cpu']} ({m['arch']}, {m['cores']} cores, {m['threads']} threads used), "
        f"flags: {' '.join(m['flags'])}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        f"Method: {results['method']}",
        "",
        markdown_table(results),
        "",
        selection_text(results),
        "",
    ]
    if "achieved_int8_gops" in results.get("int8_efficiency", {}):
        ie = results["int8_efficiency"]
        lines += [
            f"Int8 efficiency of {ie['variant']} at Offline batch 32: {ie['achieved_int8_gops']} G int8 ops/s "
            f"({ie['linear_macs_per_token']:,} linear MACs/token x "
            f"{ie['padded_tokens_per_sentence']} padded tokens/sentence "
            f"x {ie['sentences_per_s']} sentences/s x 2) = {ie['share_of_nominal_peak']:.1%} of the nominal int8 peak "
            f"({ie['nominal_peak_gops']} G ops/s: {ie['nominal_peak']['formula']}) "
            f"and {ie['share_of_measured_peak']:.1%} "
            f"of the measured MatMulInteger peak ({ie['measured_peak_gops']} G ops/s).",
            "",
        ]
    per_class = per_class_table(results)
    if per_class:
        selected = next(e for e in results["entries"] if e["name"] == sel["variant"])
        lines += [
            "Test F1 per class:",
            "",
            per_class,
            "",
            f"{sel['variant']} (selected) on the test split, per class, and its confusion matrix "
            "(rows: true class, columns: predicted; confusion.png draws it):",
            "",
            class_report(selected["accuracy"][HELD_OUT]),
            "",
        ]
    sweep = sweep_table(results)
    if sweep:
        lines += ["Shape sweep, model only, p50 ms (batch x sequence length):", "", sweep, ""]
    return "\n".join(lines)


def selection_text(results: dict) -> str:
    """How the variant was chosen, on which sets, and what the sets could not resolve."""
    sel = results["selection"]
    sizes = results["sets"]
    lines_text = ", ".join(
        f"{s} ({sizes[s]:,} sentences): {sel['budget']} x {sel['reference_accuracy'][s]:.4f} = {sel['lines'][s]:.4f}"
        for s in sel["sets"]
    )
    if "--accept-unresolved" in sel["rule"]:
        how = (
            "the fastest variant (SingleStream p50) within the budget on the point estimate on every selection "
            f"set, --accept-unresolved ({lines_text}); "
            + (
                "its interval clears the line"
                if sel["resolved"]
                else "**its interval reaches below the line: the sets are too small to show it keeps the budget**"
            )
            + ". "
        )
    else:
        how = (
            "the fastest variant (SingleStream p50) whose 95 % paired bootstrap interval to onnx-fp32 lies above "
            f"the budget line on every selection set ({lines_text}). "
        )
    text = (
        f"Selected: **{sel['variant']}**, {how}"
        f"{HELD_OUT.capitalize()} ({sizes[HELD_OUT]:,} sentences) was not used to select: its figures are held out. "
        f"Within budget on the point estimate: {', '.join(sel['within_budget'])}; resolved (whole interval above "
        f"the line): {', '.join(sel['resolved_variants'])}."
    )
    if sel["unresolved_faster"]:
        text += (
            f" Not resolved: {', '.join(sel['unresolved_faster'])} (faster, within budget on the point estimate, "
            "but the interval reaches below the line: the selection sets are too small to tell whether it keeps "
            "the budget, so it was not chosen)."
        )
    if not sel["budget_met"]:
        text += " No variant met the budget: onnx-fp32 chosen."
    return text


def plot(results: dict, path: Path) -> None:
    """Held-out (test) accuracy against SingleStream p50, error bars from the paired interval to onnx-fp32.

    The selected point is a star; labels of points that would overlap are stacked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = sorted((e for e in results["entries"] if "single_stream" in e), key=lambda e: -_acc(e))
    reference = next(e for e in results["entries"] if e["name"] == "onnx-fp32")
    selected = results["selection"]["variant"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for e in entries:
        x, y = e["single_stream"]["p50_ms"], _acc(e)
        color = "tab:gray" if e["kind"] == "baseline" else ("tab:red" if e["pareto"] else "tab:blue")
        p = e.get("paired", {}).get(HELD_OUT)
        if p and p["discordant"]:
            low, high = _acc(reference) + p["low"], _acc(reference) + p["high"]
            ax.errorbar(x, y, yerr=[[max(y - low, 0)], [max(high - y, 0)]], color=color, lw=1, capsize=3, zorder=2)
        marker, size = ("*", 220) if e["name"] == selected else ("o", 50)
        ax.scatter(x, y, color=color, marker=marker, s=size, zorder=3, edgecolors="black" if marker == "*" else None)
    ax.set_xscale("log")
    ax.autoscale_view()
    # Labels go right of their point, moved up or down until their boxes (display pixels, ~6 px per
    # character at 8 pt) overlap no label placed before: tied or close points stay readable.
    placed: list[tuple[float, float, float, float]] = []
    for e in sorted(entries, key=lambda e: e["single_stream"]["p50_ms"]):
        x, y = e["single_stream"]["p50_ms"], _acc(e)
        px, py = ax.transData.transform((x, y))
        label = e["name"] + (" (selected)" if e["name"] == selected else "")
        width, height = 6.0 * len(label), 11.0
        for offset in (4, -14, 16, -26, 28, -38, 40, -50, 52, -62):
            box = (px + 6, py + offset, px + 6 + width, py + offset + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        leader = {"arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": "gray"}} if offset != 4 else {}
        ax.annotate(label, (x, y), textcoords="offset pixels", xytext=(6, offset), fontsize=8, **leader)
    front = sorted((e["single_stream"]["p50_ms"], _acc(e)) for e in entries if e["pareto"])
    if front:
        ax.step(
            [p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", lw=1.2, label="Pareto front"
        )
    budget = results["selection"]["budget"]
    ax.axhline(budget * _acc(reference), color="tab:green", ls="--", lw=1, label=f"{budget} x onnx-fp32 ({HELD_OUT})")
    ax.set_xlabel("SingleStream p50 latency, ms (log scale; tokenization included)")
    ax.set_ylabel(f"{HELD_OUT} accuracy (held out); bars: 95 % paired interval to onnx-fp32")
    sizes = ", ".join(f"{n:,} {name}" for name, n in results["sets"].items())
    ax.set_title(
        f"Latency vs accuracy; selected on {' + '.join(results['selection']['sets'])}; sentences: {sizes}\n"
        f"{results['machine']['threads']} threads, {results['machine']['cpu']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _x(x) -> str:
    return "" if x is None else f"{x:.1f}x"


def plot_confusion(results: dict, path: Path) -> None:
    """The selected variant's test confusion matrix: counts, shaded by the share of each true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = results["selection"]["variant"]
    confusion = next(e for e in results["entries"] if e["name"] == name)["accuracy"][HELD_OUT]["confusion_matrix"]
    labels, counts = confusion["labels"], np.array(confusion["matrix"])
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name}: test confusion matrix (shade: share of the true class)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
