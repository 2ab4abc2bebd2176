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


def mark_pareto(results: dict) -> None:
    timed = [e for e in results["entries"] if "single_stream" in e]
    front = pareto_front([(e["name"], e["single_stream"]["p50_ms"], e["accuracy"]["accuracy"]) for e in timed])
    for entry in results["entries"]:
        entry["pareto"] = entry["name"] in front


def markdown_table(results: dict) -> str:
    offline_batches = [str(b) for b in results["config"]["offline_batches"]]
    head = ["entry", "test acc", "macro-F1", "MB", "p50 ms", "p90 ms", "p99 ms", "p50 vs a", "p50 vs b"]
    head += [f"b{b} sent/s" for b in offline_batches] + ["peak RSS MB", "Pareto"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    selected = results.get("selection", {}).get("variant")
    for e in results["entries"]:
        ss, sp = e.get("single_stream", {}), e.get("speedup", {})
        name = f"**{e['name']}** (selected)" if e["name"] == selected else e["name"]
        cells = [
            name,
            f"{e['accuracy']['accuracy']:.4f}",
            f"{e['accuracy']['macro_f1']:.4f}",
            f"{e['bytes'] / 1e6:.1f}",
            _f(ss.get("p50_ms")),
            _f(ss.get("p90_ms")),
            _f(ss.get("p99_ms")),
            _x(sp.get("single_stream_p50_vs_a")),
            _x(sp.get("single_stream_p50_vs_b")),
        ]
        cells += [_f(e.get("offline", {}).get(b, {}).get("sentences_per_s"), 0) for b in offline_batches]
        cells += [_f(e.get("memory", {}).get("peak_rss_mb"), 0), "yes" if e.get("pareto") else ""]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_class_table(results: dict) -> str:
    """Test F1 of every class (columns) for every entry (rows); empty without per-class scores."""
    entries = [e for e in results["entries"] if "per_class" in e["accuracy"]]
    if not entries:
        return ""
    classes = list(entries[0]["accuracy"]["per_class"])
    rows = ["| entry | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    for e in entries:
        per_class = e["accuracy"]["per_class"]
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
        f"Selected: **{sel['variant']}**: fastest SingleStream p50 among variants with test accuracy >= "
        f"{sel['budget']} x onnx-fp32 ({sel['reference_accuracy']:.4f}) = {sel['accuracy_floor']:.4f}"
        + ("" if sel["budget_met"] else " (no variant met the budget: onnx-fp32 chosen)")
        + ".",
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
            class_report(selected["accuracy"]),
            "",
        ]
    sweep = sweep_table(results)
    if sweep:
        lines += ["Shape sweep, model only, p50 ms (batch x sequence length):", "", sweep, ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in results["entries"] if "single_stream" in e]
    fig, ax = plt.subplots(figsize=(8, 5))
    for e in entries:
        color = "tab:gray" if e["kind"] == "baseline" else ("tab:red" if e["pareto"] else "tab:blue")
        ax.scatter(e["single_stream"]["p50_ms"], e["accuracy"]["accuracy"], color=color, s=50, zorder=3)
        ax.annotate(
            e["name"],
            (e["single_stream"]["p50_ms"], e["accuracy"]["accuracy"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    front = sorted((e["single_stream"]["p50_ms"], e["accuracy"]["accuracy"]) for e in entries if e["pareto"])
    if front:
        ax.step(
            [p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", lw=1.2, label="Pareto front"
        )
    floor = results["selection"]["accuracy_floor"]
    ax.axhline(floor, color="tab:green", ls="--", lw=1, label=f"budget: {results['selection']['budget']} x onnx-fp32")
    ax.set_xscale("log")
    ax.set_xlabel("SingleStream p50 latency, ms (log scale; tokenization included)")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"Latency vs accuracy, {results['machine']['threads']} threads, {results['machine']['cpu']}", fontsize=9
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
    confusion = next(e for e in results["entries"] if e["name"] == name)["accuracy"]["confusion_matrix"]
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
