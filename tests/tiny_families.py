"""Tiny random-initialised encoders of every supported family, with real tokenizers: no hub needed.

Each model is built from its family's config (4 layers, hidden 64, 4 heads of 16) and saved as a
base checkpoint (``AutoModel``), the way a user brings one; train/ adds the classification head.
Its tokenizer is trained in about a second on the default data's training sentences, of the kind
the family really uses: WordPiece (BERT, DistilBERT, ELECTRA, MPNet), byte-level BPE (RoBERTa,
ModernBERT) or Unigram, i.e. SentencePiece (XLM-R, DeBERTa-v3, ALBERT), with the family's own
special tokens and ids (RoBERTa pads with 1, DeBERTa-v3 with 0, ModernBERT with 50283-like ids
at the end of its vocabulary).

Four layers rather than two: the pruned-l3 recipes keep three layers, so two would leave them
nothing to drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VOCAB = 2000  # small: the embedding matrix is most of a tiny model's size and export time
HIDDEN, LAYERS, HEADS, FFN = 64, 4, 4, 256
POSITIONS = 128


@dataclass(frozen=True)
class TinySpec:
    model_type: str
    tokenizer: str  # wordpiece | bpe | unigram
    specials: tuple[str, ...]  # in id order from 0 (ModernBERT: appended after the vocabulary)
    cls: str
    sep: str
    pad: str
    unk: str
    mask: str
    fast_class: str  # the transformers fast tokenizer class the family ships with
    config: dict


_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# TinySpec's cls, sep, pad, unk and mask tokens of the two common conventions
_BERT_ROLES = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")
_ROBERTA_ROLES = ("<s>", "</s>", "<pad>", "<unk>", "<mask>")
_DIMS = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": FFN,
    "max_position_embeddings": POSITIONS,
}

SPECS: dict[str, TinySpec] = {
    "bert": TinySpec("bert", "wordpiece", _BERT_SPECIALS, *_BERT_ROLES, "BertTokenizerFast", _DIMS),
    "distilbert": TinySpec(
        "distilbert",
        "wordpiece",
        _BERT_SPECIALS,
        *_BERT_ROLES,
        "DistilBertTokenizerFast",
        {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": FFN, "max_position_embeddings": POSITIONS},
    ),
    "roberta": TinySpec(
        "roberta",
        "bpe",
        _ROBERTA_SPECIALS,
        *_ROBERTA_ROLES,
        "RobertaTokenizerFast",
        # RoBERTa numbers positions from pad id + 1: 2 of its positions are never used
        {**_DIMS, "max_position_embeddings": POSITIONS + 2, "type_vocab_size": 1},
    ),
    "xlm-roberta": TinySpec(
        "xlm-roberta",
        "unigram",
        _ROBERTA_SPECIALS,
        *_ROBERTA_ROLES,
        "XLMRobertaTokenizerFast",
        {**_DIMS, "max_position_embeddings": POSITIONS + 2, "type_vocab_size": 1},
    ),
    "electra": TinySpec(
        "electra",
        "wordpiece",
        _BERT_SPECIALS,
        *_BERT_ROLES,
        "ElectraTokenizerFast",
        {**_DIMS, "embedding_size": 32},  # ELECTRA projects smaller embeddings up to the hidden size
    ),
    "deberta-v2": TinySpec(
        "deberta-v2",
        "unigram",
        ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"),
        *_BERT_ROLES,
        "DebertaV2TokenizerFast",
        # DeBERTa-v3's layout: relative attention with shared keys, no absolute positions, no token types
        {
            **_DIMS,
            "relative_attention": True,
            "position_buckets": 32,
            "max_relative_positions": -1,
            "pos_att_type": ["p2c", "c2p"],
            "share_att_key": True,
            "position_biased_input": False,
            "norm_rel_ebd": "layer_norm",
            "type_vocab_size": 0,
            "pooler_hidden_size": HIDDEN,
        },
    ),
    "mpnet": TinySpec(
        "mpnet",
        "wordpiece",
        ("<s>", "<pad>", "</s>", "<unk>", "<mask>"),
        *_ROBERTA_ROLES,
        "MPNetTokenizerFast",
        {**_DIMS, "max_position_embeddings": POSITIONS + 2, "relative_attention_num_buckets": 32},
    ),
    "albert": TinySpec(
        "albert",
        "unigram",
        ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"),
        "[CLS]",
        "[SEP]",
        "<pad>",
        "<unk>",
        "[MASK]",
        "AlbertTokenizerFast",
        {**_DIMS, "embedding_size": 32, "num_hidden_groups": 1, "inner_group_num": 1},
    ),
    "modernbert": TinySpec(
        "modernbert",
        "bpe",
        ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"),
        *_BERT_ROLES,
        "PreTrainedTokenizerFast",
        {
            **_DIMS,
            "intermediate_size": FFN // 2,  # gated: Wi is 2 x 128 wide, as many weights as the others' 256
            "global_attn_every_n_layers": 3,
            "local_attention": 32,
            "reference_compile": False,
        },
    ),
}


def training_sentences() -> list[str]:
    from train.data import DataSpec, load_splits

    return load_splits(DataSpec()).train["text"].tolist()


def train_tokenizer(spec: TinySpec, sentences: list[str]):
    """A ``tokenizers.Tokenizer`` of the family's kind, trained on ``sentences``, with its post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = list(spec.specials)
    if spec.tokenizer == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=spec.unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials)
    elif spec.tokenizer == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # ModernBERT keeps its special tokens after the ordinary vocabulary (its pad id is 50283)
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=[] if spec.model_type == "modernbert" else specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("``", '"')])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials, unk_token=spec.unk)
    tok.train_from_iterator(sentences, trainer)
    if spec.model_type == "modernbert":
        tok.add_special_tokens(specials)
    cls, sep = tok.token_to_id(spec.cls), tok.token_to_id(spec.sep)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{spec.cls} $A {spec.sep}",
        pair=f"{spec.cls} $A {spec.sep} $B:1 {spec.sep}:1",
        special_tokens=[(spec.cls, cls), (spec.sep, sep)],
    )
    return tok


def build(model_type: str, out: Path, sentences: list[str] | None = None, seed: int = 0) -> Path:
    """Save a tiny random ``model_type`` encoder and its tokenizer in ``out``; returns ``out``."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel

    spec = SPECS[model_type]
    # 3,000 sentences are plenty for a 2,000-token vocabulary (Unigram on all 10,000 takes 9 s)
    tok = train_tokenizer(spec, (sentences or training_sentences())[:3000])
    ids = {name: tok.token_to_id(getattr(spec, name)) for name in ("cls", "sep", "pad", "unk", "mask")}
    fast = getattr(transformers, spec.fast_class)(
        tokenizer_object=tok,
        **{f"{name}_token": getattr(spec, name) for name in ("cls", "sep", "pad", "unk", "mask")},
        **({"bos_token": spec.cls, "eos_token": spec.sep} if spec.cls == "<s>" else {}),
        model_max_length=POSITIONS,
        **({"model_input_names": ["input_ids", "attention_mask"]} if model_type == "modernbert" else {}),
    )
    config = AutoConfig.for_model(
        model_type,
        vocab_size=tok.get_vocab_size(),
        pad_token_id=ids["pad"],
        bos_token_id=ids["cls"],
        eos_token_id=ids["sep"],
        **({"cls_token_id": ids["cls"], "sep_token_id": ids["sep"]} if model_type == "modernbert" else {}),
        **spec.config,
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":
    import sys
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="tiny-families-"))
    texts = training_sentences()
    for name in sys.argv[1:] or SPECS:
        print(build(name, root / name, texts))
