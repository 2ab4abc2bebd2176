"""perf/: latency against accuracy for every variant and the baselines, and the serving choice.

Reads top to bottom: load the variants manifest (only variants that passed their check,
files verified by sha256), build baseline b, load every engine, then measure, in one
process and on the same test sentences:

  accuracy     test accuracy and macro-F1 of every entry
  SingleStream batch 1, one real sentence after another, tokenization included (MLPerf)
  Offline      the whole test split in batches of 8 / 32 / 128, sentences per second
  shape sweep  batch x sequence length on synthetic tokens, model only
  memory       peak resident memory of each entry, each in a fresh process

Engines are timed in warmed blocks, and the blocks alternate round by round: ONNX Runtime's
and PyTorch's thread pools spin after each call, so interleaving engines call by call
would have them steal each other's cores.  Then the report (JSON, markdown, plot) is
written and the fastest variant within the accuracy budget becomes ``selected.json``.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export import machine
from export.export import score
from export.manifest import load_manifest, ok_variants, variant_dir, verify_files
from perf import report
from perf.engines import make_engine
from train.checksum import sha256_file
from train.cliargs import ConfigParser, add_config_args, config_from_args
from train.data import load_splits, spec_from_description
from train.errors import UserError, run_cli

BASELINE_A = "baseline-pipeline"
BASELINE_B = "baseline-optimum-int8"


@dataclass(frozen=True)
class PerfConfig:
    variants: str = field(default="artifacts/variants", metadata={"help": "variants directory (with manifest.json) written by export/"})
    model: str | None = field(default=None, metadata={"help": "PyTorch model for baseline a (default: the one the manifest names)"})
    output: str = field(default="artifacts/perf", metadata={"help": "report directory (report.json, report.md, pareto.png)"})
    selected: str = field(default="artifacts/selected.json", metadata={"help": "where to write the serving choice"})
    budget: float = field(default=0.99, metadata={"help": "selected variant keeps >= budget x onnx-fp32 test accuracy (MLPerf: 0.99)"})
    threads: int = field(default=0, metadata={"help": "intra-op threads for every engine (0: all cores)"})
    spin: bool = field(default=True, metadata={"help": "let ONNX Runtime threads busy-wait between calls, its default (the service turns it off: it shares the cores with HTTP work)"})
    single_stream_queries: int = field(default=600, metadata={"help": "timed batch-1 queries per entry, spread over the rounds"})
    warmup: int = field(default=30, metadata={"help": "untimed calls before every timed block"})
    rounds: int = field(default=3, metadata={"help": "blocks per entry and scenario; entry order rotates each round"})
    offline_batches: tuple[int, ...] = field(default=(8, 32, 128), metadata={"help": "Offline batch sizes"})
    bucketing: bool = field(default=False, metadata={"help": "Offline: sort sentences by length before batching (less padding)"})
    sweep_batches: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "shape sweep batch sizes"})
    sweep_lengths: tuple[int, ...] = field(default=(16, 64, 128, 256), metadata={"help": "shape sweep sequence lengths (tokens)"})
    sweep_seconds: float = field(default=0.4, metadata={"help": "target time per shape and entry (at least 3 calls)"})
    scenarios: tuple[str, ...] = field(default=("single", "offline", "sweep", "memory"), metadata={"help": "what to measure"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only N test sentences (quick runs)"})

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise UserError(f"--budget must lie in (0, 1], got {self.budget}")
        unknown = set(self.scenarios) - {"single", "offline", "sweep", "memory"}
        if unknown:
            raise UserError(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from single, offline, sweep, memory")
        if self.rounds < 1 or self.single_stream_queries < self.rounds or self.warmup < 0 or self.threads < 0:
            raise UserError("--rounds must be >= 1, --single-stream-queries >= --rounds, --warmup and --threads >= 0")
        if any(b < 1 for b in self.offline_batches + self.sweep_batches + self.sweep_lengths):
            raise UserError("batch sizes and sequence lengths must be >= 1")

    @property
    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1


def main(argv: list[str] | None = None) -> dict:
    parser = ConfigParser(prog="python -m perf", description=__doc__.split("\n\n")[0])
    add_config_args(parser, PerfConfig)
    return run(config_from_args(PerfConfig, parser.parse_args(argv)))


def run(config: PerfConfig) -> dict:
    manifest = load_manifest(Path(config.variants))
    variants = _verified_variants(manifest)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(config.model or manifest["model"]["path"])
    if not (model_dir / "config.json").is_file():
        raise UserError(f"baseline model {model_dir} is missing; pass --model with the fine-tuned model directory")
    test = load_splits(spec_from_description(manifest["data"])).test
    if config.max_eval_samples:
        test = test.iloc[: config.max_eval_samples]
    texts, labels = test["text"].tolist(), test["label"].tolist()
    max_length = manifest["max_length"]
    threads = config.thread_count

    print(f"perf: {len(variants)} variants + 2 baselines, {len(texts)} test sentences, {threads} threads")
    baseline_b_dir = _build_baseline_b(manifest, out / BASELINE_B)
    entries = [
        {"name": BASELINE_A, "kind": "baseline", "description": "transformers pipeline, PyTorch fp32 eager",
         "path": str(model_dir), "bytes": _dir_bytes(model_dir, (".safetensors", ".bin"))},
        {"name": BASELINE_B, "kind": "baseline", "description": "Optimum export + ORTQuantizer dynamic int8, default config",
         "path": str(baseline_b_dir), "bytes": (baseline_b_dir / "model.onnx").stat().st_size},
    ] + [{"name": v["name"], "kind": "variant", "description": v["description"], "path": str(variant_dir(manifest, v)),
          "bytes": v["files"]["model.onnx"]["bytes"], "sha256": v["files"]["model.onnx"]["sha256"]} for v in variants]

    engines = {e["name"]: make_engine(e, threads, max_length, config.spin) for e in tqdm(entries, desc="load engines")}
    for entry in tqdm(entries, desc="accuracy"):
        entry["accuracy"] = score(engines[entry["name"]].logits(texts), labels, manifest["labels"])
    if "single" in config.scenarios:
        _single_stream(entries, engines, texts, config)
    if "offline" in config.scenarios:
        _offline(entries, engines, texts, config)
    if "sweep" in config.scenarios:
        _sweep(entries, engines, config)
    del engines
    if "memory" in config.scenarios:
        for entry in tqdm(entries, desc="memory"):
            entry["memory"] = _peak_memory(entry, threads, max_length, config.spin, texts[:64])

    results = {
        "kind": "trimserve.perf",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine.describe(), "threads": threads, "ort_spinning": config.spin, "versions": _versions()},
        "config": asdict(config),
        "method": _method_text(config, len(texts)),
        "manifest": str(Path(manifest["_root"]) / "manifest.json"),
        "entries": entries,
    }
    report.add_ratios(results, BASELINE_A, BASELINE_B)
    report.mark_pareto(results)
    results["selection"] = select(entries, config.budget)
    if "offline" in config.scenarios and 32 in config.offline_batches:
        results["int8_efficiency"] = _int8_efficiency(results, manifest, texts, threads)
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report.markdown(results))
    if "single" in config.scenarios:
        report.plot(results, out / "pareto.png")
    _write_selection(results["selection"], manifest, entries, Path(config.selected))
    print(report.markdown_table(results))
    print(f"report: {out / 'report.md'}  plot: {out / 'pareto.png'}  selection: {config.selected}")
    return results


def _verified_variants(manifest: dict) -> list[dict]:
    variants = ok_variants(manifest)
    if not variants:
        raise UserError("the manifest has no variant that passed its check; re-run `python -m export`")
    for v in variants:
        bad = verify_files(variant_dir(manifest, v), v["files"])
        if bad:
            raise UserError(f"variant {v['name']} does not match the manifest: {', '.join(bad)}; re-run `python -m export`")
    return variants


def _build_baseline_b(manifest: dict, target: Path) -> Path:
    """Optimum's plain recipe from the fine-tuned model: export, then dynamic int8, nothing else."""
    import shutil

    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    isa = manifest["isa"]
    shutil.rmtree(target, ignore_errors=True)
    exported = target.with_name(target.name + "-fp32")
    main_export(manifest["model"]["path"], output=exported, task="text-classification", do_validation=False)
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
        entry["single_stream"] = {"p50_ms": _r(np.percentile(ms, 50)), "p90_ms": _r(np.percentile(ms, 90)),
                                  "p99_ms": _r(np.percentile(ms, 99)), "mean_ms": _r(ms.mean()),
                                  "queries": int(len(ms)), "qps": _r(1000 / ms.mean())}


