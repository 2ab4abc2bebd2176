"""How each variant is built.  One function per recipe, each writing one variant directory.

They lean on Optimum for everything ONNX: ``main_export`` / ``onnx_export_from_model``,
``ORTOptimizer`` and ``ORTQuantizer``.  Each returns the recipe details for the manifest.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import numpy as np

from export import prune
from serve.classifier import MODEL_FILE

AUX_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def onnx_fp32(ctx, target: Path) -> dict:
    from optimum.exporters.onnx import main_export

    # Our own check (export.numeric_check) replaces Optimum's, on real validation sentences.
    main_export(str(ctx.model_dir), output=target, task="text-classification", do_validation=False)
    return {"tool": "optimum.exporters.onnx.main_export", "task": "text-classification",
            "opset": _opset(target / MODEL_FILE), "dynamic_axes": ["batch_size", "sequence_length"]}


def _opt_config(level: int, gpu: bool):
    from optimum.onnxruntime.configuration import OptimizationConfig

    return OptimizationConfig(optimization_level=level, optimize_for_gpu=gpu, fp16=gpu and level >= 3,
                              enable_gelu_approximation=False)


def _optimize(source: Path, target: Path, level: int, gpu: bool = False) -> dict:
    from optimum.onnxruntime import ORTOptimizer

    optimizer = ORTOptimizer.from_pretrained(source, file_names=[MODEL_FILE])
    optimizer.optimize(optimization_config=_opt_config(level, gpu), save_dir=target)
    _adopt(target, "model_optimized.onnx", source)
    _infer_shapes(target / MODEL_FILE)
    return {"tool": "optimum.onnxruntime.ORTOptimizer", "optimization_level": level, "optimize_for_gpu": gpu,
            "fp16": gpu and level >= 3, "fused_operators": _op_counts(target / MODEL_FILE)}


def _infer_shapes(path: Path) -> None:
    """Record tensor types through the fused (com.microsoft) nodes.

    ONNX's own shape inference stops at contrib ops such as Attention, and ORTQuantizer then
    cannot type the tensors after them ("Unable to find data type for weight_name").
    onnxruntime's symbolic shape inference knows those ops.
    """
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = SymbolicShapeInference.infer_shapes(onnx.load(str(path)), auto_merge=True)
    onnx.save(model, str(path))


def onnx_opt(ctx, target: Path) -> dict:
    return _optimize(ctx.staging / "onnx-fp32", target, level=2)


def onnx_fp16(ctx, target: Path) -> dict:
    return _optimize(ctx.staging / "onnx-fp32", target, level=4, gpu=True)


def _quantize(ctx, source: Path, target: Path, is_static: bool, calibration_texts: list[str] | None = None) -> dict:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    quantizer = ORTQuantizer.from_pretrained(source, file_name=MODEL_FILE)
    extra = {}
    if is_static:
        # Static ranges are fixed at calibration: only MatMuls with a weight are quantized,
        # and the FFN down-projection stays fp32 (its post-GELU input has outliers ~100x the
        # median, which a fixed int8 range cannot hold without breaking the model).
        extra = {"operators_to_quantize": ["MatMul"], "nodes_to_exclude": _static_exclusions(source / MODEL_FILE)}
    qconfig = getattr(AutoQuantizationConfig, ctx.isa)(is_static=is_static, per_channel=ctx.config.per_channel, **extra)
    details: dict = {"tool": "optimum.onnxruntime.ORTQuantizer", "isa": ctx.isa, "is_static": is_static,
                     "per_channel": ctx.config.per_channel, "format": qconfig.format.name,
                     "weights": qconfig.weights_dtype.name, "activations": qconfig.activations_dtype.name,
                     "operators": list(qconfig.operators_to_quantize)}
    if is_static:
        details["excluded_nodes"] = len(extra["nodes_to_exclude"])
    ranges = None
    if is_static:
        ranges, calib = _calibrate(ctx, quantizer, qconfig, calibration_texts or [])
        details["calibration"] = calib
    quantizer.quantize(quantization_config=qconfig, save_dir=target, calibration_tensors_range=ranges)
    _adopt(target, "model_quantized.onnx", source)
    return details


def _static_exclusions(path: Path) -> list[str]:
    """MatMuls that stay fp32 under static int8: activation x activation, and FFN down-projections."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and (
        not any(i in weights for i in n.input) or ("/output/dense/" in n.name and "attention" not in n.name))]


