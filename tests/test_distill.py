"""The shallow students' parts: the transfer set, and an intermediate-layer distillation that really learns."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from export import prune, transfer
from export.distill import Intermediate, distil
from train.data import DataSpec, load_splits
from train.sources import default_plot_summaries


@pytest.fixture(scope="module")
def splits():
    return load_splits(DataSpec())


def test_transfer_set_adds_unlabelled_text_but_none_of_held_out_movies(splits):
    data = transfer.build(splits, seed=1)
    n_train = len(splits.train)
    assert data.parts["training split"] == n_train and data.parts["augmented training sentences"] == n_train
    assert data.parts["plot summaries, as sentences"] > 4000 and data.parts["Guardian headlines"] > 4000
    assert len(data.texts) == len(data.labels) == sum(data.parts.values())
    assert data.texts[:n_train] == splits.train["text"].tolist()
    assert all(label in (0, 1) for label in data.labels[:n_train])
    assert set(data.labels[n_train:]) == {transfer.UNLABELLED}
    # no sentence of a validation or test movie's plot summary is learnt from
    plots = default_plot_summaries()
    held_out = set(splits.groups["validation"]) | set(splits.groups["test"])
    held_out_text = " ".join(" ".join(t.split()) for t in plots[plots["group"].isin(held_out)]["text"])
    ours = transfer.in_domain_sentences(splits, max_words=64)
    assert held_out_text and not any(s in held_out_text for s in ours if len(s.split()) >= 6)
    # split by another column, a held-out movie's plot cannot be told apart: no plots then
    other = dataclasses.replace(splits, spec=dataclasses.replace(splits.spec, group_column="critic"), groups=None)
    assert transfer.in_domain_sentences(other, max_words=64) == []


def test_transfer_set_of_other_data_is_the_training_split_and_its_augmentations(tmp_path, splits):
    import pandas as pd

    path = tmp_path / "own.csv"
    frame = splits.train.iloc[:300]
    pd.DataFrame({"text": frame["text"], "label": frame["label"]}).to_csv(path, index=False)
    own = load_splits(DataSpec(source=str(path)))
    data = transfer.build(own, seed=1, augment_copies=2)
    assert data.parts == {"training split": len(own.train), "augmented training sentences": 2 * len(own.train)}


def test_augmentation_is_seeded_and_keeps_a_word():
    corpus = ["the film is warm and funny", "a tedious, overlong mess"]
    first = [transfer.augment(t, corpus, np.random.default_rng(3)) for t in corpus]
    again = [transfer.augment(t, corpus, np.random.default_rng(3)) for t in corpus]
    assert first == again
    assert transfer.augment("one", corpus, np.random.default_rng(0), p_drop=1.0) == "one"
    changed = transfer.augment(corpus[0] * 5, corpus, np.random.default_rng(0), p_drop=0.3, p_swap=0.3)
    assert changed != corpus[0] * 5


def test_student_heads_map_onto_the_teacher_heads_they_were_cut_from(tiny_model):
    """After head pruning (and layer dropping), the first kept layer sees the teacher's input,
    so its remaining heads' attention maps are exactly the mapped teacher heads' maps."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()
    batch = tokenizer(["a warm, funny film", "tedious and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = teacher(**batch, output_attentions=True).attentions
    for plan in (
        prune.PrunePlan(layers=list(range(6)), heads={0: [0, 5, 11], 1: [3]}, neurons={}),
        prune.PrunePlan(layers=[0, 3, 5], heads={0: [2, 7], 2: [0]}, neurons={}),
    ):
        student = prune.apply(copy.deepcopy(teacher), plan).eval()
        heads = prune.kept_heads(teacher, plan)
        assert [len(h) for h in heads] == [12 - len(plan.heads.get(j, [])) for j in range(len(plan.layers))]
        assert prune.teacher_layers(teacher, plan.layers) == plan.layers
        with torch.no_grad():
            got = student(**batch, output_attentions=True).attentions
        assert torch.allclose(got[0], expected[0][:, heads[0]], atol=1e-6)
        assert not torch.allclose(got[0], expected[0][:, : len(heads[0])], atol=1e-3)  # a wrong map shows


def test_albert_passes_map_evenly_onto_the_teacher_passes():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_layers=6,
    )
    teacher = AlbertForSequenceClassification(config)
    assert prune.teacher_layers(teacher, [0, 1, 2]) == [1, 3, 5]
    plan = prune.PrunePlan(layers=[0, 1, 2], heads={0: [1]}, neurons={})
    assert prune.kept_heads(teacher, plan) == [[0, 2, 3]] * 3  # one shared layer: the same heads every pass


def test_default_recipes_hold_the_4_layer_student_and_not_the_3_layer_one():
    from export.export import select_recipes

    default = [r.name for r in select_recipes((), cuda=False)]
    assert {"pruned-l4-fp32", "pruned-l4-int8", "pruned-l4-int8-static"} <= set(default)
    assert not any(name.startswith("pruned-l3") for name in default) and "onnx-fp16" not in default
    assert [r.name for r in select_recipes(("pruned-l3-int8",), cuda=False)] == ["pruned-l3-fp32", "pruned-l3-int8"]


def test_intermediate_distillation_lowers_each_of_its_losses(tiny_model, splits, tmp_path):
    """A 3-layer student cut from the tiny model learns its teacher's layers, heads and outputs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()
    plan = prune.PrunePlan(layers=[0, 2, 5], heads={0: [1, 4], 1: [0], 2: [11]}, neurons={})
    student = prune.apply(copy.deepcopy(teacher), plan)
    mapping = Intermediate(
        teacher_layers=[0, 2, 5], teacher_heads=[[0, 2, 3, *range(5, 12)], [*range(1, 12)], [*range(11)]]
    )
    texts = splits.train["text"].tolist()[:192]
    attention = student.config._attn_implementation
    record = distil(
        teacher,
        student,
        tokenizer,
        texts,
        [transfer.UNLABELLED] * len(texts),
        64,
        tmp_path / "work",
        epochs=1,
        max_steps=12,
        learning_rate=5e-4,
        temperature=2.0,
        alpha=0.5,
        seed=0,
        intermediate=mapping,
        probe_texts=splits.validation["text"].tolist()[:32],
    )
    before, after = record["probe"]["before"], record["probe"]["after"]
    assert set(before) == {"soft", "hidden", "attention"}
    assert all(after[term] < before[term] for term in before), (before, after)
    assert sum(after.values()) < 0.8 * sum(before.values()), (before, after)
    assert record["steps"] == 12 and record["labelled_examples"] == 0
    assert record["intermediate"]["heads_per_student_layer"] == [10, 11, 11]
    assert student.config._attn_implementation == attention  # its export is what it was