def _offline(entries, engines, texts, config: PerfConfig) -> None:
    ordered = sorted(texts, key=len) if config.bucketing else texts
    rates = {(e["name"], b): [] for e in entries for b in config.offline_batches}
    with tqdm(total=len(entries) * config.rounds * len(config.offline_batches), desc="Offline") as bar:
        for r in range(config.rounds):
            for entry in _rotated(entries, r):
                engine = engines[entry["name"]]
                for b in config.offline_batches:
                    batches = [ordered[i:i + b] for i in range(0, len(ordered), b)]
                    engine.predict_batch(batches[0])  # warm this shape family
                    start = time.perf_counter()
                    for batch in batches:
                        engine.predict_batch(batch)
                    rates[(entry["name"], b)].append(len(ordered) / (time.perf_counter() - start))
                    bar.update()
    for entry in entries:
        entry["offline"] = {str(b): {"sentences_per_s": _r(statistics.median(rates[(entry["name"], b)]))}
                            for b in config.offline_batches}


def _sweep(entries, engines, config: PerfConfig) -> None:
    rng = np.random.default_rng(0)
    for entry in tqdm(entries, desc="shape sweep"):
        engine = engines[entry["name"]]
        result = {}
        for b in config.sweep_batches:
            for s in config.sweep_lengths:
                ids = rng.integers(1000, 29000, size=(b, s), dtype=np.int64)
                ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
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