def _calibrate(ctx, quantizer, qconfig, texts: list[str]):
    """Activation ranges from real training sentences, one at a time (no padding to skew them)."""
    from datasets import Dataset
    from optimum.onnxruntime.configuration import AutoCalibrationConfig
    from transformers import AutoTokenizer

    if not texts:
        raise ValueError("static quantization needs calibration sentences; none were given")
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    method = ctx.config.calibration
    pad_to = None
    if method != "minmax":
        # Histogram calibrators stack every sample's activations, so all need one shape:
        # pad to the 95th-percentile length (longer texts are cut), rounded up to 8.
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=ctx.max_length)["input_ids"]]
        pad_to = min(ctx.max_length, int(-(-np.percentile(lengths, 95) // 8) * 8))
    encoded = tokenizer(texts, truncation=True, max_length=pad_to or ctx.max_length,
                        padding="max_length" if pad_to else False)
    dataset = Dataset.from_dict(dict(encoded))
    calibration = {"minmax": lambda: AutoCalibrationConfig.minmax(dataset),
                   "percentile": lambda: AutoCalibrationConfig.percentiles(dataset, percentile=99.999),
                   "entropy": lambda: AutoCalibrationConfig.entropy(dataset)}[method]()
    started = time.perf_counter()
    augmented = ctx.staging / "augmented_model.onnx"
    ranges = quantizer.fit(dataset=dataset, calibration_config=calibration, batch_size=1,
                           onnx_augmented_model_name=augmented, operators_to_quantize=qconfig.operators_to_quantize)
    augmented.unlink(missing_ok=True)
    return ranges, {"method": method, "samples": len(texts), "padded_to": pad_to, "seconds": round(time.perf_counter() - started, 1),
                    "source": "training split"}


def int8_dynamic(ctx, target: Path) -> dict:
    return _quantize(ctx, ctx.staging / "onnx-opt", target, is_static=False)


def int8_static(ctx, target: Path) -> dict:
    rng = np.random.default_rng(ctx.config.calibration_samples)
    train = ctx.splits.train["text"].tolist()
    picks = rng.choice(len(train), size=min(ctx.config.calibration_samples, len(train)), replace=False)
    # From the plain export: the fused Attention op would keep its projections in fp32.
    return _quantize(ctx, ctx.staging / "onnx-fp32", target, is_static=True, calibration_texts=[train[i] for i in picks])


def pruned_fp32(ctx, target: Path) -> dict:
    return _pruned(ctx, target, "pruned-fp32", keep_layers=None)


def pruned_l3_fp32(ctx, target: Path) -> dict:
    return _pruned(ctx, target, "pruned-l3-fp32", keep_layers=ctx.config.prune_keep_layers)


def _pruned(ctx, target: Path, name: str, keep_layers: int | None) -> dict:
    """Rank, remove, distil, export.  The pruned PyTorch weights go to torch/<name>/."""
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from export.export import _torch_logits  # the same reference path as the unpruned model

    config = ctx.config
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(ctx.model_dir).eval()
    before = {"encoder_macs_per_token": prune.encoder_macs_per_token(teacher), "parameters": _params(teacher),
              "encoder_parameters": _params(teacher.bert.encoder)}

    started = time.perf_counter()
    batches = list(_labelled_batches(ctx, tokenizer, config.importance_samples))
    scout = copy.deepcopy(teacher)
    layers = list(range(len(teacher.bert.encoder.layer)))
    if keep_layers and keep_layers < len(layers):
        layers = prune.choose_layers(scout, batches[: max(1, len(batches) // 2)], keep_layers)
        prune.apply_layers(scout, layers)
    head_score, ffn_score = prune.importance(scout, batches)
    plan = prune.plan(scout, head_score, ffn_score, target=config.prune_target, layers=layers)
    student = prune.apply(copy.deepcopy(teacher), plan)
    ranking_seconds = time.perf_counter() - started
    after = {"encoder_macs_per_token": prune.encoder_macs_per_token(student), "parameters": _params(student),
             "encoder_parameters": _params(student.bert.encoder)}
    before_kd = _torch_logits(student.eval(), ctx.splits, config, ctx.max_length)["validation_metrics"]
    print(f"[{name}] kept layers {layers}, removed {1 - after['encoder_macs_per_token'] / before['encoder_macs_per_token']:.1%} "
          f"of encoder MACs/token; validation accuracy before distillation {before_kd['accuracy']:.4f}", flush=True)

    distill = _distill(ctx, teacher, student, tokenizer)
    ctx.reference[name] = _torch_logits(student.eval(), ctx.splits, config, ctx.max_length)
    prune.save_pruned(student, plan, ctx.staging / "torch" / name, teacher.config.to_dict())
    onnx_export_from_model(student, output=target, task="text-classification", do_validation=False)
    for aux in AUX_FILES:
        if (ctx.model_dir / aux).is_file() and aux != "config.json":
            shutil.copy2(ctx.model_dir / aux, target / aux)

    ctx.extra[f"pruning:{name}"] = {
        "method": "greedy layer dropping by training loss, then first-order Taylor importance of heads "
                  "(Michel et al. 2019) and FFN neurons, the least important share of each removed, "
                  "then logit distillation from the unpruned model",
        "target_fraction_heads_and_ffn": config.prune_target,
        "kept_layers": layers,
        "before": before, "after": after,
        "flops_reduction": round(1 - after["encoder_macs_per_token"] / before["encoder_macs_per_token"], 4),
        "parameter_reduction": round(1 - after["parameters"] / before["parameters"], 4),
        "encoder_parameter_reduction": round(1 - after["encoder_parameters"] / before["encoder_parameters"], 4),
        "heads_per_layer": [layer.attention.self.num_attention_heads for layer in student.bert.encoder.layer],
        "ffn_per_layer": [layer.intermediate.dense.out_features for layer in student.bert.encoder.layer],
        "flops_counted_at_seq_len": 128,
        "ranking_seconds": round(ranking_seconds, 1),
        "validation_before_distillation": before_kd,
        "distillation": distill,
        "validation_after_distillation": ctx.reference[name]["validation_metrics"],
    }
    return {"tool": "optimum.exporters.onnx.onnx_export_from_model", "opset": _opset(target / MODEL_FILE),
            "pytorch_weights": f"torch/{name}/"}


def pruned_int8(ctx, target: Path) -> dict:
    return _fused_int8(ctx, ctx.staging / "pruned-fp32", target)


def pruned_l3_int8(ctx, target: Path) -> dict:
    return _fused_int8(ctx, ctx.staging / "pruned-l3-fp32", target)


def _fused_int8(ctx, source: Path, target: Path) -> dict:
    fused = target.with_name(target.name + "-opt")
    opt = _optimize(source, fused, level=2)
    details = _quantize(ctx, fused, target, is_static=False)
    shutil.rmtree(fused, ignore_errors=True)
    return {**details, "optimized_first": opt}


def _labelled_batches(ctx, tokenizer, n: int, batch_size: int = 32):
    import torch

    train = ctx.splits.train.iloc[:n]
    label_ids = [ctx.splits.label_names.index(x) for x in train["label"]]
    texts = train["text"].tolist()
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=ctx.max_length,
                          padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor(label_ids[start:start + batch_size])
        yield batch


def _distill(ctx, teacher, student, tokenizer) -> dict:
    """Recover accuracy with Trainer: hard-label CE plus KL to the teacher's softened logits."""
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from export.export import batched_torch_logits

    config = ctx.config
    texts = ctx.splits.train["text"].tolist()
    labels = [ctx.splits.label_names.index(x) for x in ctx.splits.train["label"]]
    # Teacher logits once per sentence (no dropout in eval mode, so every epoch would repeat them).
    teacher_logits = batched_torch_logits(teacher, tokenizer, texts, ctx.max_length)
    ds = Dataset.from_dict({"text": texts, "labels": labels, "teacher_logits": teacher_logits.tolist()})
    ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=ctx.max_length), batched=True,
                remove_columns=["text"], desc="tokenize")

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            soft = inputs.pop("teacher_logits")
            outputs = model(**inputs)
            t = config.distill_temperature
            kd = F.kl_div(F.log_softmax(outputs.logits / t, -1), F.softmax(soft / t, -1), reduction="batchmean") * t * t
            loss = config.distill_alpha * outputs.loss + (1 - config.distill_alpha) * kd
            return (loss, outputs) if return_outputs else loss

    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(ctx.staging / "distill-checkpoints"), learning_rate=config.distill_learning_rate,
        num_train_epochs=config.distill_epochs, max_steps=config.distill_max_steps, per_device_train_batch_size=32,
        weight_decay=0.01, warmup_ratio=0.06, lr_scheduler_type="linear", save_strategy="no", eval_strategy="no",
        logging_steps=50, report_to=[], group_by_length=True, remove_unused_columns=False,
        dataloader_pin_memory=cuda, bf16=cuda and torch.cuda.is_bf16_supported(), seed=42)
    student.train()
    started = time.perf_counter()
    result = DistillTrainer(model=student, args=args, train_dataset=ds,
                            data_collator=DataCollatorWithPadding(tokenizer)).train()
    shutil.rmtree(ctx.staging / "distill-checkpoints", ignore_errors=True)
    student.eval()
    return {"steps": result.global_step, "seconds": round(time.perf_counter() - started, 1),
            "loss": round(result.training_loss, 5), "temperature": config.distill_temperature,
            "alpha": config.distill_alpha, "learning_rate": config.distill_learning_rate, "examples": len(texts)}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _adopt(target: Path, produced: str, source: Path) -> None:
    """Name the produced graph model.onnx and carry the tokenizer and config files along."""
    (target / produced).replace(target / MODEL_FILE)
    for name in AUX_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:8])
