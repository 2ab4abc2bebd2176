"""perf/: latency against accuracy for every variant and the baselines, and the serving choice.

Reads top to bottom: load the variants manifest (only variants that passed their check,
files verified by sha256), build baseline b, load every engine, then measure, in one
process and on the same sentences:

  accuracy     accuracy and macro-F1 of every entry on validation, test and each --eval-set,
               and its paired difference to onnx-fp32 with a 95 % bootstrap interval
  SingleStream batch 1, one real sentence after another, tokenization included (MLPerf)
  Offline      the whole test split in batches of 8 / 32 / 128, sentences per second
  shape sweep  batch x sequence length on synthetic tokens, model only
  memory       peak resident memory of each entry, each in a fresh process

Engines are timed in warmed blocks, and the blocks alternate round by round: ONNX Runtime's
and PyTorch's thread pools spin after each call, so interleaving engines call by call
would have them steal each other's cores.  Then the report (JSON, markdown, plot) is
written and the selection (see :func:`select`: decided on validation and the extra sets,
never on test, which stays held out) becomes ``selected.json``.

Baselines: (a) ``baseline-pipeline``: transformers pipeline on the PyTorch fp32 model;
(b) ``baseline-optimum-int8``: Optimum's plain recipe, export plus ORTQuantizer dynamic
int8 with the CPU's default configuration, no pruning, no graph optimization.

    python -m perf --help
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export import machine
from export.evaluate import score
from perf import report, stats
from perf.engines import EngineSpec, SyntheticTokens, make_engine, peak_memory
from serve import families
from serve.contract import (
    MODEL_FILE,
    Selection,
    UserError,
    VariantRecord,
    VariantsManifest,
    read,
    run_cli,
    sha256_file,
    write,
)
from train.cliargs import ConfigParser, add_config_args, config_from_args
from train.data import DataSpec, check_rebuilt, load_splits, spec_from_description
from train.sources import read_source

BASELINE_A = "baseline-pipeline"
BASELINE_B = "baseline-optimum-int8"


@dataclass(frozen=True)
class PerfConfig:
    variants: str = field(
        default="artifacts/variants", metadata={"help": "variants directory (with manifest.json) written by export/"}
    )
    model: str | None = field(
        default=None, metadata={"help": "PyTorch model for baseline a (default: the one the manifest names)"}
    )
    output: str = field(
        default="artifacts/perf", metadata={"help": "report directory (report.json, report.md, pareto.png)"}
    )
    selected: str | None = field(
        default=None, metadata={"help": "where to write the serving choice (default: selected.json beside --output)"}
    )
    budget: float = field(
        default=0.99,
        metadata={
            "help": "selected variant keeps >= budget x onnx-fp32's accuracy on validation and every --eval-set "
            "(MLPerf: 0.99); test is never used to select"
        },
    )
    eval_set: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "NAME=PATH ...: more labelled sets (CSV/TSV/JSONL, optionally .gz/.bz2, with text and label "
            "columns; labels must be the model's) scored for every entry; the budget applies to each"
        },
    )
    seed: int = field(default=42, metadata={"help": "seed of the bootstrap resampling behind the intervals"})
    accept_unresolved: bool = field(
        default=False,
        metadata={
            "help": "select the fastest variant within budget on the point estimate even when the selection sets "
            "are too small to show it keeps the budget (recorded as unresolved in selected.json and the report)"
        },
    )
    threads: int = field(default=0, metadata={"help": "intra-op threads for every engine (0: all cores)"})
    spin: bool = field(
        default=True,
        metadata={
            "help": "let ONNX Runtime threads busy-wait between calls, its default "
            "(the service turns it off: it shares the cores with HTTP work)"
        },
    )
    single_stream_queries: int = field(
        default=600, metadata={"help": "timed batch-1 queries per entry, spread over the rounds"}
    )
    warmup: int = field(default=30, metadata={"help": "untimed calls before every timed block"})
    rounds: int = field(default=3, metadata={"help": "blocks per entry and scenario; entry order rotates each round"})
    offline_batches: tuple[int, ...] = field(default=(8, 32, 128), metadata={"help": "Offline batch sizes"})
    bucketing: bool = field(
        default=False, metadata={"help": "Offline: sort sentences by length before batching (less padding)"}
    )
    sweep_batches: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "shape sweep batch sizes"})
    sweep_lengths: tuple[int, ...] = field(
        default=(16, 64, 128, 256), metadata={"help": "shape sweep sequence lengths (tokens)"}
    )
    sweep_seconds: float = field(default=0.4, metadata={"help": "target time per shape and entry (at least 3 calls)"})
    scenarios: tuple[str, ...] = field(
        default=("single", "offline", "sweep", "memory"), metadata={"help": "what to measure"}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "use only the first N sentences of each scored set (quick runs)"}
    )

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise UserError(f"--budget must lie in (0, 1], got {self.budget}")
        unknown = set(self.scenarios) - {"single", "offline", "sweep", "memory"}
        if unknown:
            raise UserError(
                f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from single, offline, sweep, memory"
            )
        if self.rounds < 1 or self.single_stream_queries < self.rounds or self.warmup < 0 or self.threads < 0:
            raise UserError("--rounds must be >= 1, --single-stream-queries >= --rounds, --warmup and --threads >= 0")
        if any(b < 1 for b in self.offline_batches + self.sweep_batches + self.sweep_lengths):
            raise UserError("batch sizes and sequence lengths must be >= 1")
        self.eval_sets  # noqa: B018 - parse now, so that a bad --eval-set stops before anything runs

    @property
    def eval_sets(self) -> dict[str, Path]:
        """``--eval-set`` as ``{name: path}``; UserError for a malformed, duplicate or missing one."""
        sets: dict[str, Path] = {}
        for item in self.eval_set:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UserError(f"--eval-set {item!r} is not valid: expected NAME=PATH")
            if name in sets or name in ("validation", "test", "train"):
                raise UserError(f"--eval-set {item!r} is not valid: {name!r} is already a set's name")
            if Path(path).expanduser().is_dir():
                raise UserError(
                    f"--eval-set {item!r} is not valid: {path} is a directory; expected a CSV/TSV/JSONL file"
                )
            if not Path(path).expanduser().is_file():
                raise UserError(f"--eval-set {item!r} is not valid: no such file {path}")
            sets[name] = Path(path).expanduser()
        return sets

    @property
    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1

    @property
    def selection_path(self) -> Path:
        """``--selected``, or ``selected.json`` beside the report directory (of artifacts/perf: artifacts/)."""
        return Path(self.selected) if self.selected else Path(self.output).parent / Selection.FILE


def main(argv: list[str] | None = None) -> dict:
    parser = ConfigParser(prog="python -m perf", description=__doc__.split("\n\n")[0])
    add_config_args(parser, PerfConfig)
    return run(config_from_args(PerfConfig, parser.parse_args(argv)))


def run(config: PerfConfig) -> dict:
    """Measure every ok variant and both baselines; write the report and the selection.

    Returns the report (also written as report.json).  Raises UserError if the manifest or a
    variant's files do not verify, or onnx-fp32 (the accuracy reference) is missing.
    """
    manifest = read(config.variants, VariantsManifest)
    records = _verified_variants(manifest)
    reference = records.get("onnx-fp32")
    if reference is None:
        raise UserError("onnx-fp32 is not among the valid variants; the accuracy budget is relative to it")
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(config.model or manifest.model["path"])
    if not (model_dir / "config.json").is_file():
        raise UserError(f"baseline model {model_dir} is missing; pass --model with the fine-tuned model directory")
    splits = load_splits(spec_from_description(manifest.data))
    check_rebuilt(splits, manifest.data)
    eval_sets = config.eval_sets
    sets = {"validation": splits.validation, "test": splits.test}
    sets |= {name: load_eval_set(path, name, reference.labels) for name, path in eval_sets.items()}
    if config.max_eval_samples:
        sets = {name: frame.iloc[: config.max_eval_samples] for name, frame in sets.items()}
    texts = sets["test"]["text"].tolist()  # what the speed scenarios run
    threads = config.thread_count
    # Every engine tokenizes like the served variants: the reference variant's record says how.
    spec = EngineSpec(threads, config.spin, reference.labels, reference.max_length, reference.pad_token_id)

    sizes = ", ".join(f"{len(frame):,} {name}" for name, frame in sets.items())
    print(f"perf: {len(records)} variants + 2 baselines; sentences: {sizes}; {threads} threads")
    baseline_b_dir = _build_baseline_b(manifest, out / BASELINE_B)
    entries = [
        {
            "name": BASELINE_A,
            "kind": "baseline",
            "description": "transformers pipeline, PyTorch fp32 eager",
            "path": str(model_dir),
            "bytes": _dir_bytes(model_dir, (".safetensors", ".bin")),
        },
        {
            "name": BASELINE_B,
            "kind": "baseline",
            "description": "Optimum export + ORTQuantizer dynamic int8, default config",
            "path": str(baseline_b_dir),
            "bytes": (baseline_b_dir / MODEL_FILE).stat().st_size,
        },
    ] + [
        {
            "name": v.name,
            "kind": "variant",
            "description": records[v.name].description,
            "path": str(manifest.directory(v)),
            "bytes": v.files[MODEL_FILE]["bytes"],
            "sha256": v.files[MODEL_FILE]["sha256"],
        }
        for v in manifest.ok()
    ]

    engines = {e["name"]: make_engine(e, spec) for e in tqdm(entries, desc="load engines")}
    _score_entries(entries, engines, sets, reference.labels, config.seed)
    for entry in entries:
        record = records.get(entry["name"])  # None for the baselines
        if record and record.batch_invariance:
            entry["batch_invariance"] = record.batch_invariance
    if "single" in config.scenarios:
        _single_stream(entries, engines, texts, config)
    if "offline" in config.scenarios:
        _offline(entries, engines, texts, config)
    if "sweep" in config.scenarios:
        _sweep(entries, engines, config, manifest.directory(manifest.entry("onnx-fp32")))
    del engines
    if "memory" in config.scenarios:
        # Each probe is a process of its own, so two at a time measure the same peaks in half the time.
        with ThreadPoolExecutor(max_workers=2) as pool:
            probes = pool.map(lambda entry: peak_memory(entry, spec, texts[:64]), entries)
            for entry, memory in zip(entries, tqdm(probes, total=len(entries), desc="memory"), strict=True):
                entry["memory"] = memory

    results = {
        "kind": "trimserve.perf",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine.describe(), "threads": threads, "ort_spinning": config.spin, "versions": _versions()},
        "config": asdict(config),
        "method": _method_text(config, {name: len(frame) for name, frame in sets.items()}),
        "manifest": str(manifest.root / VariantsManifest.FILE),
        "sets": {name: len(frame) for name, frame in sets.items()},
        "entries": entries,
    }
    report.add_ratios(results, BASELINE_A, BASELINE_B)
    report.mark_pareto(results)
    results["selection"] = select(
        entries, config.budget, ["validation", *eval_sets], accept_unresolved=config.accept_unresolved
    )
    if "offline" in config.scenarios and 32 in config.offline_batches:
        results["int8_efficiency"] = _int8_efficiency(results, records, texts, threads)
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report.markdown(results))
    if "single" in config.scenarios:
        report.plot(results, out / "pareto.png")
    report.plot_confusion(results, out / "confusion.png")
    _write_selection(results["selection"], manifest, entries, config.selection_path)
    print(report.markdown_table(results))
    print(
        f"report: {out / 'report.md'}  plots: {out / 'pareto.png'}, {out / 'confusion.png'}  "
        f"selection: {config.selection_path}"
    )
    return results


def _verified_variants(manifest: VariantsManifest) -> dict[str, VariantRecord]:
    """Every ok variant's record, after checking all its files against the manifest's sha256."""
    if not manifest.ok():
        raise UserError("the manifest has no variant that passed its check; re-run `python -m export`")
    return {v.name: manifest.load(v) for v in manifest.ok()}


def _build_baseline_b(manifest: VariantsManifest, target: Path) -> Path:
    """Optimum's plain recipe from the fine-tuned model: export, then dynamic int8, nothing else."""
    import shutil

    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    isa = manifest.isa
    shutil.rmtree(target, ignore_errors=True)
    exported = target.with_name(target.name + "-fp32")
    main_export(manifest.model["path"], output=exported, task="text-classification", do_validation=False)
    quantizer = ORTQuantizer.from_pretrained(exported, file_name="model.onnx")
    quantizer.quantize(save_dir=target, quantization_config=getattr(AutoQuantizationConfig, isa)(is_static=False))
    (target / "model_quantized.onnx").replace(target / "model.onnx")
    for f in exported.iterdir():
        if f.suffix != ".onnx" and not (target / f.name).exists():
            shutil.copy2(f, target / f.name)
    shutil.rmtree(exported)
    return target