def _peak_memory(entry: dict, threads: int, max_length: int, spin: bool, texts: list[str]) -> dict:
    """Load and run the entry in a fresh process; its peak RSS is the entry's alone.

    The child imports only perf.engines (and through it onnxruntime, or torch for the
    pipeline baseline), so an ONNX entry's figure does not include PyTorch.
    """
    import subprocess

    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so it would report the
    # parent's (this benchmark's) peak.
    code = ("import json,sys,psutil;from perf.engines import make_engine;"
            "e,t,m,p,x=json.loads(sys.stdin.read());base=psutil.Process().memory_info().rss;"
            "g=make_engine(e,t,m,p);g.predict_batch(x[:32]);[g.predict_one(s) for s in x];"
            "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1];"
            "print(json.dumps([base,int(hwm)*1024]))")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps([entry, threads, max_length, spin, texts]),
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    base, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": _r(peak / 2**20), "after_imports_mb": _r(base / 2**20), "model_mb": _r((peak - base) / 2**20)}


def select(entries: list[dict], budget: float) -> dict:
    """The fastest variant (SingleStream p50) within ``budget`` x onnx-fp32's test accuracy.

    onnx-fp32 meets any budget <= 1 by definition; if no other variant does, it is chosen
    with a warning, since then nothing was gained.
    """
    variants = [e for e in entries if e["kind"] == "variant"]
    reference = next((e for e in variants if e["name"] == "onnx-fp32"), None)
    if reference is None:
        raise UserError("onnx-fp32 is not among the valid variants; the accuracy budget is relative to it")
    floor = budget * reference["accuracy"]["accuracy"]
    timed = all("single_stream" in e for e in variants)
    eligible = [e for e in variants if e is not reference and e["accuracy"]["accuracy"] >= floor - 1e-12]
    if not eligible:
        print(f"warning: no variant keeps {budget:.0%} of onnx-fp32's test accuracy; serving onnx-fp32", file=sys.stderr)
        chosen, met = reference, False
    else:
        key = (lambda e: e["single_stream"]["p50_ms"]) if timed else (lambda e: -e["accuracy"]["accuracy"])
        chosen, met = min(eligible + [reference], key=key), True
    return {"variant": chosen["name"], "budget": budget, "accuracy_floor": round(floor, 5), "budget_met": met,
            "reference_accuracy": reference["accuracy"]["accuracy"],
            "eligible": [reference["name"]] + [e["name"] for e in eligible], "by": "single_stream_p50" if timed else "accuracy"}


