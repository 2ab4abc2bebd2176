"""Structured pruning of a BERT classifier: heads and FFN neurons really removed.

0. Optionally, whole layers: dropped greedily by the validation-free loss on training
   batches (``choose_layers``), before anything else.
1. Importance (first-order Taylor, Michel et al. 2019 for heads, Molchanov et al. 2019 for
   neurons): masking head h scales the input columns of the attention output projection that
   belong to h, so dL/d(mask_h) = sum over those columns of W * dL/dW.  The same holds for an
   FFN neuron and its column of the FFN output projection.  We accumulate |dL/d(mask)| over
   batches of training data.
2. Selection: the least important share of heads and of FFN neurons, ranked across layers,
   keeping at least one head and ``min_ffn`` neurons per layer.
3. Surgery: transformers' ``prune_heads`` and ``prune_linear_layer`` shrink the weight
   matrices, so the dense model has fewer parameters and FLOPs (not zeroed weights).
4. Recovery: a short fine-tune distils from the unpruned model (logit KD), see export.py.

The kept indices are saved in ``pruning.json`` so ``load_pruned`` rebuilds the module shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

PRUNING_FILE = "pruning.json"


@dataclass
class PrunePlan:
    layers: list[int]  # encoder layers to KEEP (original numbering); applied first
    heads: dict[int, list[int]]  # kept layer (new numbering) -> head indices to remove
    neurons: dict[int, list[int]]  # kept layer (new numbering) -> FFN neuron indices to KEEP

    def to_json(self) -> dict:
        return {
            "keep_layers": self.layers,
            "remove_heads": {str(k): v for k, v in self.heads.items()},
            "keep_ffn_neurons": {str(k): v for k, v in self.neurons.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> PrunePlan:
        return cls(
            layers=data["keep_layers"],
            heads={int(k): v for k, v in data["remove_heads"].items()},
            neurons={int(k): v for k, v in data["keep_ffn_neurons"].items()},
        )


def encoder_macs_per_token(model, seq_len: int = 128) -> int:
    """Multiply-accumulates per token in the encoder layers (embeddings and head excluded).

    Counts the four attention projections, the two attention matmuls (scores and
    context, which grow with ``seq_len``) and the two FFN projections.
    """
    total = 0
    for layer in model.bert.encoder.layer:
        attn = layer.attention.self
        hidden = attn.query.in_features
        inner = attn.all_head_size
        total += 4 * hidden * inner + 2 * seq_len * inner
        total += 2 * hidden * layer.intermediate.dense.out_features
    return total


def importance(model, batches, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulated |Taylor| importance per head [layers, heads] and per FFN neuron [layers, ffn]."""
    layers = model.bert.encoder.layer
    n_heads = layers[0].attention.self.num_attention_heads
    head_dim = layers[0].attention.self.attention_head_size
    head_score = torch.zeros(len(layers), n_heads)
    ffn_score = torch.zeros(len(layers), layers[0].intermediate.dense.out_features)
    model.eval()  # no dropout: the score should reflect the model as it will be used
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(**{k: v.to(device) for k, v in batch.items()})
        out.loss.backward()
        for i, layer in enumerate(layers):
            w = layer.attention.output.dense.weight
            per_column = (w * w.grad).sum(dim=0).detach().cpu()  # one value per input column
            head_score[i] += per_column.view(n_heads, head_dim).sum(dim=1).abs()
            w = layer.output.dense.weight
            ffn_score[i] += (w * w.grad).sum(dim=0).detach().cpu().abs()
    model.zero_grad(set_to_none=True)
    return head_score, ffn_score


def choose_layers(model, batches: list, keep: int) -> list[int]:
    """Greedily drop the encoder layer whose removal raises the loss least, until ``keep`` remain.

    Whole layers remove per-layer fixed costs (kernel launches, LayerNorms, the attention
    softmax) that head and neuron pruning leave in place; those dominate at batch 1.
    """
    kept = list(range(len(model.bert.encoder.layer)))
    original = model.bert.encoder.layer
    while len(kept) > keep:
        losses = {}
        for candidate in kept:
            _keep_layers(model, original, [k for k in kept if k != candidate])
            losses[candidate] = _loss(model, batches)
        kept.remove(min(losses, key=losses.get))
    _keep_layers(model, original, list(range(len(original))))
    return kept


