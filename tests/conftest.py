"""Shared fixtures: one tiny but real fine-tuning run that every stage's tests reuse.

``tiny_model`` trains once per session; ``tiny_fp32`` exports only onnx-fp32 from it (what
the serving tests need, in seconds); ``tiny_variants`` builds every CPU recipe (the export
and perf matrix, marked slow).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a hub

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 fine-tuned for a few dozen steps on a slice of the default data.

    Long enough to separate clearly positive from clearly negative reviews, short enough
    (~40 s on 2 cores) for every test run.
    """
    from train.train import TrainConfig, train

    out = tmp_path_factory.mktemp("stage") / "model"
    train(
        TrainConfig(
            output=str(out),
            max_train_samples=2048,
            max_eval_samples=128,
            max_steps=60,
            batch_size=32,
            eval_steps=30,
            max_length=64,
            learning_rate=2e-4,
        )
    )
    return out


def _export(tiny_model: Path, out: Path, recipes: tuple[str, ...] = ()) -> Path:
    from export.export import ExportConfig, export

    export(
        ExportConfig(
            model=str(tiny_model),
            output=str(out),
            recipes=recipes,
            max_train_samples=256,
            max_eval_samples=128,
            calibration_samples=16,
            importance_samples=64,
            distill_max_steps=4,
        )
    )
    return out


@pytest.fixture(scope="session")
def tiny_fp32(tiny_model, tmp_path_factory) -> Path:
    """A variants dir holding onnx-fp32 only (numerically the fine-tuned model itself)."""
    return _export(tiny_model, tmp_path_factory.mktemp("stage") / "fp32", ("onnx-fp32",))


@pytest.fixture(scope="session")
def tiny_variants(tiny_model, tmp_path_factory) -> Path:
    """Every CPU recipe built from ``tiny_model`` with small samples; returns the variants dir."""
    return _export(tiny_model, tmp_path_factory.mktemp("stage") / "variants")


@pytest.fixture(scope="session")
def served_variant(tiny_fp32):
    """(manifest, entry, record, directory) of the onnx-fp32 variant the serving tests use."""
    from serve.contract import VariantsManifest, read

    manifest = read(tiny_fp32, VariantsManifest)
    entry = manifest.entry("onnx-fp32")
    return manifest, entry, manifest.load(entry), manifest.directory(entry)
