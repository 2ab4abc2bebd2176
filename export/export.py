"""export/: turn a fine-tuned model into smaller, faster ONNX variants, each checked and scored.

Reads top to bottom: check the model directory, rebuild its data splits from the training
manifest, compute the PyTorch reference logits, then build each recipe in order:

  onnx-fp32     Optimum export (dynamic batch and sequence axes)
  onnx-opt      ORTOptimizer graph fusions (O2 on CPU; onnx-fp16 adds O4/fp16 on CUDA)
  int8-dynamic  ORTQuantizer dynamic int8, configuration chosen from the CPU's instruction set
  int8-static   ORTQuantizer static int8, calibrated on training sentences
  pruned-fp32   heads and FFN neurons removed, recovered by distillation (prune.py), exported
  pruned-int8   the pruned model, O2 fused, dynamic int8
  pruned-l3-*   the same after dropping half the layers (6 -> 3): much faster at batch 1

Every variant is compared with the PyTorch model it came from on the validation split
(label agreement, max |logit difference|, a tolerance per kind) and scored on validation
and test.  A variant that fails its check is marked failed in the manifest; perf/ and
serve/ only ever use variants whose status is "ok".

    python -m export --help
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from export import machine
from export.manifest import MANIFEST, VARIANT_FILE, describe_files
from train.cliargs import ConfigParser, add_config_args, config_from_args
from train.data import DataSpec, Splits, load_splits, spec_from_description
from train.errors import UserError, run_cli

# Numerical check tolerances per kind of variant, against the PyTorch model it came from.
# fp32 exports differ by float reordering only; fusions approximate GELU/LayerNorm a little;
# int8 moves logits visibly, so for it the label agreement is what counts.
TOLERANCES = {
    "fp32": {"max_abs_logit_diff": 1e-3, "min_label_agreement": 0.999},
    "optimized": {"max_abs_logit_diff": 2e-2, "min_label_agreement": 0.995},
    "fp16": {"max_abs_logit_diff": 5e-2, "min_label_agreement": 0.99},
    "int8": {"max_abs_logit_diff": 2.5, "min_label_agreement": 0.95},
}
SUPPORTED_MODEL_TYPES = ("bert",)


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # a key of TOLERANCES
    source: str | None  # the variant it is built from
    description: str
    needs_cuda: bool = False
    family: str = "unpruned"  # the PyTorch model its numerical check compares with


RECIPES = {r.name: r for r in [
    Recipe("onnx-fp32", "fp32", None, "Optimum ONNX export, dynamic batch and sequence axes"),
    Recipe("onnx-opt", "optimized", "onnx-fp32", "ORTOptimizer O2: fused attention, GELU, LayerNorm"),
    Recipe("onnx-fp16", "fp16", "onnx-fp32", "ORTOptimizer O4: O2 fusions plus fp16 weights (CUDA only)", needs_cuda=True),
    Recipe("int8-dynamic", "int8", "onnx-opt", "ORTQuantizer dynamic int8 (weights int8, activations at run time)"),
    Recipe("int8-static", "int8", "onnx-fp32", "ORTQuantizer static int8 (QDQ MatMuls), ranges calibrated on training data"),
    Recipe("pruned-fp32", "fp32", None, "heads and FFN neurons removed, distilled from the unpruned model, exported",
           family="pruned-fp32"),
    Recipe("pruned-int8", "int8", "pruned-fp32", "pruned-fp32, O2 fused, dynamic int8", family="pruned-fp32"),
    Recipe("pruned-l3-fp32", "fp32", None, "half the layers dropped, then heads and FFN neurons removed, distilled, exported",
           family="pruned-l3-fp32"),
    Recipe("pruned-l3-int8", "int8", "pruned-l3-fp32", "pruned-l3-fp32, O2 fused, dynamic int8", family="pruned-l3-fp32"),
]}


@dataclass(frozen=True)
class ExportConfig:
    model: str = field(default="artifacts/model", metadata={"help": "fine-tuned model directory (train/ output or any BERT sequence-classification checkpoint)"})
    output: str = field(default="artifacts/variants", metadata={"help": "directory for the variants and manifest.json"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing variants in --output"})
    recipes: tuple[str, ...] = field(default=(), metadata={"help": f"recipes to build (default: all that apply here): {', '.join(RECIPES)}"})
    data: str | None = field(default=None, metadata={"help": "data to check and score on (default: the training data named in train_manifest.json)"})
    text_column: str = field(default="text", metadata={"help": "text column of a --data file"})
    label_column: str = field(default="label", metadata={"help": "label column of a --data file"})
    isa: Literal["auto", "avx512_vnni", "avx512", "avx2", "arm64"] = field(default="auto", metadata={"help": "instruction set the int8 configuration targets"})
    per_channel: bool = field(default=True, metadata={"help": "per-channel int8 weight scales (more accurate, same speed on VNNI)"})
    calibration: Literal["minmax", "percentile", "entropy"] = field(default="minmax", metadata={"help": "static int8 calibration method (percentile clips MiniLM's outlier channels: avoid)"})
    calibration_samples: int = field(default=128, metadata={"help": "training sentences used to calibrate static int8"})
    prune_target: float = field(default=0.45, metadata={"help": "share of attention heads and of FFN neurons to remove (= share of encoder FLOPs/token)"})
    prune_keep_layers: int = field(default=3, metadata={"help": "encoder layers the pruned-l3 recipes keep"})
    importance_samples: int = field(default=1024, metadata={"help": "training sentences used to rank heads and neurons"})
    distill_epochs: float = field(default=2.0, metadata={"help": "epochs of distillation after pruning"})
    distill_max_steps: int = field(default=-1, metadata={"help": "cap on distillation steps (-1: use --distill-epochs)"})
    distill_learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate of the distillation"})
    distill_temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the KD loss"})
    distill_alpha: float = field(default=0.5, metadata={"help": "weight of the hard-label loss (1 - alpha on the KD loss)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only N training rows (quick runs)"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "check and score on only N validation/test rows (quick runs)"})
    batch_size: int = field(default=64, metadata={"help": "sentences per batch when checking and scoring"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "where ONNX Runtime runs the checks"})

    def __post_init__(self) -> None:
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown:
            raise UserError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
        if not 0 < self.prune_target < 0.95:
            raise UserError(f"--prune-target must lie in (0, 0.95), got {self.prune_target}")
        if self.prune_keep_layers < 1:
            raise UserError(f"--prune-keep-layers must be >= 1, got {self.prune_keep_layers}")
        for name in ("calibration_samples", "importance_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0 or self.distill_learning_rate <= 0 \
                or self.distill_epochs <= 0:
            raise UserError("--distill-alpha must lie in [0, 1]; --distill-temperature, --distill-learning-rate "
                            "and --distill-epochs must be positive")


def main(argv: list[str] | None = None) -> dict:
    parser = ConfigParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    add_config_args(parser, ExportConfig)
    return export(config_from_args(ExportConfig, parser.parse_args(argv)))


def export(config: ExportConfig) -> dict:
    """Build, check and score every requested variant; returns the manifest written."""
    model_dir = Path(config.model)
    model_config, train_manifest = _check_model_dir(model_dir)
    out = Path(config.output).resolve()
    _check_output(out, config.overwrite)
    host = machine.describe()
    cuda = host["cuda"] and config.device != "cpu"
    isa = machine.resolve_isa(config.isa, host)
    recipes = _select_recipes(config.recipes, cuda)
    splits = _load_data(config, train_manifest)
    splits.label_names = _model_labels(model_config, splits.label_names)
    max_length = int(train_manifest.get("max_length", 128)) if train_manifest else 128
    print(f"export: {model_dir} -> {out}; recipes: {', '.join(r.name for r in recipes)}; int8 ISA: {isa}")

    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    context = Context(config, model_dir, staging, splits, max_length, isa, cuda)
    variants: list[dict] = []
    try:
        context.reference["unpruned"] = _torch_logits(_load_torch(model_dir), splits, config, max_length)
        for recipe in recipes:
            variants.append(_build_and_check(recipe, context))
        manifest = {
            "kind": "trimserve.variants",
            "model": {"path": str(model_dir.resolve()), "model_type": model_config["model_type"],
                      "files": describe_files(model_dir, ["model.safetensors", "config.json"]),
                      "train_manifest": train_manifest and {k: train_manifest[k] for k in ("method", "metrics", "seed")}},
            "data": splits.describe(),
            "max_length": max_length,
            "labels": [model_config["id2label"][str(i)] for i in range(len(model_config["id2label"]))],
            "config": asdict(config),
            "machine": host,
            "isa": isa,
            "pytorch": {"test": context.reference["unpruned"]["test_metrics"],
                        "validation": context.reference["unpruned"]["validation_metrics"]},
            "variants": variants,
            "seconds": round(time.perf_counter() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_summary(manifest)
    return manifest


@dataclass
class Context:
    """What every recipe needs: the config, where to write, the data and reference logits."""

    config: ExportConfig
    model_dir: Path
    staging: Path
    splits: Splits
    max_length: int
    isa: str
    cuda: bool
    reference: dict = field(default_factory=dict)  # recipe family -> PyTorch logits and metrics
    extra: dict = field(default_factory=dict)  # per-variant figures (pruning report)


def _check_model_dir(model_dir: Path) -> tuple[dict, dict | None]:
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist; run `python -m train` first or pass --model")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model_dir} has no config.json; expected a Hugging Face checkpoint directory")
    try:
        model_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON ({err.msg} at line {err.lineno}); the model directory is corrupt") from None
    if model_config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported architecture {model_config.get('model_type')!r}; export supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    if "id2label" not in model_config:
        raise UserError(f"{config_file} has no id2label; expected a sequence-classification checkpoint")
    if not any((model_dir / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"{model_dir} has no model.safetensors or pytorch_model.bin; the weights are missing")
    manifest_file = model_dir / "train_manifest.json"
    if not manifest_file.is_file():
        return model_config, None
    try:
        return model_config, json.loads(manifest_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{manifest_file} is not valid JSON ({err.msg}); the model directory is corrupt") from None


def _model_labels(model_config: dict, data_labels: list[str]) -> list[str]:
    """The model's label order (id2label), after checking the data has the same labels."""
    labels = [model_config["id2label"][str(i)] for i in range(len(model_config["id2label"]))]
    if sorted(labels) != sorted(data_labels):
        raise UserError(f"the model's labels {labels} differ from the data's {data_labels}; pass the data it was trained on")
    return labels


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; expected a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():  # --overwrite never deletes what export/ did not write
            raise UserError(f"--output {out} holds other files, not variants; choose an empty or new directory")
        if not overwrite:
            raise UserError(f"--output {out} already holds variants; pass --overwrite to replace them or choose another --output")
    out.parent.mkdir(parents=True, exist_ok=True)


