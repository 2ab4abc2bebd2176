"""export/: turn a fine-tuned model into smaller, faster ONNX variants, each checked and scored.

Reads top to bottom: check the model directory, rebuild its data splits from the training
manifest, compute the PyTorch reference logits, then build each recipe in order
(export/recipes.py):

  onnx-fp32     Optimum export (dynamic batch and sequence axes)
  onnx-opt      ORTOptimizer graph fusions (O2 on CPU; onnx-fp16 adds O4/fp16 on CUDA)
  int8-dynamic  ORTQuantizer dynamic int8, configuration chosen from the CPU's instruction set
  int8-static   ORTQuantizer static int8, calibrated on training sentences
  pruned-fp32   heads and FFN neurons removed, recovered by distillation (prune.py), exported
  pruned-int8   the pruned model, O2 fused, dynamic int8
  pruned-int8-static  the pruned model, static int8 (batch-invariant, unlike dynamic int8)
  pruned-l4-*   a shallow student: 4 layers kept, pruned, intermediate-layer distillation on a
                transfer set (distill.py, transfer.py), then dynamic or static int8
  pruned-l3-*   the same with 3 layers (built only when named: see recipes.py)

Every variant is compared with the PyTorch model it came from on the validation split
(label agreement, max |logit difference|, a tolerance per kind, export/evaluate.py) and
scored on validation and test; one that passes is measured for batch invariance (the same
validation texts alone and in mixed batches: does a text's answer depend on its neighbours?).
Its record (``variant.json``) travels with it; the manifest lists every variant with its
status and file hashes.  A variant that fails its check is marked failed, one whose recipe
does not apply to the model's encoder family (serve/families.py) skipped, each with the
reason; perf/ and serve/ only ever use variants whose status is "ok".

    python -m export --help
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from export import machine
from export.evaluate import TOLERANCES, Reference, batch_invariance, numeric_check, score, torch_reference
from export.recipes import RECIPES, Built, Context, NotApplicable, Recipe
from serve import families
from serve.classifier import OnnxClassifier, batched_logits
from serve.contract import (
    TRAIN_MANIFEST,
    VARIANTS_MANIFEST,
    TrainManifest,
    UserError,
    VariantEntry,
    VariantRecord,
    VariantsManifest,
    describe_files,
    read,
    run_cli,
    write,
)
from train.cliargs import ConfigParser, add_config_args, config_from_args
from train.data import DataSpec, Splits, check_rebuilt, load_splits, spec_from_description
from train.scoring import per_class_f1_text

BY_NAME = {r.name: r for r in RECIPES}
INVARIANCE_TEXTS = 256  # validation sentences measured alone and in mixed batches (a few seconds per variant)


@dataclass(frozen=True)
class ExportConfig:
    model: str = field(
        default="artifacts/model",
        metadata={"help": "fine-tuned model directory (train/ output or a sequence-classification checkpoint)"},
    )
    output: str = field(default="artifacts/variants", metadata={"help": "directory for the variants and manifest.json"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing variants in --output"})
    recipes: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "recipes to build (default: all that apply here, except "
            f"{', '.join(r.name for r in RECIPES if not r.default)}): {', '.join(BY_NAME)}"
        },
    )
    data: str | None = field(
        default=None,
        metadata={"help": "data to check and score on (default: the training data named in train_manifest.json)"},
    )
    text_column: str = field(default="text", metadata={"help": "text column of a --data file"})
    label_column: str = field(default="label", metadata={"help": "label column of a --data file"})
    seed: int = field(default=42, metadata={"help": "seed of the calibration sample and the distillation runs"})
    isa: Literal["auto", "avx512_vnni", "avx512", "avx2", "arm64"] = field(
        default="auto", metadata={"help": "instruction set the int8 configuration targets"}
    )
    per_channel: bool = field(
        default=True, metadata={"help": "per-channel int8 weight scales (more accurate, same speed on VNNI)"}
    )
    calibration: Literal["minmax", "percentile", "entropy"] = field(
        default="minmax",
        metadata={"help": "static int8 calibration method (percentile clips MiniLM's outlier channels: avoid)"},
    )
    calibration_samples: int = field(default=128, metadata={"help": "training sentences used to calibrate static int8"})
    prune_target: float = field(
        default=0.45,
        metadata={"help": "share of attention heads and of FFN neurons to remove (= share of encoder FLOPs/token)"},
    )
    importance_samples: int = field(
        default=1024, metadata={"help": "training sentences used to rank heads and neurons"}
    )
    distill_epochs: float = field(default=2.0, metadata={"help": "epochs of distillation after pruning"})
    distill_max_steps: int = field(
        default=-1,
        metadata={
            "help": "cap on the distillation steps of every pruned recipe (-1: --distill-epochs / --student-epochs)"
        },
    )
    student_epochs: float = field(
        default=1.0,
        metadata={"help": "epochs of intermediate-layer distillation on the transfer set (pruned-l3/l4 students)"},
    )
    probe_samples: int = field(
        default=256, metadata={"help": "validation sentences that measure the distillation loss before and after"}
    )
    distill_learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate of the distillation"})
    distill_temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the KD loss"})
    distill_alpha: float = field(
        default=0.5, metadata={"help": "weight of the hard-label loss (1 - alpha on the KD loss)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "use only N training rows (quick runs)"})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "check and score on only N validation/test rows (quick runs)"}
    )
    batch_size: int = field(default=64, metadata={"help": "sentences per batch when checking and scoring"})
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "where ONNX Runtime runs the checks"}
    )

    def __post_init__(self) -> None:
        unknown = [r for r in self.recipes if r not in BY_NAME]
        if unknown:
            raise UserError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
        if not 0 < self.prune_target < 0.95:
            raise UserError(f"--prune-target must lie in (0, 0.95), got {self.prune_target}")
        for name in ("calibration_samples", "importance_samples", "probe_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.distill_alpha <= 1:  # NaN fails this too
            raise UserError(f"--distill-alpha must lie in [0, 1], got {self.distill_alpha}")
        for name in ("distill_temperature", "distill_learning_rate", "distill_epochs", "student_epochs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def main(argv: list[str] | None = None) -> VariantsManifest:
    parser = ConfigParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    add_config_args(parser, ExportConfig)
    return export(config_from_args(ExportConfig, parser.parse_args(argv)))


def export(config: ExportConfig) -> VariantsManifest:
    """Build, check and score every requested variant; returns the manifest written.

    Raises UserError for a missing or corrupt model directory, data that differs from the
    training data, an output that holds something else, or a recipe this machine cannot build.
    """
    model_dir = Path(config.model)
    model_config, train_manifest = _check_model_dir(model_dir)
    family = families.family(model_config["model_type"])
    out = Path(config.output).resolve()
    _check_output(out, config.overwrite)
    host = machine.describe()
    cuda = host["cuda"] and config.device != "cpu"
    isa = machine.resolve_isa(config.isa, host)
    recipes = select_recipes(config.recipes, cuda)
    splits = _load_data(config, train_manifest)
    splits.label_names = _model_labels(model_config, splits.label_names)
    # without a training manifest: 128 tokens, or fewer if the model has fewer positions
    max_length = train_manifest.max_length if train_manifest else min(128, family.position_limit(model_config) or 128)
    print(f"export: {model_dir} -> {out}; recipes: {', '.join(r.name for r in recipes)}; int8 ISA: {isa}")

    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    ctx = Context(config, model_dir, staging, splits, max_length, isa, cuda, family)
    try:
        tokenizer, model = _load_torch(model_dir)
        build = Build(
            ctx,
            torch_reference(model, tokenizer, splits, max_length, config.batch_size),
            _pad_id(tokenizer, model.config.pad_token_id, family),
        )
        for recipe in recipes:
            build.run(recipe)
        manifest = VariantsManifest(
            model={
                "path": str(model_dir.resolve()),
                "model_type": model_config["model_type"],
                "files": describe_files(model_dir, ["model.safetensors", "config.json"]),
                "train": train_manifest
                and {"method": train_manifest.method, "metrics": train_manifest.metrics, "seed": train_manifest.seed},
            },
            data=splits.describe(),
            config=asdict(config),
            machine=host,
            isa=isa,
            pytorch={"validation": build.unpruned.validation_metrics, "test": build.unpruned.test_metrics},
            variants=[build.entries[r.name] for r in recipes],
            seconds=round(time.perf_counter() - started, 1),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        write(staging / VARIANTS_MANIFEST, manifest)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_summary(build.records, manifest)
    return read(out, VariantsManifest)


@dataclass
class Build:
    """The variants built so far: their manifest entries, records, and the PyTorch models to check against."""

    ctx: Context
    unpruned: Reference  # the fine-tuned model's logits
    pad_token_id: int
    entries: dict[str, VariantEntry] = field(default_factory=dict)
    records: dict[str, VariantRecord] = field(default_factory=dict)
    built: dict[str, Built] = field(default_factory=dict)

    def run(self, recipe: Recipe) -> None:
        """Build ``recipe`` from its source, check it against its PyTorch model, score it, record it."""
        ctx, target = self.ctx, self.ctx.staging / recipe.name
        entry = VariantEntry(recipe.name, "failed", recipe.name)
        self.entries[recipe.name] = entry
        print(f"[{recipe.name}] {recipe.description}", flush=True)
        if recipe.source and self.entries[recipe.source].status != "ok":
            source = self.entries[recipe.source]
            entry.status = "skipped" if source.status == "skipped" else "failed"
            entry.error = f"source variant {recipe.source} {source.status}" + (
                f": {source.error}" if source.status == "skipped" else ""
            )
            return
        started = time.perf_counter()
        try:
            built = recipe.build(ctx, ctx.staging / recipe.source if recipe.source else None, target, **recipe.params)
        except NotApplicable as why:  # recorded, and the other recipes still run
            print(f"[{recipe.name}] skipped: {why}", flush=True)
            entry.status, entry.error = "skipped", str(why)
            shutil.rmtree(target, ignore_errors=True)
            return
        except UserError:
            raise
        except Exception as err:  # a failed build is recorded, and the other recipes still run
            print(f"[{recipe.name}] FAILED: {type(err).__name__}: {err}", file=sys.stderr)
            entry.error = f"{type(err).__name__}: {err}"
            return
        self.built[recipe.name] = built
        seconds = round(time.perf_counter() - started, 1)
        labels = ctx.splits.label_names
        try:
            clf = OnnxClassifier(
                target, labels, ctx.max_length, self.pad_token_id, device="cuda" if ctx.cuda else "cpu"
            )
        except Exception as err:  # ONNX Runtime refuses the graph: this variant failed, the others go on
            entry.error = f"ONNX Runtime cannot load it: {type(err).__name__}: {err}"
            return
        validation, test = ctx.splits.validation, ctx.splits.test
        val_logits = batched_logits(clf, validation["text"].tolist(), ctx.config.batch_size)
        test_logits = batched_logits(clf, test["text"].tolist(), ctx.config.batch_size)
        check = numeric_check(val_logits, self._lineage(recipe, "reference").validation, TOLERANCES[recipe.precision])
        record = VariantRecord(
            name=recipe.name,
            precision=recipe.precision,
            source=recipe.source,
            description=recipe.description,
            labels=labels,
            max_length=ctx.max_length,
            inputs=clf.input_names,
            pad_token_id=self.pad_token_id,
            recipe=built.details,
            check=check,
            provider=clf.provider,
            build_seconds=seconds,
            pruning=self._lineage(recipe, "pruning"),
            metrics={
                "validation": score(val_logits, validation["label"].tolist(), labels),
                "test": score(test_logits, test["label"].tolist(), labels),
            },
        )
        if check["passed"]:
            record.batch_invariance = self._invariance(target, record)
        write(target / VariantRecord.FILE, record)
        self.records[recipe.name] = record
        entry.files = describe_files(target)
        entry.status = "ok" if check["passed"] else "failed"
        entry.error = None if check["passed"] else f"numerical check failed: {check}"
        m = record.metrics["test"]
        print(
            f"[{recipe.name}] {entry.status}: test acc {m['accuracy']:.4f} f1 {m['macro_f1']:.4f}, "
            f"agreement {check['label_agreement']:.4f}, max|dlogit| {check['max_abs_logit_diff']:.2e}, "
            f"model.onnx {entry.files['model.onnx']['bytes'] / 1e6:.1f} MB, built in {seconds} s",
            flush=True,
        )

    def _invariance(self, target: Path, record: VariantRecord) -> dict:
        """Batch invariance of the variant as served (its own classifier, one thread), printed in one line."""
        ctx = self.ctx
        started = time.perf_counter()
        clf = OnnxClassifier.load(target, record, threads=1, device="cuda" if ctx.cuda else "cpu")
        result = batch_invariance(clf, ctx.splits.validation["text"].tolist(), ctx.config.seed, INVARIANCE_TEXTS)
        print(
            f"[{record.name}] batch invariance: {result['texts']} texts alone and in {result['batches']} mixed "
            f"batches, max|dprob| {result['max_abs_prob_diff']:.2e}, {result['label_flips']} label flips: "
            f"{'invariant' if result['invariant'] else 'NOT invariant'} (tolerance {result['tolerance']:g}), "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        return result

    def _lineage(self, recipe: Recipe, what: str):
        """The nearest ``reference`` or ``pruning`` along the recipe's sources (the fine-tuned model's at the root)."""
        name: str | None = recipe.name
        while name is not None:
            value = getattr(self.built.get(name), what, None)
            if value is not None:
                return value
            name = BY_NAME[name].source
        return self.unpruned if what == "reference" else None


def _check_model_dir(model_dir: Path) -> tuple[dict, TrainManifest | None]:
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist; run `python -m train` first or pass --model")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model_dir} has no config.json; expected a Hugging Face checkpoint directory")
    try:
        model_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(
            f"{config_file} is not valid JSON ({err.msg} at line {err.lineno}); the model directory is corrupt"
        ) from None
    families.of_config(model_config, str(config_file))  # an unsupported family or task: one line, before any work
    if "id2label" not in model_config:
        raise UserError(f"{config_file} has no id2label; expected a sequence-classification checkpoint")
    if not any((model_dir / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"{model_dir} has no model.safetensors or pytorch_model.bin; the weights are missing")
    if not (model_dir / TRAIN_MANIFEST).is_file():
        return model_config, None
    return model_config, read(model_dir, TrainManifest)


def _pad_id(tokenizer, model_pad: int | None, family: families.Family) -> int:
    """The id that pads a batch; for families that number positions after it, it must be the model's own."""
    pad = tokenizer.pad_token_id or 0
    if family.position_offset and model_pad is not None and model_pad != pad:
        raise UserError(
            f"the tokenizer pads with id {pad} but the model's config says pad_token_id {model_pad}; "
            f"{family.name} numbers positions after the pad id, so they must agree: fix the tokenizer or config"
        )
    return pad


