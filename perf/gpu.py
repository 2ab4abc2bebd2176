"""perf/gpu: the GPU path measured in one run: fp16 variant, CUDA provider, served latency.

Reads top to bottom: refuse unless CUDA runs here (PyTorch and ONNX Runtime's CUDA provider:
no fallback to CPU), get a fine-tuned model (given, or the tiny test model trained in
seconds), export onnx-fp32 and onnx-fp16 with the CUDA provider, then, in one process and on
the same test sentences:

  accuracy      every engine's test accuracy, and fp16 against fp32 and against PyTorch fp32
                (label agreement, max |logit difference|)
  SingleStream  batch 1, one test sentence after another, tokenization included: p50/p90/p99
  Offline       the test split in batches of 8 / 32 / 128: sentences per second

for PyTorch eager fp16 and bf16 (the baseline a user would pick), ONNX Runtime CUDA fp32,
fp16 (``run``, and IO binding) and TensorRT fp16 when its libraries are here.  Engines are
timed in warmed blocks that alternate between engines, order rotated each round.  Then one
real ``bentoml serve`` with TRIMSERVE_DEVICE=cuda under open-loop Poisson load: p50/p99 per
rate, requests/s per worker at p99 <= 50 ms, and the share of a request spent outside the
model, from the service's own request, tokenize and inference histograms.

The report (gpu-report.json, gpu-report.md, perf/gpu_report.py) is rewritten after every
phase; a phase that fails is recorded and the next one still runs; phases that would not fit
into --budget-s are skipped and say so.  Exit status: 0, 1 when a phase failed, 2 for bad
input or no CUDA (one line).

``--device cpu`` runs the same flow on CPU (PyTorch fp32 as the baseline, ONNX Runtime fp32
with and without IO binding, the service with TRIMSERVE_DEVICE=cpu): a dry run of this code
and of the report on real, small measurements.  Its verdicts are not GPU figures.

    python -m perf.gpu --help        (perf/gpu_check.sh prepares a GPU machine and runs this)
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from perf import gpu_report
from perf.gpu_engines import OrtEngine, Skipped, TorchEngine, tensorrt_missing
from perf.openloop import ClientLoop, CpuClock, metrics_text, pin, served, server_scenario, summarize, warm_up
from serve.contract import UserError, VariantRecord, VariantsManifest, read, run_cli
from train.cliargs import ConfigParser, add_config_args, config_from_args
from train.data import DEFAULT_MODEL, load_splits, spec_from_description


@dataclass(frozen=True)
class GpuCheckConfig:
    device: Literal["cuda", "cpu"] = field(
        default="cuda", metadata={"help": "cuda: the GPU check (refuses without CUDA); cpu: a dry run of the same flow"}
    )
    model: str | None = field(
        default=None, metadata={"help": "fine-tuned model directory (train/ output); default: train the tiny model"}
    )
    base_model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "encoder the tiny model starts from: the embedded default or a directory (fp16 is widened)"},
    )
    train_steps: int = field(default=60, metadata={"help": "optimizer steps of the tiny model (batches of 32)"})
    train_samples: int = field(default=2048, metadata={"help": "training sentences of the tiny model"})
    max_length: int = field(default=128, metadata={"help": "tokens per text of the tiny model (train/'s default)"})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "validation and test sentences to check and time on (default: all)"}
    )
    output: str = field(default="artifacts/gpu", metadata={"help": "report folder (gpu_check.sh passes $OUT)"})
    work: str = field(default="artifacts/gpu-work", metadata={"help": "folder for the model and the variants"})
    budget_s: float = field(
        default=420.0, metadata={"help": "seconds for the whole run; a phase that would not fit is skipped"}
    )
    rounds: int = field(default=3, metadata={"help": "timed blocks per engine and scenario, order rotated"})
    single_stream_queries: int = field(default=600, metadata={"help": "timed batch-1 queries per engine, all rounds"})
    warmup: int = field(default=20, metadata={"help": "untimed calls before every timed block"})
    offline_batches: tuple[int, ...] = field(default=(8, 32, 128), metadata={"help": "Offline batch sizes"})
    tensorrt: bool = field(default=True, metadata={"help": "time the TensorRT provider when its libraries are here"})
    serve: bool = field(default=True, metadata={"help": "serve the fp16 variant with bentoml serve under load"})
    serve_rates: tuple[float, ...] = field(
        default=(), metadata={"help": "offered requests/s (default: a ramp doubling from --ramp-start)"}
    )
    ramp_start: float = field(default=50.0, metadata={"help": "ramp: first rate, requests/s"})
    ramp_max: float = field(default=6400.0, metadata={"help": "ramp: never offer more than this, requests/s"})
    serve_seconds: float = field(default=3.0, metadata={"help": "seconds of Poisson arrivals per rate"})
    low_rate: float = field(default=20.0, metadata={"help": "rate of the low-load probe (share outside the model)"})
    p99_bound_ms: float = field(default=50.0, metadata={"help": "a rate holds when its p99 is within this..."})
    max_error_share: float = field(default=0.01, metadata={"help": "...and at most this share of requests failed"})

    def __post_init__(self) -> None:
        for name in ("train_steps", "train_samples", "max_length", "rounds", "single_stream_queries"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.single_stream_queries < self.rounds or self.warmup < 0:
            raise UserError("--single-stream-queries must be >= --rounds, --warmup >= 0")
        if self.max_eval_samples is not None and self.max_eval_samples < 2:
            raise UserError(f"--max-eval-samples must be >= 2, got {self.max_eval_samples}")
        if self.budget_s <= 0 or min(self.serve_seconds, self.low_rate, self.ramp_start, self.p99_bound_ms) <= 0:
            raise UserError("--budget-s, --serve-seconds, --low-rate, --ramp-start and --p99-bound-ms must be > 0")
        if any(b < 1 for b in self.offline_batches) or any(r <= 0 for r in self.serve_rates):
            raise UserError("--offline-batches must be >= 1 and --serve-rates > 0 requests/s")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise UserError(f"--model {self.model} is not a model directory (no config.json); pass train/'s output")

    @property
    def rates(self) -> list[float]:
        if self.serve_rates:
            return sorted(self.serve_rates)
        rates, rate = [], self.ramp_start
        while rate <= self.ramp_max:
            rates.append(rate)
            rate *= 2
        return rates


# Seconds a phase needs at least; with less left it is skipped (and reported as such).
NEEDS_S = {"model": 45, "export": 45, "engines": 20, "accuracy": 5, "timing": 15, "served": 40}
TENSORRT_BUILD_S = 120  # building one TensorRT engine for a MiniLM-sized model, with room to spare (a guess)


def main(argv: list[str] | None = None) -> dict:
    parser = ConfigParser(prog="python -m perf.gpu", description=__doc__.split("\n\n")[0])
    add_config_args(parser, GpuCheckConfig)
    report = run(config_from_args(GpuCheckConfig, parser.parse_args(argv)))
    failed = [f"{name} ({p['error']})" for name, p in report["phases"].items() if p["status"] == "failed"]
    if failed:
        sys.exit(f"gpu check: {len(failed)} phase(s) failed: {'; '.join(failed)}; report: {report['paths']['md']}")
    return report


def run(config: GpuCheckConfig) -> dict:
    """Every phase in order; returns the report, also written as gpu-report.json and gpu-report.md."""
    started = time.monotonic()
    machine = require_device(config.device)  # UserError: no CUDA, no fallback
    out, work = Path(config.output), Path(config.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    state = Run(config, started, out, work, gpu_report.new_report(config, machine))
    print(f"gpu check on {machine['device_name']}: budget {config.budget_s:.0f} s, report in {out}", flush=True)
    try:
        model_dir = state.phase("model", get_model, state)
        variants = state.phase("export", export_variants, state, model_dir) if model_dir else state.skip("export")
        engines = state.phase("engines", load_engines, state, model_dir, variants) if variants else None
        if not variants:
            state.skip("engines")
        if engines:
            texts, labels, label_names = test_split(variants, config.max_eval_samples)
            state.phase("accuracy", accuracy, state, engines, texts, labels, label_names)
            state.phase("timing", timing, state, engines, texts)
        else:
            state.skip("accuracy")
            state.skip("timing")
        del engines
        free_gpu_memory()
        if not config.serve:
            state.skip("served", "--no-serve")
        elif variants:
            state.phase("served", serve_under_load, state, variants)
        else:
            state.skip("served")
    finally:
        state.report["seconds"] = round(time.monotonic() - started, 1)
        gpu_report.finish(state.report)
        state.write()
        print(gpu_report.markdown(state.report), flush=True)
    return state.report


# --- the run: phases, budget, the report on disk --------------------------------------------------


@dataclass
class Run:
    """The configuration, the clock and the report of one check; writes the report after every phase."""

    config: GpuCheckConfig
    started: float
    out: Path
    work: Path
    report: dict

    def left_s(self) -> float:
        return self.config.budget_s - (time.monotonic() - self.started)

    def phase(self, name: str, function, *args):
        """``function(*args)``, timed and recorded; None (and the report says why) if it failed or did not fit."""
        if self.left_s() < NEEDS_S[name]:
            self.skip(name, f"{self.left_s():.0f} s of the budget left, the phase needs ~{NEEDS_S[name]} s")
            return None
        print(f"[{name}] ({self.left_s():.0f} s of the budget left)", flush=True)
        start = time.monotonic()
        try:
            result = function(*args)
        except Exception as err:  # a failed phase is reported and the next still runs
            message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            if not isinstance(err, UserError):
                traceback.print_exc()
            print(f"[{name}] FAILED: {message}", flush=True)
            self.report["phases"][name] = {"status": "failed", "seconds": _s(start), "error": message}
            self.write()
            return None
        self.report["phases"][name] = {"status": "ok", "seconds": _s(start)}
        print(f"[{name}] done in {_s(start)} s", flush=True)
        self.write()
        return result

    def skip(self, name: str, why: str = "an earlier phase failed or was skipped") -> None:
        print(f"[{name}] skipped: {why}", flush=True)
        self.report["phases"][name] = {"status": "skipped", "seconds": 0.0, "error": why}

    def write(self) -> None:
        self.report["paths"] = {"json": str(self.out / "gpu-report.json"), "md": str(self.out / "gpu-report.md")}
        (self.out / "gpu-report.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        (self.out / "gpu-report.md").write_text(gpu_report.markdown(self.report))


def _s(start: float) -> float:
    return round(time.monotonic() - start, 1)


# --- CUDA or nothing --------------------------------------------------------------------------------


def require_device(device: str) -> dict:
    """What this machine is; for ``cuda``, UserError in one line unless PyTorch and ONNX Runtime both run on CUDA."""
    import onnxruntime as ort
    import torch

    machine = {
        "device": device,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "onnxruntime": f"{ort.__version__} ({Path(ort.__file__).parent})",
        "onnxruntime_providers": ort.get_available_providers(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "device_name": "CPU (dry run)",
    }
    if device == "cpu":
        return machine
    if not torch.cuda.is_available():
        why = "built without CUDA" if torch.version.cuda is None else "it sees no GPU"
        raise UserError(
            f"CUDA is not available: PyTorch {torch.__version__} reports no CUDA device ({why}); the GPU check does "
            "not fall back to CPU (run it on a machine with an NVIDIA GPU, or pass --device cpu for a dry run)"
        )
    problem = ort_cuda_problem()
    if problem:
        raise UserError(
            f"ONNX Runtime cannot run on CUDA here: {problem}; the GPU check does not fall back to CPU "
            "(install onnxruntime-gpu 1.31 with CUDA 13 and cuDNN 9: perf/gpu_check.sh does)"
        )
    props = torch.cuda.get_device_properties(0)
    machine.update(
        device_name=torch.cuda.get_device_name(0),
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        compute_capability=f"{props.major}.{props.minor}",
        gpus=torch.cuda.device_count(),
        cudnn=torch.backends.cudnn.version(),
        driver=_nvidia_smi("driver_version"),
    )
    return machine


def ort_cuda_problem() -> str | None:
    """Why ONNX Runtime's CUDA provider does not run a one-node graph here (one line), or None when it does."""
    from serve.classifier import probe_provider

    with tempfile.TemporaryDirectory() as tmp:
        return probe_provider(probe_model(Path(tmp) / "probe.onnx"), "CUDAExecutionProvider")