def _rotated(entries: list[dict], round_index: int) -> list[dict]:
    """Entry order for one round: rotated, so no entry always runs first or after the same one."""
    k = round_index % len(entries)
    return entries[k:] + entries[:k]


def _single_stream(entries, engines, texts, config: PerfConfig) -> None:
    per_round = config.single_stream_queries // config.rounds
    samples = {e["name"]: [] for e in entries}
    with tqdm(total=len(entries) * config.rounds, desc="SingleStream") as bar:
        for r in range(config.rounds):
            queries = [texts[(r * per_round + i) % len(texts)] for i in range(per_round)]
            for entry in _rotated(entries, r):
                engine = engines[entry["name"]]
                for text in queries[: config.warmup]:
                    engine.predict_one(text)
                for text in queries:
                    start = time.perf_counter_ns()
                    engine.predict_one(text)
                    samples[entry["name"]].append((time.perf_counter_ns() - start) / 1e6)
                bar.update()
    for entry in entries:
        ms = np.array(samples[entry["name"]])
        entry["single_stream"] = {
            "p50_ms": _r(np.percentile(ms, 50)),
            "p90_ms": _r(np.percentile(ms, 90)),
            "p99_ms": _r(np.percentile(ms, 99)),
            "mean_ms": _r(ms.mean()),
            "queries": int(len(ms)),
            "qps": _r(1000 / ms.mean()),
        }


