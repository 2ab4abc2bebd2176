"""Structured pruning of an encoder classifier: heads and FFN neurons really removed.

Works on every family in serve/families.py, which says where each keeps its layers, heads and
FFN neurons.

0. Optionally, whole layers: dropped greedily by the validation-free loss on training
   batches (``choose_layers``), before anything else.  ALBERT shares one layer across the
   depth: there, dropping layers means running the shared layer fewer times.
1. Importance (first-order Taylor, Michel et al. 2019 for heads, Molchanov et al. 2019 for
   neurons): masking head h scales the input columns of the attention output projection that
   belong to h, so dL/d(mask_h) = sum over those columns of W * dL/dW.  The same holds for an
   FFN neuron and its column of the FFN output projection.  We accumulate |dL/d(mask)| over
   batches of training data.
2. Selection: the least important share of heads and of FFN neurons, ranked across layers,
   keeping at least one head and ``min_ffn`` neurons per layer.  MPNet adds one relative
   position bias per head, shared by all layers: there the same heads go from every layer.
3. Surgery: the weight matrices shrink, so the dense model has fewer parameters and FLOPs
   (not zeroed weights): transformers' ``prune_heads`` where it is correct for the family,
   otherwise the same cut made here on the projections (``prune_linear_layer``); FFN neurons
   always here.
4. Recovery: a fine-tune distils from the unpruned model (export/distill.py): logit KD on the
   training split, or, for the shallow students, intermediate-layer distillation on a larger
   transfer set (export/transfer.py).

The kept indices are saved in ``pruning.json`` so ``load_pruned`` rebuilds the module shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from serve import families
from serve.families import Family

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
    family = _family(model)
    total = 0
    for layer in family.passes(model):
        hidden = families.get(layer, family.attention_out).out_features
        inner = heads_of(family, layer) * _head_size(family, layer)
        total += 4 * hidden * inner + 2 * seq_len * inner
        # a gated FFN (GLU) has two input projections: [input; gate]
        total += (3 if family.gated_ffn else 2) * hidden * ffn_of(family, layer)
    return total


def heads_of(family: Family, layer) -> int:
    """Attention heads of one encoder layer."""
    return getattr(families.get(layer, family.attention), family.heads)


def ffn_of(family: Family, layer) -> int:
    """FFN neurons of one encoder layer."""
    return families.get(layer, family.ffn_out).in_features


def _head_size(family: Family, layer) -> int:
    return getattr(families.get(layer, family.attention), family.head_size)


def _family(model) -> Family:
    return families.family(model.config.model_type)


def layer_count(model) -> int:
    """Layers that ``choose_layers`` and ``PrunePlan.layers`` count (ALBERT: passes of its shared layers)."""
    family = _family(model)
    return model.config.num_hidden_layers if family.shared_layers else len(family.encoder_layers(model))


def cannot_drop_layers(model, keep: int) -> str | None:
    """Why ``keep`` layers cannot be chosen from ``model`` (None: they can)."""
    count = layer_count(model)
    if keep > count:
        return f"the model has {count} layers, fewer than the {keep} this recipe keeps"
    if keep == count:
        return f"the model has {count} layers; keeping {keep} drops none"
    if _family(model).shared_layers and model.config.num_hidden_groups != 1:
        return f"ALBERT with {model.config.num_hidden_groups} layer groups: only one shared group can run fewer times"
    return None


def importance(model, batches, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulated |Taylor| importance per head [layers, heads] and per FFN neuron [layers, ffn]."""
    family = _family(model)
    layers = family.encoder_layers(model)  # distinct: a shared layer's gradient sums over its passes
    n_heads = heads_of(family, layers[0])
    head_dim = _head_size(family, layers[0])
    head_score = torch.zeros(len(layers), n_heads)
    ffn_score = torch.zeros(len(layers), ffn_of(family, layers[0]))
    model.eval()  # no dropout: the score should reflect the model as it will be used
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(**{k: v.to(device) for k, v in batch.items()})
        out.loss.backward()
        for i, layer in enumerate(layers):
            w = families.get(layer, family.attention_out).weight
            per_column = (w * w.grad).sum(dim=0).detach().cpu()  # one value per input column
            head_score[i] += per_column.view(n_heads, head_dim).sum(dim=1).abs()
            w = families.get(layer, family.ffn_out).weight
            ffn_score[i] += (w * w.grad).sum(dim=0).detach().cpu().abs()
    model.zero_grad(set_to_none=True)
    return head_score, ffn_score


def choose_layers(model, batches: list, keep: int) -> list[int]:
    """Greedily drop the encoder layer whose removal raises the loss least, until ``keep`` remain.

    Whole layers remove per-layer fixed costs (kernel launches, LayerNorms, the attention
    softmax) that head and neuron pruning leave in place; those dominate at batch 1.
    """
    if _family(model).shared_layers:
        return list(range(keep))  # one shared layer: every pass is the same, keep the first ``keep``
    kept = list(range(layer_count(model)))
    original = _family(model).encoder_layers(model)
    while len(kept) > keep:
        losses = {}
        for candidate in kept:
            _keep_layers(model, original, [k for k in kept if k != candidate])
            losses[candidate] = _loss(model, batches)
        kept.remove(min(losses, key=losses.get))
    _keep_layers(model, original, list(range(len(original))))
    return kept


