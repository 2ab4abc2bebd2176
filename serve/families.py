"""Encoder families: where each supported architecture keeps what trimserve reads and changes.

One table, read by every stage instead of assuming BERT: train/ (which ``model_type`` it accepts,
LoRA target layers and head modules, the position limit), export/ (encoder layers, attention
heads and FFN neurons for pruning, graph inputs, the ORTOptimizer model type) and perf/ (config
key names, graph inputs).  Standard library only and no torch at import, so it ships with serve/.

Paths are dotted attribute paths: ``layers`` from the ``*ForSequenceClassification`` model to
its list of encoder layers (a ``*`` flattens a list of lists: ALBERT's layer groups); the others
from one encoder layer.  Integers in a path index a list (``layer_groups.0``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from serve.contract import UserError

_BERT_KEYS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads"}


@dataclass(frozen=True)
class Family:
    """What trimserve needs to know about one ``model_type``; see the module docstring for paths.

    Attention: ``attention`` is the module holding the head count (attribute ``heads``), the size
    of one head (``head_size``) and, when the family keeps one, their product (``all_head_size``).
    ``qkv`` are the query, key and value projections, whose output rows are grouped by head (one
    path: a fused [q; k; v] projection, ModernBERT's ``Wqkv``); ``attention_out`` is the output
    projection, whose input columns are grouped by head.  FFN: ``ffn_in`` rows and ``ffn_out``
    input columns are the neurons (``gated_ffn``: ``ffn_in`` rows are [input; gate], GLU).
    """

    model_type: str
    name: str
    layers: str
    attention: str
    heads: str
    head_size: str
    all_head_size: str | None
    qkv: tuple[str, ...]
    attention_out: str
    ffn_in: str
    ffn_out: str
    head_modules: tuple[str, ...]  # the classification head: trained in full and saved by a LoRA run
    lora_targets: tuple[str, ...]  # peft target_modules (name suffixes): the encoder's linear layers only
    tokenizer: str  # what the family's checkpoints ship with (README)
    note: str  # what a user must know or pass (README)
    gated_ffn: bool = False
    # Projections whose output rows are per head too, pruned with q/k/v when the model has them
    # (DeBERTa without shared attention keys: pos_key_proj, pos_query_proj).
    extra_head_projections: tuple[str, ...] = ()
    # From the model: an Embedding with one column per head, shared by every layer (MPNet's
    # relative position bias).  Heads must then be removed alike in every layer.
    shared_head_bias: str | None = None
    # ALBERT: the distinct layers are applied config.num_hidden_layers times in all.
    shared_layers: bool = False
    # transformers' own prune_heads is correct for this family (otherwise trimserve's surgery).
    native_prune_heads: bool = False
    # None: the graph takes token_type_ids when the config has token types (type_vocab_size > 0).
    token_type_ids: bool | None = True
    # Position ids start after the pad id (RoBERTa-style): the first two positions are never used.
    position_offset: int = 0
    config_keys: dict = field(default_factory=lambda: dict(_BERT_KEYS))
    ffn_key: str = "intermediate_size"
    ort_model_type: str = "bert"  # the model type ORTOptimizer's fusions use

    def graph_inputs(self, config: dict) -> list[str]:
        """The ONNX graph's input names for a model with this ``config.json`` (Optimum's export)."""
        types = self.token_type_ids
        if types is None:
            types = config.get("type_vocab_size", 0) > 0
        return ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])

    def position_limit(self, config: dict) -> int | None:
        """The longest input in tokens the model's position embeddings allow (None: not stated)."""
        positions = config.get("max_position_embeddings")
        return positions - self.position_offset if positions else None

    def dims(self, config: dict) -> dict:
        """``{"hidden", "layers", "heads", "head_size", "ffn"}`` of an unpruned model from its ``config.json``."""
        hidden = config[self.config_keys["hidden"]]
        heads = config[self.config_keys["heads"]]
        return {
            "hidden": hidden,
            "layers": config[self.config_keys["layers"]],
            "heads": heads,
            "head_size": config.get("attention_head_size") or hidden // heads,
            "ffn": config[self.ffn_key],
        }

    def encoder_layers(self, model) -> list:
        """The distinct encoder layer modules of a classification model, in order."""
        return list(_walk(model, self.layers.split(".")))

    def passes(self, model) -> list:
        """The encoder layers in the order a forward pass runs them (ALBERT: its shared layers, repeated)."""
        distinct = self.encoder_layers(model)
        if not self.shared_layers:
            return distinct
        total = model.config.num_hidden_layers
        per_group = len(distinct) // model.config.num_hidden_groups
        groups = [distinct[g * per_group : (g + 1) * per_group] for g in range(model.config.num_hidden_groups)]
        return [layer for i in range(total) for layer in groups[int(i / (total / len(groups)))]]