def _model_labels(model_config: dict, data_labels: list[str]) -> list[str]:
    """The model's label order (id2label), after checking the data has the same labels."""
    labels = [model_config["id2label"][str(i)] for i in range(len(model_config["id2label"]))]
    if sorted(labels) != sorted(data_labels):
        raise UserError(
            f"the model's labels {labels} differ from the data's {data_labels}; pass the data it was trained on"
        )
    return labels


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; expected a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / VARIANTS_MANIFEST).is_file():  # --overwrite never deletes what export/ did not write
            raise UserError(f"--output {out} holds other files, not variants; choose an empty or new directory")
        if not overwrite:
            raise UserError(
                f"--output {out} already holds variants; pass --overwrite to replace them or choose another --output"
            )
    out.parent.mkdir(parents=True, exist_ok=True)


def select_recipes(names: tuple[str, ...], cuda: bool) -> list[Recipe]:
    """The recipes to build, in build order: ``names`` (or every default one that runs here) and their sources.

    Raises:
        UserError: a named recipe needs CUDA and there is none.
    """
    chosen = [BY_NAME[n] for n in names] if names else [r for r in RECIPES if r.default and (cuda or not r.needs_cuda)]
    for recipe in chosen:
        if recipe.needs_cuda and not cuda:
            raise UserError(f"recipe {recipe.name} needs a CUDA device and onnxruntime-gpu; none is available here")
    # Pull in sources that were not asked for (int8-dynamic needs onnx-opt, which needs onnx-fp32).
    needed = {r.name for r in chosen}
    for recipe in list(chosen):
        source = recipe.source
        while source and source not in needed:
            needed.add(source)
            source = BY_NAME[source].source
    return [r for r in RECIPES if r.name in needed]