def _select_recipes(names: tuple[str, ...], cuda: bool) -> list[Recipe]:
    chosen = [RECIPES[n] for n in names] if names else [r for r in RECIPES.values() if cuda or not r.needs_cuda]
    for recipe in chosen:
        if recipe.needs_cuda and not cuda:
            raise UserError(f"recipe {recipe.name} needs a CUDA device and onnxruntime-gpu; none is available here")
    # Pull in sources that were not asked for (int8-dynamic needs onnx-opt, which needs onnx-fp32).
    needed = {r.name for r in chosen}
    for recipe in list(chosen):
        source = recipe.source
        while source and source not in needed:
            needed.add(source)
            source = RECIPES[source].source
    return [r for r in RECIPES.values() if r.name in needed]


def _load_data(config: ExportConfig, train_manifest: dict | None) -> Splits:
    if config.data:
        spec = DataSpec(source=config.data, text_column=config.text_column, label_column=config.label_column)
    elif train_manifest:
        spec = spec_from_description(train_manifest["data"])
    else:
        raise UserError("the model directory has no train_manifest.json; pass --data to say which data to check and score on")
    splits = load_splits(spec)
    if not config.data and splits.sha256 != train_manifest["data"]["sha256"]:
        raise UserError(f"data {spec.source} has changed since training (sha256 differs); re-train or pass --data")
    if config.max_train_samples:
        splits.train = splits.train.iloc[: config.max_train_samples]
    if config.max_eval_samples:
        splits.validation = splits.validation.iloc[: config.max_eval_samples]
        splits.test = splits.test.iloc[: config.max_eval_samples]
    return splits