def _write_selection(selection: dict, manifest: dict, entries: list[dict], path: Path) -> None:
    variant = next(v for v in manifest["variants"] if v["name"] == selection["variant"])
    measured = next(e for e in entries if e["name"] == selection["variant"])
    figures = {k: measured[k] for k in ("accuracy", "single_stream", "offline", "memory", "speedup", "bytes") if k in measured}
    directory = variant_dir(manifest, variant)
    doc = {"kind": "trimserve.selection", **selection,
           "manifest": str((Path(manifest["_root"]) / "manifest.json").resolve()),
           "manifest_sha256": sha256_file(Path(manifest["_root"]) / "manifest.json"),
           "path": str(directory.resolve()), "files": variant["files"], "labels": manifest["labels"],
           "max_length": manifest["max_length"], "metrics": variant["metrics"], "figures": figures}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _int8_efficiency(results: dict, manifest: dict, texts: list[str], threads: int) -> dict:
    from perf import peak

    # The selected variant if it is int8, else the fastest int8 variant at batch 32.
    kinds = {v["name"]: v["kind"] for v in manifest["variants"]}
    int8 = [e for e in results["entries"] if kinds.get(e["name"]) == "int8"]
    if not int8:
        return {"skipped": "no int8 variant"}
    chosen = next((e for e in int8 if e["name"] == results["selection"]["variant"]),
                  max(int8, key=lambda e: e["offline"]["32"]["sentences_per_s"]))
    variant = next(v for v in manifest["variants"] if v["name"] == chosen["name"])
    macs = peak.linear_macs_per_token(Path(chosen["path"]) / "config.json", variant.get("pruning"))
    tokens = peak.padded_tokens(Path(chosen["path"]), texts, 32, manifest["max_length"], sort=results["config"]["bucketing"])
    rate = chosen["offline"]["32"]["sentences_per_s"]
    achieved = 2 * macs * tokens / len(texts) * rate  # int8 ops/s: a MAC is two operations
    measured = peak.measured_int8_peak(threads)
    nominal = peak.nominal_int8_peak(threads)
    return {"variant": chosen["name"], "linear_macs_per_token": macs, "padded_tokens_per_sentence": _r(tokens / len(texts)),
            "batch": 32, "sentences_per_s": rate, "achieved_int8_gops": _r(achieved / 1e9),
            "nominal_peak_gops": _r(nominal["ops_per_s"] / 1e9), "nominal_peak": nominal,
            "measured_peak_gops": _r(measured["ops_per_s"] / 1e9), "measured_peak": measured,
            "share_of_nominal_peak": _r(achieved / nominal["ops_per_s"], 4),
            "share_of_measured_peak": _r(achieved / measured["ops_per_s"], 4)}


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


def _method_text(config: PerfConfig, n_texts: int) -> str:
    per_round = config.single_stream_queries // config.rounds
    return (f"{n_texts} test sentences. SingleStream: {config.rounds} rounds x {per_round} timed batch-1 queries per entry "
            f"after {config.warmup} warm-up calls, tokenization included; blocks alternate between entries, order rotated "
            f"each round. Offline: the whole test split per batch size, median of {config.rounds} rounds, "
            f"{'length-sorted' if config.bucketing else 'in test order'}, padding per batch. Shape sweep: synthetic tokens, "
            f"model only, median of >= 3 calls per shape. Memory: peak RSS of a fresh process that loads the entry and runs it.")


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


if __name__ == "__main__":
    run_cli(main)