def _keep_layers(model, layers, indices: list[int]) -> None:
    model.bert.encoder.layer = torch.nn.ModuleList([layers[i] for i in indices])
    model.config.num_hidden_layers = len(indices)


@torch.no_grad()
def _loss(model, batches) -> float:
    model.eval()
    return sum(float(model(**batch).loss) for batch in batches) / len(batches)


def plan(
    model, head_score: torch.Tensor, ffn_score: torch.Tensor, target: float, layers: list[int], min_ffn: int = 64
) -> PrunePlan:
    """Remove the ``target`` share of heads and of FFN neurons, least important first.

    Heads and neurons are ranked separately, each globally across layers after per-layer
    normalisation (Michel et al.: layers differ in gradient scale).  Removing the same
    share of both removes that share of the encoder's MACs per token, whatever the
    sequence length.  Taylor scores of a 32-dim head and of one neuron are not on a common
    scale, which is why the two are not ranked against each other.
    """
    head_norm = head_score / head_score.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ffn_norm = ffn_score / ffn_score.norm(dim=1, keepdim=True).clamp_min(1e-12)
    heads = _lowest(head_norm, round(target * head_norm.numel()), keep_per_row=1)
    drop_ffn = _lowest(ffn_norm, round(target * ffn_norm.numel()), keep_per_row=min_ffn)
    keep = {i: [n for n in range(ffn_score.shape[1]) if n not in set(drop_ffn[i])] for i in drop_ffn}
    return PrunePlan(layers=layers, heads=heads, neurons=keep)


def _lowest(scores: torch.Tensor, count: int, keep_per_row: int) -> dict[int, list[int]]:
    """The ``count`` lowest entries of a [layers, units] matrix, leaving ``keep_per_row`` per layer."""
    chosen: dict[int, list[int]] = {i: [] for i in range(scores.shape[0])}
    for flat in torch.argsort(scores.flatten()).tolist():
        if count == 0:
            break
        layer, unit = divmod(flat, scores.shape[1])
        if scores.shape[1] - len(chosen[layer]) > keep_per_row:
            chosen[layer].append(unit)
            count -= 1
    return {i: sorted(u) for i, u in chosen.items()}


def apply(model, prune_plan: PrunePlan):
    """Remove the planned layers, heads and neurons from ``model`` in place (real, smaller matrices)."""
    from transformers.pytorch_utils import prune_linear_layer

    apply_layers(model, prune_plan.layers)
    model.prune_heads({i: h for i, h in prune_plan.heads.items() if h})
    for i, keep in prune_plan.neurons.items():
        layer = model.bert.encoder.layer[i]
        index = torch.tensor(keep, dtype=torch.long)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)
    return model


def apply_layers(model, layers: list[int]) -> None:
    """Keep only ``layers`` (original numbering) of the encoder."""
    if layers != list(range(len(model.bert.encoder.layer))):
        _keep_layers(model, model.bert.encoder.layer, layers)


def save_pruned(model, prune_plan: PrunePlan, out: Path, base_config: dict) -> None:
    """Weights (safetensors) plus the plan; ``load_pruned`` rebuilds the shapes from both."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "pruned.safetensors"))
    (out / PRUNING_FILE).write_text(json.dumps({"base_config": base_config, **prune_plan.to_json()}) + "\n")


def load_pruned(directory: Path):
    """Rebuild a pruned model saved by ``save_pruned``."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    data = json.loads((directory / PRUNING_FILE).read_text())
    config = AutoConfig.for_model(**data["base_config"])
    config.pruned_heads = {}  # applied below, from the plan, with the FFN surgery
    model = AutoModelForSequenceClassification.from_config(config)
    apply(model, PrunePlan.from_json(data))
    load_model(model, str(directory / "pruned.safetensors"))
    return model.eval()
