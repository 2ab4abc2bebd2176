"""Recovering a pruned student: logit distillation from the fine-tuned teacher with Trainer.

The loss is ``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) ||
softmax(student/T))`` (Hinton et al. 2015), on the training split.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from export.evaluate import batched_torch_logits


def distil(
    teacher,
    student,
    tokenizer,
    texts: list[str],
    labels: list[int],
    max_length: int,
    workdir: Path,
    *,
    epochs: float,
    max_steps: int,
    learning_rate: float,
    temperature: float,
    alpha: float,
    seed: int,
) -> dict:
    """Train ``student`` in place towards ``teacher`` on ``texts`` (with integer ``labels``).

    Returns the run's figures (steps, seconds, final loss and the settings) for the manifest.
    """
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    # Teacher logits once per sentence (no dropout in eval mode, so every epoch would repeat them).
    teacher_logits = batched_torch_logits(teacher, tokenizer, texts, max_length)
    ds = Dataset.from_dict({"text": texts, "labels": labels, "teacher_logits": teacher_logits.tolist()})
    ds = ds.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
        desc="tokenize",
    )

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            soft = inputs.pop("teacher_logits")
            outputs = model(**inputs)
            t = temperature
            kd = F.kl_div(F.log_softmax(outputs.logits / t, -1), F.softmax(soft / t, -1), reduction="batchmean") * t * t
            loss = alpha * outputs.loss + (1 - alpha) * kd
            return (loss, outputs) if return_outputs else loss

    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(workdir),
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=32,
        weight_decay=0.01,
        warmup_ratio=0.06,
        lr_scheduler_type="linear",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        report_to=[],
        group_by_length=True,
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        seed=seed,
    )
    student.train()
    started = time.perf_counter()
    result = DistillTrainer(
        model=student, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer)
    ).train()
    shutil.rmtree(workdir, ignore_errors=True)
    student.eval()
    return {
        "steps": result.global_step,
        "seconds": round(time.perf_counter() - started, 1),
        "loss": round(result.training_loss, 5),
        "temperature": temperature,
        "alpha": alpha,
        "learning_rate": learning_rate,
        "examples": len(texts),
    }
