"""Recovering a pruned student: distillation from the fine-tuned teacher with Trainer.

The output loss is ``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) ||
softmax(student/T))`` (Hinton et al. 2015).  Texts without a label (``transfer.UNLABELLED``)
contribute the KL term only.

With an :class:`Intermediate` map the student also imitates the teacher inside: each student
layer's hidden states (mean squared error, TinyBERT, Jiao et al. 2020) and its heads' attention
distributions (KL divergence, as TinyBERT's attention loss on probabilities and MiniLM's, Wang et
al. 2020), against the teacher layer and heads it was cut from.  The teacher then runs beside the
student at every step instead of once up front.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from export.evaluate import batched_torch_logits
from export.transfer import UNLABELLED


@dataclass(frozen=True)
class Intermediate:
    """Which teacher layer and heads each student layer imitates, and the weights of those losses.

    ``teacher_layers[j]`` is the teacher layer (0-based) whose output student layer ``j`` learns
    to reproduce; ``teacher_heads[j]`` lists, in order, the teacher heads of that layer that
    student layer ``j``'s heads were cut from (head pruning keeps the survivors in order).
    """

    teacher_layers: list[int]
    teacher_heads: list[list[int]]
    hidden_weight: float = 1.0
    attention_weight: float = 1.0

    def to_json(self) -> dict:
        return {
            "method": "hidden-state MSE (TinyBERT) and attention-distribution KL (TinyBERT, MiniLM) "
            "per student layer, against the teacher layer and heads it was cut from, plus the output loss",
            "teacher_layers": self.teacher_layers,
            "teacher_heads": self.teacher_heads,
            "heads_per_student_layer": [len(h) for h in self.teacher_heads],
            "hidden_weight": self.hidden_weight,
            "attention_weight": self.attention_weight,
        }


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
    intermediate: Intermediate | None = None,
    probe_texts: list[str] | None = None,
    cuda: bool = False,
) -> dict:
    """Train ``student`` in place towards ``teacher`` on ``texts`` (integer ``labels``, or UNLABELLED).

    ``probe_texts`` (held-out sentences, never trained on) measure the loss terms before and
    after, in eval mode, so the record shows what the distillation moved.  With ``cuda`` both
    models train on the GPU and come back to the CPU afterwards.  The hard-label loss is the
    mean over a batch's labelled rows (torch's ``ignore_index``), weighted ``alpha``.  Returns
    the run's figures (steps, seconds, training loss, the probe losses and the settings) for
    the manifest.
    """
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    columns = {"text": texts, "labels": labels}
    if intermediate is None:
        # Without dropout in eval mode every epoch would repeat the teacher's logits: compute them once.
        columns["teacher_logits"] = batched_torch_logits(teacher, tokenizer, texts, max_length).tolist()
    ds = Dataset.from_dict(columns).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
        desc="tokenize",
    )
    device = "cuda" if cuda else "cpu"
    teacher.to(device)
    student.to(device)
    restore = _eager_attention(teacher, student) if intermediate else None
    terms = _LossTerms(teacher, temperature, alpha, intermediate)
    before = terms.probe(student, tokenizer, probe_texts, max_length)

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = terms.loss(model, inputs)
            return (loss, outputs) if return_outputs else loss

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
        use_cpu=not cuda,
        seed=seed,
    )
    student.train()
    started = time.perf_counter()
    result = DistillTrainer(
        model=student, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer)
    ).train()
    shutil.rmtree(workdir, ignore_errors=True)
    student.eval()
    after = terms.probe(student, tokenizer, probe_texts, max_length)
    if restore:
        restore()
    teacher.cpu()
    student.cpu()
    record = {
        "steps": result.global_step,
        "seconds": round(time.perf_counter() - started, 1),
        "loss": round(result.training_loss, 5),
        "temperature": temperature,
        "alpha": alpha,
        "learning_rate": learning_rate,
        "examples": len(texts),
        "labelled_examples": sum(label != UNLABELLED for label in labels),
    }
    if probe_texts:
        record["probe"] = {"texts": len(probe_texts), "before": before, "after": after}
    if intermediate:
        # a family whose attention returns no maps learns without the attention term
        record["intermediate"] = {**intermediate.to_json(), "attention_maps": terms.attention_maps}
    return record


class _LossTerms:
    """The distillation loss of one batch, as its named terms and their weighted sum."""

    def __init__(self, teacher, temperature: float, alpha: float, intermediate: Intermediate | None):
        self.teacher, self.t, self.alpha, self.map = teacher, temperature, alpha, intermediate
        self.attention_maps = False  # whether the models returned attention maps to learn from

    def loss(self, student, inputs: dict):
        """(weighted total, student outputs) for a collated batch with ``labels`` (and ``teacher_logits``)."""
        terms, outputs = self.terms(student, dict(inputs))
        total = self.alpha * terms["hard"] + (1 - self.alpha) * terms["soft"]
        if self.map:
            total = total + self.map.hidden_weight * terms["hidden"]
            total = total + self.map.attention_weight * terms.get("attention", 0)
        return total, outputs

    def terms(self, student, inputs: dict) -> tuple[dict, object]:
        import torch
        import torch.nn.functional as F

        labels = inputs.pop("labels")
        soft = inputs.pop("teacher_logits", None)
        deep = self.map is not None
        teacher_out = None
        if deep or soft is None:
            with torch.no_grad():
                teacher_out = self.teacher(**inputs, output_hidden_states=deep, output_attentions=deep)
            soft = teacher_out.logits
        out = student(**inputs, output_hidden_states=deep, output_attentions=deep)
        t = self.t
        labelled = labels != UNLABELLED
        terms = {
            "soft": F.kl_div(F.log_softmax(out.logits / t, -1), F.softmax(soft / t, -1), reduction="batchmean") * t * t,
            "hard": F.cross_entropy(out.logits[labelled], labels[labelled]) if labelled.any() else out.logits.sum() * 0,
        }
        if deep:
            mask = inputs["attention_mask"].to(out.logits.dtype)
            terms["hidden"] = _hidden_mse(out.hidden_states, teacher_out.hidden_states, self.map, mask)
            # a model whose attention returns no maps (a fused kernel it cannot leave) learns without this term
            if out.attentions and out.attentions[0] is not None and teacher_out.attentions[0] is not None:
                terms["attention"] = _attention_kl(out.attentions, teacher_out.attentions, self.map, mask)
                self.attention_maps = True
        return terms, out

    def probe(self, student, tokenizer, texts: list[str] | None, max_length: int) -> dict | None:
        """Mean loss terms over ``texts`` (batches of 64) in eval mode, as unlabelled text."""
        import torch

        if not texts:
            return None
        was_training = student.training
        student.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                chunk = texts[start : start + 64]
                batch = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
                batch["labels"] = torch.full((len(chunk),), UNLABELLED)
                batch = {k: v.to(student.device) for k, v in batch.items()}
                terms, _ = self.terms(student, dict(batch))
                for name, value in terms.items():
                    if name != "hard":
                        sums[name] = sums.get(name, 0.0) + float(value) * len(chunk)
        student.train(was_training)
        return {name: round(value / len(texts), 6) for name, value in sums.items()}


def _hidden_mse(student_states, teacher_states, layer_map: Intermediate, mask):
    """Mean over student layers of the per-token MSE against the mapped teacher layer (pad tokens excluded).

    ``hidden_states[0]`` is the embeddings' output, so layer ``j``'s output is ``[j + 1]``.
    """
    total = 0
    for j, tl in enumerate(layer_map.teacher_layers):
        per_token = (student_states[j + 1] - teacher_states[tl + 1]).pow(2).mean(-1)
        total = total + (per_token * mask).sum() / mask.sum()
    return total / len(layer_map.teacher_layers)


def _attention_kl(student_attn, teacher_attn, layer_map: Intermediate, mask):
    """Mean over student layers, heads and real query tokens of KL(teacher row || student row).

    Masked keys hold probability 0 in both; ``xlogy`` keeps 0 * log 0 at 0.
    """
    import torch

    total = 0
    for j, (tl, heads) in enumerate(zip(layer_map.teacher_layers, layer_map.teacher_heads, strict=True)):
        target = teacher_attn[tl][:, heads]  # [batch, heads, query, key]
        kl = (torch.xlogy(target, target) - target * student_attn[j].clamp_min(1e-12).log()).sum(-1)
        total = total + (kl.mean(1) * mask).sum() / mask.sum()
    return total / len(layer_map.teacher_layers)


def _eager_attention(teacher, student):
    """Ask both models for eager attention: the fused kernels return no attention maps.

    Models that choose their attention at run time from the config (ModernBERT) switch; BERT's
    SDPA class falls back to its eager path by itself when asked for maps.  In training mode
    the maps come after attention dropout: a dropped entry is 0 in the student's row and adds a
    constant to the KL (no gradient), so the training loss runs higher than the eval-mode probe.
    Returns the function that restores both configs, so the student's export is unchanged.
    """
    own = [model.config._attn_implementation for model in (teacher, student)]
    for model in (teacher, student):
        model.config._attn_implementation = "eager"

    def restore() -> None:
        for model, implementation in zip((teacher, student), own, strict=True):
            model.config._attn_implementation = implementation

    return restore