def probe_model(path: Path) -> Path:
    """A one-node ONNX graph (y = x + x) at ``path``: enough to see which provider a session lands on."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    onnx.save(model, str(path))
    return path


def _nvidia_smi(query: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def free_gpu_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- model and variants ----------------------------------------------------------------------------


def get_model(state: Run) -> Path:
    """The given model directory, or the tiny model: train/ on ``--base-model`` for a few dozen steps."""
    config = state.config
    if config.model:
        state.report["model"] = {"path": config.model, "description": f"given: {config.model}"}
        return Path(config.model)
    from train.data import resolve_model
    from train.train import TrainConfig, train

    base = widened_to_fp32(Path(resolve_model(config.base_model)), state.work / "base-model-fp32")
    manifest = train(
        TrainConfig(
            model=str(base),
            output=str(state.work / "model"),
            overwrite=True,
            max_train_samples=config.train_samples,
            max_eval_samples=config.max_eval_samples or 256,
            max_steps=config.train_steps,
            batch_size=32,
            eval_steps=max(1, config.train_steps // 2),
            max_length=config.max_length,
            learning_rate=2e-4,
        )
    )
    test = manifest.metrics["test"]
    state.report["model"] = {
        "path": str(state.work / "model"),
        "base": str(base),
        "train": manifest.train,
        "test": test,
        "description": (
            f"the tiny test model: {config.base_model} fine-tuned {manifest.train.get('steps')} steps on "
            f"{config.train_samples} training sentences in {manifest.train.get('seconds')} s, max_length "
            f"{config.max_length}; test accuracy {test['accuracy']:.4f} on its first {config.max_eval_samples or 256} "
            "test sentences (same architecture as the full model, so its timings are the full model's)"
        ),
    }
    return state.work / "model"


def widened_to_fp32(model_dir: Path, target: Path) -> Path:
    """``model_dir`` itself when its weights are fp32, else a copy in ``target`` with them widened to fp32.

    The GPU payload carries the base model in fp16 (half the bytes); fine-tuning it in fp32 then
    moves every trained weight off fp16's grid, so the fp16 export is not flattered.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    weights_file = model_dir / "model.safetensors"
    if not weights_file.is_file():
        return model_dir
    weights = load_file(weights_file)
    if all(w.dtype != torch.float16 for w in weights.values()):
        return model_dir
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file({k: w.float() if w.is_floating_point() else w for k, w in weights.items()}, target / "model.safetensors")
    return target