def _offline(entries, engines, texts, config: PerfConfig) -> None:
    ordered = sorted(texts, key=len) if config.bucketing else texts
    rates = {(e["name"], b): [] for e in entries for b in config.offline_batches}
    with tqdm(total=len(entries) * config.rounds * len(config.offline_batches), desc="Offline") as bar:
        for r in range(config.rounds):
            for entry in _rotated(entries, r):
                engine = engines[entry["name"]]
                for b in config.offline_batches:
                    batches = [ordered[i : i + b] for i in range(0, len(ordered), b)]
                    engine.predict_batch(batches[0])  # warm this shape family
                    start = time.perf_counter()
                    for batch in batches:
                        engine.predict_batch(batch)
                    rates[(entry["name"], b)].append(len(ordered) / (time.perf_counter() - start))
                    bar.update()
    for entry in entries:
        entry["offline"] = {
            str(b): {"sentences_per_s": _r(statistics.median(rates[(entry["name"], b)]))}
            for b in config.offline_batches
        }


def _sweep(entries, engines, config: PerfConfig, variant_dir: Path) -> None:
    """Model-only latency per batch x length, on the served tokenizer's own ids; lengths past the
    model's positions are left out (said on stdout)."""
    rng = np.random.default_rng(0)
    tokens = SyntheticTokens(variant_dir / "tokenizer.json")
    model_config = json.loads((variant_dir / "config.json").read_text())
    limit = families.family(model_config["model_type"]).position_limit(model_config)
    lengths = [s for s in config.sweep_lengths if not limit or s <= limit]
    if len(lengths) < len(config.sweep_lengths):
        print(f"shape sweep: lengths over the model's {limit} positions left out")
    for entry in tqdm(entries, desc="shape sweep"):
        engine = engines[entry["name"]]
        result = {}
        for b in config.sweep_batches:
            for s in lengths:
                ids = tokens(rng, b, s)
                engine.forward_shape(ids)
                start = time.perf_counter()
                engine.forward_shape(ids)
                one = time.perf_counter() - start
                n = int(min(100, max(3, config.sweep_seconds / max(one, 1e-6))))
                times = []
                for _ in range(n):
                    start = time.perf_counter_ns()
                    engine.forward_shape(ids)
                    times.append((time.perf_counter_ns() - start) / 1e6)
                result[f"{b}x{s}"] = {"p50_ms": _r(statistics.median(times)), "calls": n}
        entry["sweep"] = result