def _load_data(config: ExportConfig, train_manifest: TrainManifest | None) -> Splits:
    if config.data:
        spec = DataSpec(source=config.data, text_column=config.text_column, label_column=config.label_column)
    elif train_manifest:
        spec = spec_from_description(train_manifest.data)
    else:
        raise UserError(
            "the model directory has no train_manifest.json; pass --data to say which data to check and score on"
        )
    splits = load_splits(spec)
    if not config.data and splits.sha256 != train_manifest.data["sha256"]:
        raise UserError(f"data {spec.source} has changed since training (sha256 differs); re-train or pass --data")
    if not config.data:
        check_rebuilt(splits, train_manifest.data)
    if config.max_train_samples:
        splits.train = splits.train.iloc[: config.max_train_samples]
    if config.max_eval_samples:
        splits.validation = splits.validation.iloc[: config.max_eval_samples]
        splits.test = splits.test.iloc[: config.max_eval_samples]
    return splits


def _load_torch(model_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return tokenizer, AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    except (OSError, ValueError, RuntimeError) as err:  # e.g. truncated safetensors, missing tokenizer
        raise UserError(
            f"cannot load the model in {model_dir}: {str(err).splitlines()[0]}; the model directory is corrupt"
        ) from None


def _publish(staging: Path, out: Path) -> None:
    """Replace the output directory only once every variant and the manifest are complete."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _print_summary(records: dict[str, VariantRecord], manifest: VariantsManifest) -> None:
    print(
        f"{'variant':18} {'status':7} {'test acc':>8} {'macro-F1':>8} {'MB':>6} {'max|dprob|':>10} {'flips':>5}  "
        "test F1 per class"
    )
    for v in manifest.variants:
        record = records.get(v.name)
        test = record.metrics["test"] if record else {}
        inv = (record and record.batch_invariance) or {}
        print(
            f"{v.name:18} {v.status:7} {test.get('accuracy', float('nan')):8.4f} "
            f"{test.get('macro_f1', float('nan')):8.4f} {sum(f['bytes'] for f in v.files.values()) / 1e6:6.1f} "
            f"{inv.get('max_abs_prob_diff', float('nan')):10.2e} {inv.get('label_flips', '-'):>5}  "
            f"{per_class_f1_text(test)}"
        )


if __name__ == "__main__":
    run_cli(main)