def export_variants(state: Run, model_dir: Path) -> VariantsManifest:
    """onnx-fp32 and (on CUDA) onnx-fp16 through export/, each checked against PyTorch on the CUDA provider."""
    from export.export import ExportConfig, export

    recipes = ("onnx-fp32", "onnx-fp16") if state.config.device == "cuda" else ("onnx-fp32",)
    manifest = export(
        ExportConfig(
            model=str(model_dir),
            output=str(state.work / "variants"),
            overwrite=True,
            recipes=recipes,
            device=state.config.device,
            max_eval_samples=state.config.max_eval_samples,
        )
    )
    state.report["variants"] = []
    for v in manifest.variants:
        record = read(manifest.directory(v), VariantRecord) if v.status == "ok" else None
        state.report["variants"].append(
            {
                "name": v.name,
                "status": v.status,
                "error": v.error,
                "provider": record and record.provider,
                "check": record and record.check,
                "recipe": record and record.recipe,
                "bytes": v.files.get("model.onnx", {}).get("bytes"),
            }
        )
    if "onnx-fp32" not in {v.name for v in manifest.ok()}:
        raise UserError(f"onnx-fp32 did not pass its check: {next(v.error for v in manifest.variants)}")
    return manifest


def test_split(variants: VariantsManifest, max_samples: int | None) -> tuple[list[str], list[str], list[str]]:
    """The test sentences and labels the variants were scored on, and the label names."""
    splits = load_splits(spec_from_description(variants.data))
    test = splits.test.iloc[:max_samples] if max_samples else splits.test
    return test["text"].tolist(), test["label"].tolist(), splits.label_names