def load_eval_set(path: Path, name: str, label_names: list[str]):
    """An extra labelled set: a DataFrame of ``text`` and ``label`` strings, labels among ``label_names``.

    Read like training data (train/sources.py: CSV/TSV/JSONL, .gz/.bz2, no implicit missing
    values); rows with an empty text or label are dropped and counted on stderr.

    Raises:
        UserError: unreadable file, no ``text``/``label`` column, no rows, or a label the model lacks.
    """
    import pandas as pd

    try:
        source = read_source(DataSpec(source=str(path)))
    except UserError as err:
        if "has no column" not in str(err):
            raise
        raise UserError(f"--eval-set {name}: {path} needs columns named text and label; {err}") from None
    frame = pd.concat(source.parts.values(), ignore_index=True)[["text", "label"]]
    keep = frame["text"].map(lambda t: bool(t and t.strip())) & frame["label"].notna()
    if (~keep).any():
        print(f"--eval-set {name}: dropped {int((~keep).sum())} rows with an empty text or label", file=sys.stderr)
    frame = frame[keep].reset_index(drop=True)
    if frame.empty:
        raise UserError(f"--eval-set {name}: {path} has no rows with both a text and a label")
    unknown = sorted(set(frame["label"]) - set(label_names))
    if unknown:
        raise UserError(
            f"--eval-set {name}: labels {', '.join(map(repr, unknown))} are not the model's "
            f"({', '.join(map(repr, label_names))})"
        )
    return frame


