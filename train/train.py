"""train/: fine-tune a pretrained encoder with a classification head.

Reads top to bottom: load and split the data, tokenize, build the model (full fine-tuning
or LoRA), train with transformers' Trainer (AdamW, linear warm-up, weight decay, early
stopping on validation accuracy; the model kept is the best evaluation, one at the final
step included), evaluate on the test split (per class too), and write the model directory
plus ``train_manifest.json``.  Any encoder family in serve/families.py is accepted (an
unsupported one is refused before the data is read); LoRA targets the family's own linear
layers and saves its classification head, and the adapters are merged into the base
weights, so export/ always sees a plain ``*ForSequenceClassification``.

    python -m train --help
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from serve import families
from serve.contract import TRAIN_MANIFEST, TrainManifest, UserError, run_cli, write
from train.cliargs import ConfigParser, add_config_args, config_from_args
from train.data import DEFAULT_DATA, DEFAULT_MODEL, DataSpec, Splits, load_splits, resolve_model
from train.scoring import per_class_f1_text, score


@dataclass(frozen=True)
class TrainConfig:
    model: str = field(
        default=DEFAULT_MODEL, metadata={"help": "base encoder: the embedded default, a local directory or a hub id"}
    )
    data: str = field(
        default=DEFAULT_DATA, metadata={"help": "the embedded default, a CSV/TSV/JSONL file, or a hub dataset name"}
    )
    text_column: str = field(default="text", metadata={"help": "text column of a data file"})
    label_column: str = field(default="label", metadata={"help": "label column of a data file"})
    group_column: str | None = field(
        default=None, metadata={"help": "keep each value of this column in one split (default data: movie_name)"}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "share of the rows for validation (data without its own validation split)"}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "share of the rows for test (data without its own test split)"}
    )
    output: str = field(default="artifacts/model", metadata={"help": "model directory to write"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing model in --output"})
    method: Literal["full", "lora"] = field(
        default="full", metadata={"help": "full fine-tuning or LoRA adapters (merged at the end)"}
    )
    seed: int = field(default=42, metadata={"help": "seed for the split, the head initialisation and shuffling"})
    max_length: int = field(
        default=128, metadata={"help": "tokens per text; longer texts are truncated (median snippet: ~25 tokens)"}
    )
    epochs: float = field(
        default=2.0, metadata={"help": "passes over the training split (early stopping may end sooner)"}
    )
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: use --epochs)"})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "use only the first N training rows (for quick runs)"}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "use only the first N validation and test rows (for quick runs)"}
    )
    batch_size: int = field(default=32, metadata={"help": "examples per device step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    learning_rate: float = field(
        default=1e-4, metadata={"help": "peak AdamW learning rate; small encoders like a higher one than BERT-base"}
    )
    lora_learning_rate: float = field(
        default=1e-3, metadata={"help": "peak learning rate with --method lora (adapters need ~10x full FT)"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "fraction of steps of linear warm-up"})
    eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "evaluate on validation every N steps, and at the last step (default: 100, fewer on small "
            "sets so that early stopping gets patience + 2 evaluations)"
        },
    )
    patience: int = field(default=3, metadata={"help": "early stopping: evaluations without improvement"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    eval_batch_size: int = field(default=128, metadata={"help": "examples per evaluation step"})
    tensorboard: bool = field(default=False, metadata={"help": "log to TensorBoard under OUTPUT/../runs"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: all cores)"})

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "grad_accum", "eval_steps", "patience", "lora_r", "eval_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"--max-steps must be -1 or >= 1, got {self.max_steps}")
        if self.epochs <= 0 or self.learning_rate <= 0 or self.lora_learning_rate <= 0:
            raise UserError("--epochs, --learning-rate and --lora-learning-rate must be positive")
        if not 0 <= self.warmup_ratio <= 1 or not 0 <= self.lora_dropout < 1 or self.weight_decay < 0:
            raise UserError("--warmup-ratio must lie in [0, 1], --lora-dropout in [0, 1), --weight-decay >= 0")
        if not (0 < self.validation_fraction < 1 and 0 < self.test_fraction < 1) or (
            self.validation_fraction + self.test_fraction >= 1
        ):
            raise UserError(
                "--validation-fraction and --test-fraction must lie in (0, 1) and sum to less than 1, got "
                f"{self.validation_fraction} and {self.test_fraction}"
            )
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise UserError(f"--{name.replace('_', '-')} must be >= 2, got {getattr(self, name)}")

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(
            source=self.data,
            text_column=self.text_column,
            label_column=self.label_column,
            group_column=self.group_column,
            seed=self.seed,
            validation_fraction=self.validation_fraction,
            test_fraction=self.test_fraction,
        )


def main(argv: list[str] | None = None) -> TrainManifest:
    parser = ConfigParser(prog="python -m train", description=__doc__.split("\n\n")[0])
    add_config_args(parser, TrainConfig)
    config = config_from_args(TrainConfig, parser.parse_args(argv))
    return train(config)


def train(config: TrainConfig) -> TrainManifest:
    """Fine-tune, evaluate and save the model directory; returns the manifest written into it.

    Raises UserError for bad data, model or output before any training starts.
    """
    output = Path(config.output).resolve()
    _check_output(output, config.overwrite)
    model_path = resolve_model(config.model)
    family = _check_family(model_path, config.max_length)
    splits = load_splits(config.data_spec)
    if config.max_train_samples:
        splits.train = splits.train.iloc[: config.max_train_samples]
    if config.max_eval_samples:
        splits.validation = splits.validation.iloc[: config.max_eval_samples]
        splits.test = splits.test.iloc[: config.max_eval_samples]
    print(f"data: {config.data} -> {splits.summary()}; labels {splits.label_names}")

    import torch
    import transformers

    if config.threads:
        torch.set_num_threads(config.threads)
    transformers.set_seed(config.seed)
    tokenizer, model = _load_model(model_path, splits.label_names)
    train_ds, val_ds, test_ds = (
        _tokenize(tokenizer, part, splits.label_names, config.max_length)
        for part in (splits.train, splits.validation, splits.test)
    )
    if config.method == "lora":
        model = _wrap_lora(model, config, family)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"model: {model_path} method={config.method} trainable={trainable:,} / {total:,} parameters")

    staging = Path(tempfile.mkdtemp(prefix=".train-", dir=output.parent if output.parent.exists() else None))
    try:
        eval_steps = eval_interval(config, len(train_ds))
        trainer = _make_trainer(config, model, tokenizer, train_ds, val_ds, staging / "checkpoints", eval_steps)
        started = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - started
        validation, test = (_score(trainer, ds, splits.label_names) for ds in (val_ds, test_ds))
        model = trainer.model
        if config.method == "lora":
            model = model.merge_and_unload()
        model_dir = staging / "model"
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.model_max_length = config.max_length
        tokenizer.save_pretrained(model_dir)
        manifest = _manifest(
            config,
            model_path,
            model.config.model_type,
            splits,
            trainable,
            total,
            result,
            train_seconds,
            validation,
            test,
            trainer.state,
            eval_steps,
        )
        write(model_dir / TRAIN_MANIFEST, manifest)
        (model_dir / "split_groups.json").write_text(json.dumps(splits.groups, indent=1) + "\n")
        _replace_dir(model_dir, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    m = manifest.metrics
    print(
        f"test accuracy={m['test']['accuracy']:.4f} macro_f1={m['test']['macro_f1']:.4f} "
        f"(validation {m['validation']['accuracy']:.4f}); F1 per class: {per_class_f1_text(m['test'])}; "
        f"kept the model of step {manifest.train['best_step']} of {manifest.train['steps']}; "
        f"trained in {train_seconds / 60:.1f} min -> {output}"
    )
    return manifest


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; expected a directory")
    if output.is_dir() and any(output.iterdir()):
        if not (output / TRAIN_MANIFEST).exists():  # --overwrite never deletes what train/ did not write
            raise UserError(
                f"--output {output} holds other files, not a trained model; choose an empty or new directory"
            )
        if not overwrite:
            raise UserError(
                f"--output {output} already holds a trained model; "
                "pass --overwrite to replace it or choose another --output"
            )
    output.parent.mkdir(parents=True, exist_ok=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` into place; the old directory is removed only once the new one is complete."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    shutil.move(str(new), str(target))
    shutil.rmtree(old, ignore_errors=True)


def _check_family(model_path: str, max_length: int) -> families.Family:
    """The model's encoder family, after checking it is supported and ``max_length`` fits its positions.

    Reads only the config, so an unsupported model is refused before data or weights are loaded.
    """
    from transformers import AutoConfig

    local = Path(model_path) / "config.json"
    if local.is_file():  # an architecture transformers does not even know gets the same one line
        try:
            families.of_config(json.loads(local.read_text()), f"model {model_path}")
        except json.JSONDecodeError as err:
            raise UserError(f"{local} is not valid JSON ({err.msg} at line {err.lineno})") from None
    try:
        config = AutoConfig.from_pretrained(model_path).to_dict()
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model {model_path!r}: {str(err).splitlines()[0]}") from None
    family = families.of_config(config, f"model {model_path}")
    positions = family.position_limit(config)
    if positions and max_length > positions:
        raise UserError(
            f"--max-length {max_length} exceeds the model's {positions} positions; use --max-length <= {positions}"
        )
    return family


def _load_model(model_path: str, label_names: list[str]):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in id2label.items()}
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" warning is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(label_names), id2label=id2label, label2id=label2id
        )
    except (OSError, ValueError, ImportError) as err:  # ImportError: a slow tokenizer needs sentencepiece
        raise UserError(f"cannot load model {model_path!r}: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity_warning()
    if not tokenizer.is_fast:  # serving reads tokenizer.json, which only a fast tokenizer writes
        raise UserError(
            f"model {model_path!r} has no fast tokenizer (tokenizer.json); convert it once with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(...) where sentencepiece is installed"
        )
    return tokenizer, model


def _tokenize(tokenizer, frame, label_names: list[str], max_length: int):
    from datasets import Dataset

    label_ids = {name: i for i, name in enumerate(label_names)}
    ds = Dataset.from_dict({"text": frame["text"].tolist(), "labels": [label_ids[x] for x in frame["label"]]})
    # No padding here: DataCollatorWithPadding pads each batch to its own longest text.
    return ds.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
        desc="tokenize",
    )


def _wrap_lora(model, config: TrainConfig, family: families.Family):
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # every linear layer of the encoder: attention projections and the FFN
        target_modules=list(family.lora_targets),
        # the classification head is new: trained in full and saved with the adapters
        modules_to_save=list(family.head_modules),
    )
    return get_peft_model(model, lora)


def compute_metrics(eval_pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred
    preds = logits.argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro")),
    }


def eval_interval(config: TrainConfig, train_rows: int) -> int:
    """Steps between evaluations: ``--eval-steps``, or 100 cut down so a short run still gets patience + 2."""
    if config.eval_steps is not None:
        return config.eval_steps
    steps_per_epoch = max(1, math.ceil(train_rows / config.batch_size) // config.grad_accum)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * steps_per_epoch)
    # On a small set 100 steps can exceed the whole run: no evaluation, inert early stopping.
    return max(1, min(100, total // (config.patience + 2)))


def _evaluate_last_step(eval_steps: int):
    """A Trainer callback that also evaluates (and checkpoints) the final step, so its model can be the one kept."""
    from transformers import TrainerCallback

    class EvaluateLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps and state.global_step % eval_steps:
                control.should_evaluate = control.should_save = True
            return control

    return EvaluateLastStep()


def _score(trainer, dataset, label_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class scores and confusion matrix of the trained model on ``dataset``."""
    out = trainer.predict(dataset)
    return score(out.predictions, [label_names[i] for i in out.label_ids], label_names)