def _walk(obj, parts: list[str]) -> Iterator:
    if not parts:
        yield from obj
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        for item in obj:
            yield from _walk(item, rest)
    else:
        yield from _walk(get(obj, head), rest)


def get(obj, path: str):
    """``obj.a.b`` for ``path`` ``"a.b"`` (an integer part indexes a list)."""
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def has(obj, path: str) -> bool:
    """Whether ``path`` exists on ``obj``."""
    try:
        get(obj, path)
    except (AttributeError, IndexError):
        return False
    return True


def put(obj, path: str, value) -> None:
    """Set ``obj.a.b = value`` for ``path`` ``"a.b"``."""
    parent, _, name = path.rpartition(".")
    setattr(get(obj, parent) if parent else obj, name, value)


def _bert_like(model_type: str, name: str, base: str, tokenizer: str, note: str, **changes) -> Family:
    return Family(
        model_type=model_type,
        name=name,
        layers=f"{base}.encoder.layer",
        attention="attention.self",
        heads="num_attention_heads",
        head_size="attention_head_size",
        all_head_size="all_head_size",
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
        attention_out="attention.output.dense",
        ffn_in="intermediate.dense",
        ffn_out="output.dense",
        native_prune_heads=True,
        tokenizer=tokenizer,
        note=note,
        **{
            "head_modules": ("classifier",),
            # "output.dense" is the attention and the FFN output; the head's classifier.dense is left out
            "lora_targets": ("query", "key", "value", "output.dense", "intermediate.dense"),
            **changes,
        },
    )