def _score_entries(entries: list[dict], engines: dict, sets: dict, label_names: list[str], seed: int) -> None:
    """``entry["accuracy"][set]`` (score() of every set) and ``entry["paired"][set]`` (difference to onnx-fp32).

    The paired differences use the same bootstrap resamples (one ``seed``) for every entry.
    """
    right: dict[str, dict[str, np.ndarray]] = {}
    truth = {name: np.array([label_names.index(x) for x in frame["label"]]) for name, frame in sets.items()}
    for entry in tqdm(entries, desc="accuracy"):
        entry["accuracy"], right[entry["name"]] = {}, {}
        for name, frame in sets.items():
            logits = engines[entry["name"]].logits(frame["text"].tolist())
            entry["accuracy"][name] = score(logits, frame["label"].tolist(), label_names)
            right[entry["name"]][name] = np.asarray(logits).argmax(axis=1) == truth[name]
    for entry in entries:
        entry["paired"] = {
            name: stats.paired_difference(right[entry["name"]][name], right["onnx-fp32"][name], seed=seed)
            for name in sets
        }


def select(entries: list[dict], budget: float, sets: list[str], accept_unresolved: bool = False) -> dict:
    """The serving choice, decided on ``sets`` (validation and the extra sets; never test).

    The rule, for a budget b and each set s, with onnx-fp32's accuracy A_s on s, the budget
    line L_s = b x A_s, and a variant's paired difference to onnx-fp32 d_s with its 95 %
    bootstrap interval [lo_s, hi_s] (perf/stats.py):

    1. Within budget: accuracy >= L_s on every set (the point estimate).
    2. Resolved: the whole interval clears the line, A_s + lo_s >= L_s on every set: the split
       is large enough to tell that the variant keeps the budget.
    3. The fastest resolved variant (SingleStream p50) is selected; onnx-fp32 always is one (its
       difference to itself is 0).  When a faster variant is within budget but not resolved,
       the split cannot tell whether it keeps the budget: ``resolved`` is False, the report
       says which variant and why, and the pick falls back to the fastest resolved one, never
       a noisy pick presented as a win.

    With ``accept_unresolved``, step 2 is skipped: the fastest variant within budget on the point
    estimate is selected, and ``resolved`` says whether the sets could show it keeps the budget.
    Without timings (no SingleStream), the most accurate on the first set stands in for fastest.

    Returns:
        ``{"variant", "rule", "budget", "sets", "lines", "reference_accuracy", "within_budget",
        "resolved_variants", "resolved", "unresolved_faster", "budget_met", "by"}``.

    Raises:
        UserError: onnx-fp32 is not among ``entries``.
    """
    variants = [e for e in entries if e["kind"] == "variant"]
    reference = next((e for e in variants if e["name"] == "onnx-fp32"), None)
    if reference is None:
        raise UserError("onnx-fp32 is not among the valid variants; the accuracy budget is relative to it")
    ref = {s: reference["accuracy"][s]["accuracy"] for s in sets}
    lines = {s: budget * ref[s] for s in sets}
    tol = 1e-12

    def within(e: dict) -> bool:
        return all(e["accuracy"][s]["accuracy"] >= lines[s] - tol for s in sets)

    def resolved(e: dict) -> bool:
        return all(ref[s] + e["paired"][s]["low"] >= lines[s] - tol for s in sets)

    timed = all("single_stream" in e for e in variants)
    key = (lambda e: e["single_stream"]["p50_ms"]) if timed else (lambda e: -e["accuracy"][sets[0]]["accuracy"])
    candidates = sorted((e for e in variants if within(e)), key=key)
    proven = [e for e in candidates if resolved(e)]
    chosen = proven[0] if proven else reference
    unresolved = [e["name"] for e in candidates if not resolved(e) and key(e) < key(chosen)]
    if accept_unresolved and candidates:
        chosen = candidates[0]
        if not resolved(chosen):
            print(
                f"warning: selected {chosen['name']} (--accept-unresolved): within budget on the point estimate, "
                "but the selection sets are too small to show it keeps the budget",
                file=sys.stderr,
            )
    elif unresolved:
        example = next(e for e in candidates if e["name"] == unresolved[0])
        s = next(s for s in sets if ref[s] + example["paired"][s]["low"] < lines[s] - tol)
        p = example["paired"][s]
        print(
            f"warning: {s} ({p['n']:,} sentences) cannot resolve the {budget:.0%} budget for {example['name']}: "
            f"paired difference to onnx-fp32 {p['difference'] * 100:+.2f} points, 95 % interval "
            f"[{p['low'] * 100:+.2f}, {p['high'] * 100:+.2f}], budget line {(lines[s] - ref[s]) * 100:+.2f}; "
            f"selected {chosen['name']}, the fastest variant whose interval clears the line",
            file=sys.stderr,
        )
    if len(candidates) == 1:
        print(f"warning: no variant keeps {budget:.0%} of onnx-fp32's accuracy; serving onnx-fp32", file=sys.stderr)
    return {
        "variant": chosen["name"],
        "rule": (
            "fastest variant within budget x onnx-fp32's accuracy on every selection set (test held out), "
            "whether or not its 95 % paired interval clears that line (--accept-unresolved)"
            if accept_unresolved
            else "fastest variant whose 95 % paired interval to onnx-fp32 clears budget x onnx-fp32's accuracy "
            "on every selection set (test held out)"
        ),
        "budget": budget,
        "sets": list(sets),
        "lines": {s: round(v, 5) for s, v in lines.items()},
        "reference_accuracy": ref,
        "within_budget": [e["name"] for e in candidates],
        "resolved_variants": [e["name"] for e in proven],
        # the pick was not limited by the sets' size: nothing faster left unresolved, or (accepting
        # unresolved picks) the pick itself shown to keep the budget
        "resolved": (chosen in proven) if accept_unresolved else not unresolved,
        "unresolved_faster": [] if accept_unresolved else unresolved,
        "budget_met": len(candidates) > 1,
        "by": "single_stream_p50" if timed else "accuracy",
    }