# --- engines ---------------------------------------------------------------------------------------


def engine_plan(device: str) -> list[dict]:
    """The engines of a run: name, role in the goals, and how to build it (perf/gpu_engines.py).

    Roles: ``baseline`` and ``candidate`` are the pair the speed goals compare; ``reference``
    is only for accuracy (not timed).  On CPU the pair is PyTorch fp32 and ONNX fp32 with IO
    binding: the same code paths, other precisions.
    """
    if device == "cpu":
        return [
            {"name": "torch-fp32", "role": "baseline", "kind": "torch", "dtype": "fp32"},
            {"name": "ort-cpu-fp32", "role": "", "kind": "ort", "variant": "onnx-fp32"},
            {"name": "ort-cpu-fp32-iobinding", "role": "candidate", "kind": "ort", "variant": "onnx-fp32", "io": True},
            {"name": "ort-tensorrt-fp16", "role": "", "kind": "tensorrt", "variant": "onnx-fp32"},
        ]
    return [
        {"name": "torch-fp32", "role": "reference", "kind": "torch", "dtype": "fp32", "timed": False},
        {"name": "torch-fp16", "role": "baseline", "kind": "torch", "dtype": "fp16"},
        {"name": "torch-bf16", "role": "", "kind": "torch", "dtype": "bf16"},
        {"name": "ort-cuda-fp32", "role": "", "kind": "ort", "variant": "onnx-fp32"},
        {"name": "ort-cuda-fp16", "role": "", "kind": "ort", "variant": "onnx-fp16"},
        {"name": "ort-cuda-fp16-iobinding", "role": "candidate", "kind": "ort", "variant": "onnx-fp16", "io": True},
        {"name": "ort-tensorrt-fp16", "role": "", "kind": "tensorrt", "variant": "onnx-fp32"},
    ]