_ROBERTA_NOTE = (
    "no token_type_ids; pads with id 1 and numbers positions from 2, so --max-length is at most "
    "max_position_embeddings - 2 (512 for base checkpoints)"
)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        _bert_like(
            "bert",
            "BERT, MiniLM",
            "bert",
            "WordPiece",
            "nothing: the default (all-MiniLM-L6-v2) is one",
            head_modules=("classifier", "pooler"),
            # every linear layer of the encoder (the pooler is saved whole, see head_modules)
            lora_targets=("query", "key", "value", "dense"),
        ),
        _bert_like(
            "roberta", "RoBERTa", "roberta", "byte-level BPE", _ROBERTA_NOTE, token_type_ids=False, position_offset=2
        ),
        _bert_like(
            "xlm-roberta",
            "XLM-RoBERTa",
            "roberta",
            "SentencePiece (Unigram)",
            _ROBERTA_NOTE + "; its 250k-token vocabulary is most of its size",
            token_type_ids=False,
            position_offset=2,
        ),
        _bert_like(
            "electra",
            "ELECTRA",
            "electra",
            "WordPiece",
            "the discriminator checkpoint (not the generator); smaller embeddings are projected up, never pruned",
        ),
        Family(
            model_type="distilbert",
            name="DistilBERT",
            layers="distilbert.transformer.layer",
            attention="attention",
            heads="n_heads",
            head_size="attention_head_size",
            all_head_size="dim",
            qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
            attention_out="attention.out_lin",
            ffn_in="ffn.lin1",
            ffn_out="ffn.lin2",
            head_modules=("pre_classifier", "classifier"),
            lora_targets=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
            native_prune_heads=True,
            token_type_ids=False,
            config_keys={"hidden": "dim", "layers": "n_layers", "heads": "n_heads"},
            ffn_key="hidden_dim",
            tokenizer="WordPiece",
            note="no token_type_ids",
        ),
        Family(
            model_type="deberta-v2",
            name="DeBERTa-v2/v3",
            layers="deberta.encoder.layer",
            attention="attention.self",
            heads="num_attention_heads",
            head_size="attention_head_size",
            all_head_size="all_head_size",
            qkv=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
            attention_out="attention.output.dense",
            ffn_in="intermediate.dense",
            ffn_out="output.dense",
            extra_head_projections=("attention.self.pos_key_proj", "attention.self.pos_query_proj"),
            head_modules=("pooler", "classifier"),
            lora_targets=(
                "query_proj",
                "key_proj",
                "value_proj",
                "pos_key_proj",
                "pos_query_proj",
                "output.dense",
                "intermediate.dense",
            ),
            token_type_ids=None,  # v3 checkpoints have none (type_vocab_size 0)
            tokenizer="SentencePiece (Unigram)",
            note="v3 checkpoints take no token_type_ids; transformers cannot prune its heads, trimserve cuts "
            "the projections itself",
        ),
        Family(
            model_type="mpnet",
            name="MPNet",
            layers="mpnet.encoder.layer",
            attention="attention.attn",
            heads="num_attention_heads",
            head_size="attention_head_size",
            all_head_size="all_head_size",
            qkv=("attention.attn.q", "attention.attn.k", "attention.attn.v"),
            attention_out="attention.attn.o",
            ffn_in="intermediate.dense",
            ffn_out="output.dense",
            shared_head_bias="mpnet.encoder.relative_attention_bias",
            head_modules=("classifier",),
            lora_targets=("attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"),
            token_type_ids=False,
            position_offset=2,
            tokenizer="WordPiece with <s>/</s> specials",
            note="no token_type_ids; pads with id 1 (positions from 2); its relative position bias is shared "
            "by all layers, so pruning removes the same heads in every layer",
        ),
        Family(
            model_type="albert",
            name="ALBERT",
            layers="albert.encoder.albert_layer_groups.*.albert_layers",
            attention="attention",
            heads="num_attention_heads",
            head_size="attention_head_size",
            all_head_size="all_head_size",
            qkv=("attention.query", "attention.key", "attention.value"),
            attention_out="attention.dense",
            ffn_in="ffn",
            ffn_out="ffn_output",
            shared_layers=True,
            native_prune_heads=True,
            head_modules=("pooler", "classifier"),
            lora_targets=("query", "key", "value", "attention.dense", "ffn", "ffn_output"),
            tokenizer="SentencePiece (Unigram)",
            note="its layers share weights: pruning cuts the shared layer once, layer dropping runs it fewer "
            "times (one layer group only)",
        ),
        Family(
            model_type="modernbert",
            name="ModernBERT",
            layers="model.layers",
            attention="attn",
            heads="num_heads",
            head_size="head_dim",
            all_head_size="all_head_size",
            qkv=("attn.Wqkv",),
            attention_out="attn.Wo",
            ffn_in="mlp.Wi",
            ffn_out="mlp.Wo",
            gated_ffn=True,
            head_modules=("head", "classifier"),
            lora_targets=("Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"),
            token_type_ids=False,
            tokenizer="byte-level BPE",
            note="no token_type_ids; fused q/k/v and a gated FFN, which trimserve prunes itself; "
            "ORTOptimizer fuses little of its rotary attention",
        ),
    )
}


def family(model_type: str | None) -> Family:
    """The family of ``model_type``; UserError naming the supported ones if there is none."""
    found = FAMILIES.get(model_type or "")
    if found is None:
        raise UserError(
            f"unsupported architecture {model_type!r}; trimserve supports {', '.join(FAMILIES)} "
            "(README: Encoder families)"
        )
    return found


def of_config(config: dict, source: str = "the model") -> Family:
    """The family of a ``config.json`` (as a dict), after checking it describes an encoder classifier.

    Raises UserError, in one line, for an unsupported architecture, a decoder, or a task other than
    single-label classification (regression, multi-label).
    """
    found = family(config.get("model_type"))
    if config.get("is_decoder") or config.get("is_encoder_decoder"):
        raise UserError(f"{source} is configured as a decoder; trimserve fine-tunes and serves encoders")
    task = config.get("problem_type")
    if task not in (None, "single_label_classification"):
        raise UserError(
            f"{source} is set up for {task}; trimserve trains and serves single-label classifiers "
            "(drop problem_type from its config.json to re-use the encoder)"
        )
    return found