def _write_selection(selection: dict, manifest: VariantsManifest, entries: list[dict], path: Path) -> None:
    """The selection file: the variant, its manifest by relative path and sha256, the rule, the figures."""
    measured = next(e for e in entries if e["name"] == selection["variant"])

    def on(name: str) -> dict:
        keep = ("accuracy", "macro_f1")
        return {**{k: measured["accuracy"][name][k] for k in keep}, "paired_to_onnx_fp32": measured["paired"][name]}

    figures = {
        "selection_sets": {name: on(name) for name in selection["sets"]},  # what the choice was made on
        "held_out": {name: on(name) for name in measured["accuracy"] if name not in selection["sets"]},  # test
        **{k: measured[k] for k in ("single_stream", "offline", "memory", "speedup", "bytes") if k in measured},
    }
    manifest_file = manifest.root / VariantsManifest.FILE
    rule = {k: v for k, v in selection.items() if k != "variant"}
    path.parent.mkdir(parents=True, exist_ok=True)
    write(
        path,
        Selection(
            variant=selection["variant"],
            manifest=os.path.relpath(manifest_file, path.parent.resolve()),
            manifest_sha256=sha256_file(manifest_file),
            rule=rule,
            figures=figures,
        ),
    )


def _int8_efficiency(results: dict, records: dict[str, VariantRecord], texts: list[str], threads: int) -> dict:
    from perf import peak

    # The selected variant if it is int8, else the fastest int8 variant at batch 32.
    int8 = [e for e in results["entries"] if e["name"] in records and records[e["name"]].precision == "int8"]
    if not int8:
        return {"skipped": "no int8 variant"}
    chosen = next(
        (e for e in int8 if e["name"] == results["selection"]["variant"]),
        max(int8, key=lambda e: e["offline"]["32"]["sentences_per_s"]),
    )
    record = records[chosen["name"]]
    macs = peak.linear_macs_per_token(Path(chosen["path"]) / "config.json", record.pruning)
    tokens = peak.padded_tokens(Path(chosen["path"]), texts, 32, record.max_length, sort=results["config"]["bucketing"])
    rate = chosen["offline"]["32"]["sentences_per_s"]
    achieved = 2 * macs * tokens / len(texts) * rate  # int8 ops/s: a MAC is two operations
    measured = peak.measured_int8_peak(threads)
    nominal = peak.nominal_int8_peak(threads)
    return {
        "variant": chosen["name"],
        "linear_macs_per_token": macs,
        "padded_tokens_per_sentence": _r(tokens / len(texts)),
        "batch": 32,
        "sentences_per_s": rate,
        "achieved_int8_gops": _r(achieved / 1e9),
        "nominal_peak_gops": _r(nominal["ops_per_s"] / 1e9),
        "nominal_peak": nominal,
        "measured_peak_gops": _r(measured["ops_per_s"] / 1e9),
        "measured_peak": measured,
        "share_of_nominal_peak": _r(achieved / nominal["ops_per_s"], 4),
        "share_of_measured_peak": _r(achieved / measured["ops_per_s"], 4),
    }