def load_engines(state: Run, model_dir: Path, variants: VariantsManifest) -> dict:
    """{name: (report entry, engine)} for every engine that loads; the others are reported skipped or failed."""
    engines = {}
    for plan in engine_plan(state.config.device):
        name, entry = plan["name"], {k: v for k, v in plan.items() if k != "name"}
        state.report["engines"][name] = entry
        try:
            engine = _build(state, plan, model_dir, variants)
        except Skipped as why:
            entry.update(status="skipped", error=str(why))
        except Exception as err:  # one engine that does not load does not stop the others
            entry.update(status="failed", error=f"{type(err).__name__}: {str(err).strip()[:300]}")
        else:
            engines[name] = (entry, engine)
            entry.update(status="ok", placement=engine.placement)
            if isinstance(engine, OrtEngine):
                entry["provider_options"] = engine.provider_options
        print(f"  {name}: {entry['status']}: {entry.get('placement') or entry.get('error', '')}", flush=True)
    return engines


def _build(state: Run, plan: dict, model_dir: Path, variants: VariantsManifest):
    ok = {v.name: v for v in variants.ok()}
    if plan["kind"] == "torch":
        return TorchEngine(plan["name"], model_dir, variants.load(ok["onnx-fp32"]), plan["dtype"], state.config.device)
    if plan["kind"] == "tensorrt":
        if state.config.device != "cuda":
            raise Skipped("TensorRT needs a GPU (this is a CPU dry run)")
        if not state.config.tensorrt:
            raise Skipped("--no-tensorrt")
        missing = tensorrt_missing()
        if missing:
            raise Skipped(missing)
        if state.left_s() < TENSORRT_BUILD_S + NEEDS_S["timing"] + NEEDS_S["served"]:
            raise Skipped(f"{state.left_s():.0f} s of the budget left: too little to build a TensorRT engine too")
    variant = plan["variant"]
    if variant not in ok:
        error = next((v.error for v in variants.variants if v.name == variant), None) or "not built"
        raise Skipped(f"variant {variant} is not usable: {error}")
    directory, record = variants.directory(ok[variant]), variants.load(ok[variant])
    if plan["kind"] == "tensorrt":
        return OrtEngine(plan["name"], directory, record, "cuda", tensorrt_cache=state.work / "tensorrt-cache")
    return OrtEngine(plan["name"], directory, record, state.config.device, iobinding=plan.get("io", False))


