"""One command for one's own data: `make serve DATA=...` into its own artifacts directory."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from serve.contract import Selection, TrainManifest, read
from tests.conftest import REPO

# -o: never rebuild the shared virtual environment from a test, whatever the file dates say.
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]
DEFAULT_ART = re.compile(r"(?<![\w/-])artifacts/")


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MAKE, *args], cwd=REPO, capture_output=True, text=True)


def _tests_data(tmp_path: Path) -> Path:
    rows = [(f"hello and good morning number {i}", "greeting") for i in range(20)]
    rows += [(f"please send me {i} pizzas", "order") for i in range(20)]
    rows += [(f"the sky over town {i}", "None") for i in range(20)]
    path = tmp_path / "tests-data.csv"
    pd.DataFrame(rows, columns=["utterance", "intent"]).to_csv(path, index=False)
    return path


def _snapshot(directory: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*")} if directory.exists() else {}


def test_dry_run_for_own_data_runs_every_stage_outside_artifacts(tmp_path):
    data = _tests_data(tmp_path)
    done = _make(
        "-n",
        "serve",
        f"DATA={data}",
        "TEXT_COLUMN=utterance",
        "LABEL_COLUMN=intent",
        "GROUP_COLUMN=speaker",
        "MODEL=all-minilm-l6-v2",
        "RECIPES=onnx-fp32 int8-dynamic",
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    art = "artifacts-tests-data-all-minilm-l6-v2"
    assert (
        f".venv/bin/python -m train --output {art}/model --overwrite --data {data} --model all-minilm-l6-v2 "
        "--text-column utterance --label-column intent --group-column speaker"
    ) in out
    assert (
        f".venv/bin/python -m export --model {art}/model --output {art}/variants --overwrite "
        "--recipes onnx-fp32 int8-dynamic"
    ) in out
    assert (
        f".venv/bin/python -m perf --variants {art}/variants --output {art}/perf --selected {art}/selected.json" in out
    )
    assert f"TRIMSERVE_SELECTED={art}/selected.json" in out
    assert not DEFAULT_ART.search(out), "own data must not touch the default artifacts/"
    assert not (REPO / art).exists()  # a dry run writes nothing

    plain = _make("-B", "-n", "pipeline")  # the default pipeline still owns artifacts/ (-B: whatever is built here)
    lines = [line.rstrip() for line in plain.stdout.splitlines()]
    assert plain.returncode == 0 and ".venv/bin/python -m train --output artifacts/model --overwrite" in lines


def test_make_stops_before_replacing_a_selection_it_did_not_make(tmp_path):
    art = tmp_path / "own"
    art.mkdir()
    theirs = {"kind": "trimserve.selection", "version": 1, "variant": "int8-dynamic"}
    (art / "selected.json").write_text(json.dumps({**theirs, "manifest": "../mine/variants/manifest.json"}, indent=2))
    done = _make("pipeline", f"ART={art}")
    assert done.returncode != 0
    assert f"error: {art}/selected.json selects from other variants than {art}/variants" in done.stderr
    assert "make will not replace it" in done.stderr
    assert sorted(p.name for p in art.iterdir()) == ["selected.json"]  # nothing trained, nothing replaced


@pytest.mark.slow
def test_make_pipeline_on_own_data_leaves_the_default_artifacts_alone(tmp_path):
    data, art = _tests_data(tmp_path), tmp_path / "art"
    before = _snapshot(REPO / "artifacts")
    args = [
        f"DATA={data}",
        f"ART={art}",
        "TEXT_COLUMN=utterance",
        "LABEL_COLUMN=intent",
        "RECIPES=onnx-fp32",
        "TRAIN_ARGS=--max-steps 4 --batch-size 8 --max-length 32",
        "PERF_ARGS=--scenarios single --single-stream-queries 4 --warmup 1 --rounds 2",
    ]
    done = _make("pipeline", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = read(art / "model", TrainManifest)
    assert manifest.data["label_names"] == ["None", "greeting", "order"] and manifest.train["steps"] == 4
    _, entry, record = read(art / "selected.json", Selection).resolve()
    assert entry.name == "onnx-fp32" and list(record.metrics["test"]["per_class"]) == ["None", "greeting", "order"]
    assert (art / "perf" / "confusion.png").is_file() and "Test F1 per class" in (
        art / "perf" / "report.md"
    ).read_text()
    assert _snapshot(REPO / "artifacts") == before

    again = _make("pipeline", *args)  # nothing changed: nothing re-runs
    assert again.returncode == 0 and "python -m" not in again.stdout