def _make_trainer(config: TrainConfig, model, tokenizer, train_ds, val_ds, checkpoints: Path, eval_steps: int):
    import torch
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(checkpoints),
        learning_rate=config.lora_learning_rate if config.method == "lora" else config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        group_by_length=True,  # batches of similar length: less padding, faster on CPU
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=cuda and not torch.cuda.is_bf16_supported(),
        logging_steps=max(1, eval_steps // 4),
        report_to=["tensorboard"] if config.tensorboard else [],
        logging_dir=_tensorboard_dir(config) if config.tensorboard else None,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        disable_tqdm=False,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[
            EarlyStoppingCallback(early_stopping_patience=config.patience),
            _evaluate_last_step(eval_steps),
        ],
    )


def _tensorboard_dir(config: TrainConfig) -> str:
    """One directory per run (OUTPUT/../runs/<output name>-<UTC time>), so runs never mix their curves."""
    path = (
        Path(config.output).parent
        / "runs"
        / f"{Path(config.output).name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    )
    print(f"tensorboard: {path}")
    return str(path)


def _manifest(
    config,
    model_path,
    model_type,
    splits: Splits,
    trainable,
    total,
    result,
    seconds,
    validation,
    test,
    state,
    eval_steps,
) -> TrainManifest:
    import importlib.metadata as md

    versions = {pkg: md.version(pkg) for pkg in ("torch", "transformers", "peft", "datasets", "accelerate")}
    evaluations = [
        {"step": e["step"], "accuracy": round(e["eval_accuracy"], 5), "macro_f1": round(e["eval_macro_f1"], 5)}
        for e in state.log_history
        if "eval_accuracy" in e
    ]
    return TrainManifest(
        base_model=config.model,
        base_model_path=model_path,
        model_type=model_type,
        method=config.method,
        data=splits.describe(),
        max_length=config.max_length,
        seed=config.seed,
        hyperparameters=asdict(config),
        parameters={"total": total, "trainable": trainable},
        metrics={"validation": validation, "test": test},
        train={
            "seconds": round(seconds, 1),
            "steps": result.global_step,
            "loss": round(result.training_loss, 5),
            "threads": os.cpu_count() if config.threads is None else config.threads,
            "eval_steps": eval_steps,
            # The kept model: the best validation accuracy of all evaluations (the earliest on a tie).
            "best_step": state.best_global_step,
            "evaluations": evaluations,
        },
        versions={"python": platform.python_version(), **versions},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


if __name__ == "__main__":
    run_cli(main)