# --- accuracy ----------------------------------------------------------------------------------------


def accuracy(state: Run, engines: dict, texts: list[str], labels: list[str], label_names: list[str]) -> None:
    """Test accuracy of every engine, and its agreement with PyTorch fp32 and with the fp32 ONNX variant."""
    from export.evaluate import score

    logits = {}
    for name, (entry, engine) in engines.items():
        try:
            logits[name] = batched_logits(engine, texts)
        except Exception as err:  # this engine is out; the others go on
            entry.update(status="failed", error=f"accuracy: {type(err).__name__}: {str(err).strip()[:300]}")
            continue
        entry["accuracy"] = score(logits[name], labels, label_names)
    fp32 = "ort-cuda-fp32" if state.config.device == "cuda" else "ort-cpu-fp32"
    references = {"torch-fp32": "vs PyTorch fp32", fp32: "vs ONNX fp32"}
    for name in logits:
        engines[name][0]["agreement"] = {
            label: compare(logits[name], logits[ref])
            for ref, label in references.items()
            if ref in logits and ref != name
        }
    state.report["accuracy"] = {"test_sentences": len(texts), "labels": label_names}


def compare(logits: np.ndarray, reference: np.ndarray) -> dict:
    """Label agreement (share of equal argmax) and max |logit difference| of two engines on the same texts."""
    return {
        "label_agreement": round(float((logits.argmax(1) == reference.argmax(1)).mean()), 5),
        "max_abs_logit_diff": round(float(np.abs(logits - reference).max()), 5),
    }