def _keep_layers(model, layers, indices: list[int]) -> None:
    family = _family(model)
    if not family.shared_layers:
        families.put(model, family.layers, torch.nn.ModuleList([layers[i] for i in indices]))
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
    if _family(model).shared_head_bias:
        # one bias column per head serves every layer: remove the same heads everywhere
        alike = _lowest(head_norm.sum(dim=0, keepdim=True), round(target * head_norm.shape[1]), keep_per_row=1)[0]
        heads = {i: list(alike) for i in range(head_norm.shape[0])}
    else:
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

    family = _family(model)
    apply_layers(model, prune_plan.layers)
    if family.native_prune_heads:
        model.prune_heads({i: h for i, h in prune_plan.heads.items() if h})
    else:
        layers = family.encoder_layers(model)
        for i, heads in prune_plan.heads.items():
            if heads:
                _cut_heads(family, layers[i], heads)
        if family.shared_head_bias and prune_plan.heads.get(0):
            _cut_head_bias(model, family, prune_plan.heads[0])
    layers = family.encoder_layers(model)
    for i, keep in prune_plan.neurons.items():
        layer = layers[i]
        index = torch.tensor(keep, dtype=torch.long)
        rows = index
        if family.gated_ffn:  # [input; gate]: neuron n is row n of each half
            rows = torch.cat([index, index + ffn_of(family, layer)])
        families.put(layer, family.ffn_in, prune_linear_layer(families.get(layer, family.ffn_in), rows, dim=0))
        families.put(layer, family.ffn_out, prune_linear_layer(families.get(layer, family.ffn_out), index, dim=1))
    return model


def _cut_heads(family: Family, layer, heads: list[int]) -> None:
    """Remove ``heads`` from one layer: rows of q/k/v (and per-head position projections), columns of the output.

    What transformers' ``prune_heads`` does, for families where it has none or where it is wrong.
    """
    from transformers.pytorch_utils import prune_linear_layer

    attention = families.get(layer, family.attention)
    count, size = getattr(attention, family.heads), getattr(attention, family.head_size)
    kept = [h for h in range(count) if h not in set(heads)]
    index = torch.tensor([h * size + d for h in kept for d in range(size)], dtype=torch.long)
    if len(family.qkv) == 1:  # fused [q; k; v]: the same heads from each third
        rows = torch.cat([index + part * count * size for part in range(3)])
        families.put(layer, family.qkv[0], prune_linear_layer(families.get(layer, family.qkv[0]), rows, dim=0))
    else:
        for path in family.qkv + tuple(p for p in family.extra_head_projections if families.has(layer, p)):
            families.put(layer, path, prune_linear_layer(families.get(layer, path), index, dim=0))
    out = families.get(layer, family.attention_out)
    families.put(layer, family.attention_out, prune_linear_layer(out, index, dim=1))
    setattr(attention, family.heads, len(kept))
    if family.all_head_size:
        setattr(attention, family.all_head_size, len(kept) * size)


def _cut_head_bias(model, family: Family, heads: list[int]) -> None:
    """Keep the shared per-head bias columns of the heads that remain (MPNet's relative position bias)."""
    bias = families.get(model, family.shared_head_bias)
    kept = [h for h in range(bias.embedding_dim) if h not in set(heads)]
    smaller = torch.nn.Embedding(bias.num_embeddings, len(kept))
    with torch.no_grad():
        smaller.weight.copy_(bias.weight[:, kept])
    families.put(model, family.shared_head_bias, smaller)


def apply_layers(model, layers: list[int]) -> None:
    """Keep only ``layers`` (original numbering) of the encoder."""
    if layers != list(range(layer_count(model))):
        _keep_layers(model, _family(model).encoder_layers(model), layers)


def teacher_layers(teacher, kept: list[int]) -> list[int]:
    """The teacher layer each student layer imitates in intermediate-layer distillation: the one
    it was cut from (``kept``, as ``choose_layers`` returns it).

    ALBERT runs one shared layer ``layer_count`` times and a student keeps the first passes;
    there the student's passes spread evenly over the teacher's, ending at its last (TinyBERT's
    uniform map), so the last pass still learns the teacher's final representation.
    """
    if not _family(teacher).shared_layers:
        return list(kept)
    count = layer_count(teacher)
    return [round((j + 1) * count / len(kept)) - 1 for j in range(len(kept))]


def kept_heads(teacher, prune_plan: PrunePlan) -> list[list[int]]:
    """The teacher heads each student layer (ALBERT: pass) keeps, in their original order.

    transformers' ``prune_heads`` and ``_cut_heads`` both keep the surviving heads in order, so
    head ``i`` of student layer ``j`` is head ``kept_heads(...)[j][i]`` of its teacher layer.
    """
    family = _family(teacher)
    count = heads_of(family, family.encoder_layers(teacher)[0])
    removed = [set(prune_plan.heads.get(0 if family.shared_layers else j, [])) for j in range(len(prune_plan.layers))]
    return [[h for h in range(count) if h not in gone] for gone in removed]


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