def _load_torch(model_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(model_dir)
        return AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    except (OSError, ValueError, RuntimeError) as err:  # e.g. truncated safetensors, missing tokenizer
        raise UserError(f"cannot load the model in {model_dir}: {str(err).splitlines()[0]}; the model directory is corrupt") from None


def _torch_logits(model, splits: Splits, config: ExportConfig, max_length: int) -> dict:
    """Reference logits of a PyTorch model on validation and test, with its metrics."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    result = {}
    for part in ("validation", "test"):
        frame = getattr(splits, part)
        result[part] = batched_torch_logits(model, tokenizer, frame["text"].tolist(), max_length, config.batch_size)
        result[f"{part}_metrics"] = score(result[part], frame["label"].tolist(), splits.label_names)
    return result


def batched_torch_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Logits of a PyTorch classifier for ``texts``, in batches padded to their longest text."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")
            out.append(model(**batch).logits.float().numpy())
    return np.concatenate(out)


def score(logits: np.ndarray, labels: list[str], label_names: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    truth = np.array([label_names.index(x) for x in labels])
    preds = logits.argmax(axis=1)
    return {"accuracy": round(float(accuracy_score(truth, preds)), 5),
            "macro_f1": round(float(f1_score(truth, preds, average="macro")), 5)}


def _build_and_check(recipe: Recipe, ctx: Context) -> dict:
    from serve.classifier import OnnxClassifier, batched_logits

    target = ctx.staging / recipe.name
    entry: dict = {"name": recipe.name, "kind": recipe.kind, "source": recipe.source,
                   "description": recipe.description, "path": recipe.name}
    print(f"[{recipe.name}] {recipe.description}", flush=True)
    started = time.perf_counter()
    source_failed = recipe.source and ctx.extra.get(f"status:{recipe.source}") != "ok"
    if source_failed:
        return {**entry, "status": "failed", "error": f"source variant {recipe.source} failed"}
    try:
        details = BUILDERS[recipe.name](ctx, target)
    except UserError:
        raise
    except Exception as err:  # a failed build is recorded, and the other recipes still run
        print(f"[{recipe.name}] FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        ctx.extra[f"status:{recipe.name}"] = "failed"
        return {**entry, "status": "failed", "error": f"{type(err).__name__}: {err}"}
    entry["build_seconds"] = round(time.perf_counter() - started, 1)
    entry["recipe"] = details
    try:
        clf = OnnxClassifier(target, max_length=ctx.max_length, device="cuda" if ctx.cuda else "cpu")
    except Exception as err:  # ONNX Runtime refuses the graph: this variant failed, the others go on
        ctx.extra[f"status:{recipe.name}"] = "failed"
        return {**entry, "status": "failed", "error": f"ONNX Runtime cannot load it: {type(err).__name__}: {err}"}
    reference = ctx.reference[recipe.family]
    val_texts = ctx.splits.validation["text"].tolist()
    val_logits = batched_logits(clf, val_texts, ctx.config.batch_size)
    test_logits = batched_logits(clf, ctx.splits.test["text"].tolist(), ctx.config.batch_size)
    check = numeric_check(val_logits, reference["validation"], TOLERANCES[recipe.kind])
    entry["check"] = check
    entry["provider"] = clf.provider
    entry["metrics"] = {"validation": score(val_logits, ctx.splits.validation["label"].tolist(), ctx.splits.label_names),
                        "test": score(test_logits, ctx.splits.test["label"].tolist(), ctx.splits.label_names)}
    entry["status"] = "ok" if check["passed"] else "failed"
    if not check["passed"]:
        entry["error"] = f"numerical check failed: {check}"
    if f"pruning:{recipe.family}" in ctx.extra:
        entry["pruning"] = ctx.extra[f"pruning:{recipe.family}"]
    _write_variant_file(target, entry, ctx)
    entry["files"] = describe_files(target)
    entry["bytes"] = sum(f["bytes"] for f in entry["files"].values())
    ctx.extra[f"status:{recipe.name}"] = entry["status"]
    m = entry["metrics"]["test"]
    print(f"[{recipe.name}] {entry['status']}: test acc {m['accuracy']:.4f} f1 {m['macro_f1']:.4f}, "
          f"agreement {check['label_agreement']:.4f}, max|dlogit| {check['max_abs_logit_diff']:.2e}, "
          f"model.onnx {entry['files']['model.onnx']['bytes'] / 1e6:.1f} MB, built in {entry['build_seconds']} s", flush=True)
    return entry


def numeric_check(logits: np.ndarray, reference: np.ndarray, tolerance: dict) -> dict:
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    max_diff = float(np.abs(logits - reference).max())
    return {"label_agreement": round(agreement, 5), "max_abs_logit_diff": max_diff, "tolerance": tolerance,
            "passed": bool(agreement >= tolerance["min_label_agreement"] and max_diff <= tolerance["max_abs_logit_diff"]),
            "samples": int(len(logits))}


def _write_variant_file(target: Path, entry: dict, ctx: Context) -> None:
    """What serve/ needs to know travels with the variant (labels, max length, recipe)."""
    info = {k: entry[k] for k in ("name", "kind", "description", "recipe", "check", "metrics")}
    info.update(labels=ctx.splits.label_names, max_length=ctx.max_length, model_file="model.onnx")
    (target / VARIANT_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _publish(staging: Path, out: Path) -> None:
    """Replace the output directory only once every variant and the manifest are complete."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _print_summary(manifest: dict) -> None:
    print(f"{'variant':14} {'status':7} {'test acc':>8} {'MB':>6}")
    for v in manifest["variants"]:
        acc = v.get("metrics", {}).get("test", {}).get("accuracy", float("nan"))
        print(f"{v['name']:14} {v['status']:7} {acc:8.4f} {v.get('bytes', 0) / 1e6:6.1f}")


# ---- the recipes ---------------------------------------------------------------------------

from export import recipes as _recipes  # noqa: E402  (kept beside the story they implement)

BUILDERS: dict[str, Callable[[Context, Path], dict]] = {
    "onnx-fp32": _recipes.onnx_fp32,
    "onnx-opt": _recipes.onnx_opt,
    "onnx-fp16": _recipes.onnx_fp16,
    "int8-dynamic": _recipes.int8_dynamic,
    "int8-static": _recipes.int8_static,
    "pruned-fp32": _recipes.pruned_fp32,
    "pruned-int8": _recipes.pruned_int8,
    "pruned-l3-fp32": _recipes.pruned_l3_fp32,
    "pruned-l3-int8": _recipes.pruned_l3_int8,
}


if __name__ == "__main__":
    run_cli(main)