def batched_logits(engine, texts: list[str], batch: int = 64) -> np.ndarray:
    """float32 logits [len(texts), labels] in input order, in length-sorted batches (little padding)."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    parts = [engine.logits([texts[i] for i in order[s : s + batch]]) for s in range(0, len(texts), batch)]
    out = np.zeros((len(texts), parts[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(parts)
    return out


# --- timing ----------------------------------------------------------------------------------------


def timing(state: Run, engines: dict, texts: list[str]) -> None:
    """SingleStream and Offline for every timed engine, in warmed blocks alternating between engines.

    An engine that raises is marked failed and left out of the later blocks.  When the budget
    runs short, the remaining rounds are dropped (the report counts the queries that ran).
    """
    config = state.config
    timed = {name: pair for name, pair in engines.items() if pair[0].get("timed", True)}
    samples: dict[str, list[float]] = {name: [] for name in timed}
    rates: dict[tuple[str, int], list[float]] = {(name, b): [] for name in timed for b in config.offline_batches}
    per_round = config.single_stream_queries // config.rounds
    names = list(timed)
    reserve_s = NEEDS_S["served"] + 20 if config.serve else 5  # what the served phase and the report need
    stopped = None
    for r in range(config.rounds):
        queries = [texts[(r * per_round + i) % len(texts)] for i in range(per_round)]
        for name in names[r % len(names) :] + names[: r % len(names)]:
            entry, engine = timed[name]
            if state.left_s() < reserve_s:
                stopped = f"out of budget in round {r + 1}, before {name}"
                break
            if entry["status"] != "ok":
                continue
            try:
                samples[name] += _single_stream(engine, queries, config.warmup)
                for b in config.offline_batches:
                    rates[(name, b)].append(_offline(engine, texts, b))
            except Exception as err:  # this engine is out; the others go on
                entry.update(status="failed", error=f"timing: {type(err).__name__}: {str(err).strip()[:300]}")
                print(f"  {name}: FAILED {entry['error']}", flush=True)
        if stopped:
            print(f"  timing: {stopped}; the later blocks are dropped", flush=True)
            break
        print(f"  timing: round {r + 1} of {config.rounds} done ({state.left_s():.0f} s left)", flush=True)
    for name, (entry, _) in timed.items():
        if samples[name]:
            ms = np.array(samples[name])
            entry["single_stream"] = {
                "p50_ms": _r(np.percentile(ms, 50)),
                "p90_ms": _r(np.percentile(ms, 90)),
                "p99_ms": _r(np.percentile(ms, 99)),
                "queries": len(ms),
            }
        offline = {str(b): _r(statistics.median(v), 1) for (n, b), v in rates.items() if n == name and v}
        if offline:
            entry["offline_sentences_per_s"] = offline
    state.report["timing"] = {
        "test_sentences": len(texts),
        "stopped": stopped,
        "method": (
            f"SingleStream: {per_round} batch-1 queries per engine and round after {config.warmup} warm-up calls, "
            "one test sentence after another, tokenization and softmax included. Offline: the test split in test "
            f"order per batch size, padded per batch, median over rounds. Up to {config.rounds} rounds; blocks "
            "alternate between engines, order rotated each round."
        ),
    }


def _single_stream(engine, queries: list[str], warmup: int) -> list[float]:
    """Milliseconds of each batch-1 call, after ``warmup`` untimed ones."""
    for text in queries[:warmup]:
        engine.predict([text])
    times = []
    for text in queries:
        start = time.perf_counter_ns()
        engine.predict([text])
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times


def _offline(engine, texts: list[str], batch: int) -> float:
    """Sentences per second over ``texts`` in batches of ``batch``, after one untimed batch."""
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    engine.predict(batches[0])
    start = time.perf_counter()
    for part in batches:
        engine.predict(part)
    return len(texts) / (time.perf_counter() - start)


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


# --- served ------------------------------------------------------------------------------------------

# The service's own histograms, summed over workers: what a request and its model call cost inside.
SERVICE_METRICS = {
    "trimserve_request_seconds_sum": "request_s",
    "trimserve_request_seconds_count": "requests",
    "trimserve_tokenize_seconds_sum": "tokenize_s",
    "trimserve_inference_seconds_sum": "inference_s",
    "trimserve_inference_seconds_count": "calls",
    "trimserve_batch_size_sum": "texts",
}


def serve_under_load(state: Run, variants: VariantsManifest) -> None:
    """One ``bentoml serve`` of onnx-fp16 (onnx-fp32 on CPU) under open-loop load; fills report["served"]."""
    from serve.config import ServeConfig

    config = state.config
    name = "onnx-fp16" if config.device == "cuda" else "onnx-fp32"
    entry = variants.entry(name)
    env = {
        "TRIMSERVE_VARIANT_DIR": str(variants.directory(entry).resolve()),
        "TRIMSERVE_MANIFEST": str((variants.root / VariantsManifest.FILE).resolve()),
        "TRIMSERVE_DEVICE": config.device,
    }
    server_cpus, client_cpus = split_cores()
    texts, _, _ = test_split(variants, config.max_eval_samples)
    served_report = {
        "variant": name,
        "env": env,
        "server_cpus": list(server_cpus) or "all",
        "client_cpus": list(client_cpus) or "all",
        "p99_bound_ms": config.p99_bound_ms,
        # the service's own default for this device (TRIMSERVE_WORKERS is not set): one per GPU on CUDA
        "workers": ServeConfig(device=config.device, allow_no_auth=True).workers,
    }
    state.report["served"] = served_report
    log = state.out / "server.log"
    repo = str(Path(__file__).resolve().parent.parent)
    try:
        with served(env, repo, server_cpus, ready_timeout_s=150, log=log) as (url, key, server):
            served_report["startup_line"] = startup_line(log)
            pin(client_cpus)
            _load(state, served_report, url, key, server, texts)
    finally:
        served_report["startup_line"] = served_report.get("startup_line") or startup_line(log)


def split_cores() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Half the cores for the server, half for this load generator; nothing pinned below 4 cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 4:
        return (), ()
    half = len(cores) // 2
    return tuple(cores[:half]), tuple(cores[half:])


def startup_line(log: Path) -> str | None:
    """The service's "loaded ... on <provider>" line from the server log."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = [line.strip() for line in lines if "loaded " in line and "ExecutionProvider" in line]
    return found[0][-400:] if found else None


