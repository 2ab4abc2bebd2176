"""Batch invariance: export/ measures whether a text's answer depends on what shares its model call,
and serve/ runs a variant that is not invariant one text per call (real tiny model, real ONNX Runtime)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from export.evaluate import INVARIANCE_TOLERANCE, batch_invariance
from serve.batching import Batcher, may_share_calls
from serve.classifier import OnnxClassifier
from serve.contract import TrainManifest, VariantRecord, VariantsManifest, read
from train.data import load_splits, spec_from_description

FIELDS = {"texts", "batches", "max_abs_prob_diff", "label_flips", "invariant", "tolerance"}
pytestmark = pytest.mark.slow  # reads the tiny model's full recipe matrix (tests/conftest.py: tiny_variants)


@pytest.fixture(scope="module")
def manifest(tiny_variants) -> VariantsManifest:
    return read(tiny_variants, VariantsManifest)


@pytest.fixture(scope="module")
def int8(manifest) -> tuple[VariantRecord, OnnxClassifier]:
    entry = manifest.entry("int8-dynamic")
    record = manifest.load(entry)
    return record, OnnxClassifier.load(manifest.directory(entry), record, threads=1)


def test_export_records_batch_invariance_of_every_variant(manifest):
    assert {"onnx-fp32", "onnx-opt", "int8-dynamic"} <= {v.name for v in manifest.ok()}
    for entry in manifest.ok():
        inv = manifest.load(entry).batch_invariance
        assert set(inv) == FIELDS, entry.name
        # the 128 validation texts of the fixture: alone, in 16 random batches of 8, in 19 of 7 beside a long text
        assert inv["texts"] == 128 and inv["batches"] == 16 + 19
        assert inv["tolerance"] == INVARIANCE_TOLERANCE and 0 <= inv["label_flips"] <= inv["texts"]
        assert inv["invariant"] == (inv["max_abs_prob_diff"] <= inv["tolerance"])
    fp32 = manifest.load(manifest.entry("onnx-fp32")).batch_invariance
    assert fp32["invariant"] and fp32["max_abs_prob_diff"] <= 1e-4 and fp32["label_flips"] == 0


def test_int8_invariance_measurement_is_reproducible(int8, tiny_model):
    record, clf = int8
    splits = load_splits(spec_from_description(read(tiny_model, TrainManifest).data))
    texts = splits.validation["text"].tolist()[:128]  # what the fixture's export checked on
    assert batch_invariance(clf, texts, seed=42) == record.batch_invariance
    other = batch_invariance(clf, texts, seed=7, max_texts=32)
    assert other["texts"] == 32 and other["batches"] == 4 + 5
    with pytest.raises(ValueError, match="needs at least one text"):
        batch_invariance(clf, [], seed=42)


def test_records_without_the_measurement_stay_readable_and_keep_batching(int8):
    record = int8[0]
    older = record.to_json()
    del older["batch_invariance"]  # a variant.json written before export/ measured it
    assert VariantRecord.from_json(older).batch_invariance is None
    unmeasured = dataclasses.replace(record, batch_invariance=None)
    assert may_share_calls(unmeasured) == (
        True,
        "batch invariance not measured (exported before trimserve recorded it)",
    )
    moving = dataclasses.replace(record, batch_invariance={**record.batch_invariance, "invariant": False})
    moving.batch_invariance["max_abs_prob_diff"] = 0.21
    assert may_share_calls(moving) == (False, "not batch-invariant (max |dprob| 0.21): one text per model call")
    steady = dataclasses.replace(record, batch_invariance={**record.batch_invariance, "invariant": True})
    steady.batch_invariance["max_abs_prob_diff"] = 3e-7
    assert may_share_calls(steady) == (True, "batch-invariant (max |dprob| 3e-07)")


def _served(batcher: Batcher, clf: OnnxClassifier, requests: list[list[str]]) -> list[np.ndarray]:
    """Probabilities [texts, labels] per request, all requests queued at once (so they may share calls)."""

    async def go():
        loop = asyncio.get_running_loop()
        jobs = [batcher.submit(clf.tokenize(texts), loop) for texts in requests]
        return await asyncio.gather(*(job.future for job in jobs))

    return asyncio.run(go())


def test_int8_served_answers_do_not_depend_on_the_neighbours(int8, tiny_model):
    record, clf = int8
    share, _ = may_share_calls(record)
    assert share == record.batch_invariance["invariant"]
    # what serve/service.py builds for this variant
    batcher = Batcher(clf, 8 if share else 1, 4096, max_queue_s=30.0, merge=share)
    splits = load_splits(spec_from_description(read(tiny_model, TrainManifest).data))
    texts = splits.validation["text"].tolist()[:24]
    long_text = " ".join(texts)  # truncated to max_length: the others are padded to it
    alone = np.concatenate([_served(batcher, clf, [[t]])[0] for t in texts])
    requests = [[*texts[:5], long_text], texts[5:12], *([t] for t in texts[12:])]
    first, second, *singles = _served(batcher, clf, requests)
    together = np.concatenate([first[:5], second, *singles])
    # one text per call: the very same computation as alone, bit for bit
    tolerance = record.batch_invariance["tolerance"] if share else 0.0
    assert np.abs(together - alone).max() <= tolerance