def _dir_bytes(directory: Path, suffixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in suffixes)


def _versions() -> dict:
    import importlib.metadata as md
    import platform

    pkgs = ("onnxruntime", "onnx", "torch", "transformers", "optimum-onnx", "tokenizers", "numpy")
    found = {}
    for pkg in pkgs:
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), **found}


def _method_text(config: PerfConfig, sizes: dict[str, int]) -> str:
    """What was measured and how, for the scenarios this run ran."""
    per_round = config.single_stream_queries // config.rounds
    parts = [
        "Accuracy on " + ", ".join(f"{n:,} {name}" for name, n in sizes.items()) + " sentences; speed on the "
        f"{sizes['test']:,} test sentences."
    ]
    if "single" in config.scenarios:
        parts.append(
            f"SingleStream: {config.rounds} rounds x {per_round} timed batch-1 queries per entry after "
            f"{config.warmup} warm-up calls, tokenization included; blocks alternate between entries, order "
            "rotated each round."
        )
    if "offline" in config.scenarios:
        parts.append(
            f"Offline: the whole test split per batch size, median of {config.rounds} rounds, "
            f"{'length-sorted' if config.bucketing else 'in test order'}, padding per batch."
        )
    if "sweep" in config.scenarios:
        parts.append("Shape sweep: synthetic tokens, model only, median of >= 3 calls per shape.")
    if "memory" in config.scenarios:
        parts.append("Memory: peak RSS of a fresh process that loads the entry and runs it.")
    parts.append(
        "Model MB: the model.onnx file (baseline-pipeline: its safetensors weights). Accuracy intervals: paired "
        f"bootstrap of the difference to onnx-fp32, {stats.RESAMPLES:,} resamples, seed {config.seed}, 95 % "
        "percentile interval."
    )
    return " ".join(parts)


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


if __name__ == "__main__":
    run_cli(main)