def _load(state: Run, served_report: dict, url: str, key: str, server, texts: list[str]) -> None:
    """Warm-up, the low-load probe, then the rate ramp until a rate misses the bound (or the budget ends).

    Each block is MLPerf LoadGen's Server scenario (perf/openloop.py), as in perf.loadgen.
    """
    config = state.config
    cpu = CpuClock(server)
    client = ClientLoop(url, key, 256, 5.0)
    try:
        client.run(warm_up(client.client, texts, 64))
        low = _block(state, client, cpu, texts, config.low_rate, max(3.0, config.serve_seconds), "low")
        served_report["low_load"] = low
        print(f"  low load {gpu_report.rate_line(low)}", flush=True)
        served_report["ramp"] = []
        for rate in config.rates:
            if state.left_s() < config.serve_seconds + 10:
                print("  served: out of budget, ramp stopped", flush=True)
                served_report["ramp_stopped"] = "budget"
                break
            block = _block(state, client, cpu, texts, rate, config.serve_seconds, f"{rate:g}")
            served_report["ramp"].append(block)
            print(f"  {gpu_report.rate_line(block)}", flush=True)
            if not block["holds"] and not config.serve_rates:
                break  # the ramp stops at the first rate that misses the bound
    finally:
        client.close()


def _block(
    state: Run, client: ClientLoop, cpu: CpuClock, texts: list[str], rate: float, seconds: float, label: str
) -> dict:
    """One Server-scenario run at ``rate``: the client's view (latency, status) and the service's own (its metrics)."""
    config = state.config
    before, cpu_before = client.run(_service_metrics(client.client)), cpu.read()
    answers, loadgen = server_scenario(
        client, texts, rate, seconds, config.p99_bound_ms, 0, Path(tempfile.mkdtemp(prefix=f"loadgen-{label}-"))
    )
    result = summarize(answers, rate, seconds)
    per_request = cpu.per_request(cpu_before, cpu.read(), result.sent)
    result.cpu_ms, result.loadgen = per_request, loadgen
    after = client.run(_service_metrics(client.client))
    inside = gpu_report.inside_figures({k: after[k] - before[k] for k in after})
    return {
        **result.to_dict(config.p99_bound_ms, config.max_error_share),
        "service": inside,
        "client_cpu_ms": per_request.get("client"),
        "server_cpu_ms": per_request.get("server"),
    }


async def _service_metrics(client) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys(SERVICE_METRICS.values(), 0.0)
    for family in text_string_to_metric_families(await metrics_text(client)):
        for sample in family.samples:
            if sample.name in SERVICE_METRICS:
                totals[SERVICE_METRICS[sample.name]] += sample.value
    return totals


if __name__ == "__main__":
    run_cli(main)
