"""The artifacts contract (serve/contract.py), the import graph, and the bento that carries serve/ alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve.contract import (
    Selection,
    TrainManifest,
    UserError,
    VariantRecord,
    VariantsManifest,
    describe_files,
    read,
    verify_files,
    write,
)
from tests import import_graph
from tests.conftest import REPO

# Run in a child before importing serve: train/, export/ and perf/ cannot be imported at all
# (the editable install would otherwise find them from anywhere).
BLOCK_STAGES = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("train", "export", "perf"):
            raise ImportError(f"{name} is not part of the bento")
sys.meta_path.insert(0, Blocked())
"""


# --- the import graph --------------------------------------------------------------------------


def test_dependencies_run_one_way_without_cycles():
    graph = import_graph.module_imports()
    edges = import_graph.package_edges(graph)
    print("\n" + "\n".join(f"{p} -> {', '.join(sorted(t)) or '-'}" for p, t in edges.items()))
    assert edges["serve"] == set()  # serve/ ships alone
    assert edges["train"] == {"serve.contract", "serve.families"}
    assert "perf" not in edges["export"]
    assert edges["export"] <= {"train", "serve.contract", "serve.classifier", "serve.families"}
    assert import_graph.cycles(graph) == []


def test_perf_scoring_does_not_import_torch():
    code = (
        "import sys, perf.bench, perf.loadgen; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- records ---------------------------------------------------------------------------------------


def _selection(**changes) -> Selection:
    return Selection(
        **{
            "variant": "onnx-fp32",
            "manifest": "manifest.json",
            "manifest_sha256": "0" * 64,
            "rule": {"budget": 0.99},
            **changes,
        }
    )


def test_write_then_read_round_trips_atomically(tmp_path):
    path = write(tmp_path / "deep" / "selected.json", _selection())
    assert read(path, Selection) == _selection() and read(path.parent, Selection).variant == "onnx-fp32"
    assert json.loads(path.read_text())["kind"] == "trimserve.selection"
    write(path, _selection(variant="int8-dynamic"))  # replaces, leaving no temporary file behind
    assert [p.name for p in path.parent.iterdir()] == ["selected.json"]
    assert read(path, Selection).variant == "int8-dynamic"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"x.json does not exist; `python -m perf` writes it$"),
        (
            "{not json",
            r"x.json is not valid JSON \(Expecting property name enclosed in double quotes at line 1\); re-run ",
        ),
        (b"\xff\xfe", r"x.json is not valid JSON \(not UTF-8\)"),
        ("[1, 2]", r"x.json is not a trimserve.selection record \(kind 'list'\); `python -m perf` writes one$"),
        (
            {"kind": "trimserve.variants", "version": 1},
            r"is not a trimserve.selection record \(kind 'trimserve.variants'\)",
        ),
        (
            {"kind": "trimserve.selection", "version": 2},
            r"has version 2 of trimserve.selection, this trimserve reads version 1",
        ),
        (
            {"kind": "trimserve.selection", "version": 1, "variant": "a", "extra": 1},
            r"is not a valid trimserve.selection record \(missing manifest, manifest_sha256, rule; unexpected extra\)",
        ),
    ],
)
def test_read_says_in_one_line_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "x.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match=message) as err:
        read(path, Selection)
    assert "\n" not in str(err.value)


def test_records_of_every_stage_read_back(tiny_model, served_variant):
    manifest, entry, record, directory = served_variant
    assert isinstance(read(tiny_model, TrainManifest), TrainManifest)
    assert isinstance(manifest, VariantsManifest) and manifest.root == directory.parent
    assert read(directory, VariantRecord) == record and record.labels == ["fresh", "rotten"]
    with pytest.raises(
        UserError,
        match=r"'int8-dynamic' is not an ok variant of .*manifest.json; choose one of "
        r"onnx-fp32$",
    ):
        manifest.entry("int8-dynamic")


def test_verify_files_names_missing_and_changed_files(tmp_path):
    (tmp_path / "a").write_text("one")
    (tmp_path / "b").write_text("two")
    files = describe_files(tmp_path)
    assert files["a"]["bytes"] == 3 and verify_files(tmp_path, files) == []
    (tmp_path / "a").write_text("uno")
    (tmp_path / "b").unlink()
    assert verify_files(tmp_path, files) == ["a (sha256 mismatch)", "b (missing)"]


# --- serve/ alone: staged, imported without the other stages, built into a bento ------------------------


def _select(tiny_fp32: Path, path: Path) -> Path:
    from serve.contract import sha256_file

    return write(
        path,
        Selection(
            variant="onnx-fp32",
            manifest=os.path.relpath(tiny_fp32 / "manifest.json", path.parent),
            manifest_sha256=sha256_file(tiny_fp32 / "manifest.json"),
            rule={"by": "test"},
        ),
    )


def _stage(selected: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve", "stage", "--selected", str(selected), "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_stage_copies_the_verified_variant_and_refuses_what_it_did_not_write(tiny_fp32, tmp_path):
    selected = _select(tiny_fp32, tmp_path / "selected.json")
    done = _stage(selected, tmp_path / "bento")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "bento").iterdir()) == ["manifest.json", "onnx-fp32", "selected.json"]
    manifest, entry, record = read(tmp_path / "bento" / "selected.json", Selection).resolve()
    assert [v.name for v in manifest.variants] == ["onnx-fp32"] and entry.path == "onnx-fp32"
    assert _stage(selected, tmp_path / "bento").returncode == 0  # a staging replaces an earlier one

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refused = _stage(selected, tmp_path / "other")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "holds other files, not a staged variant" in refused.stderr
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def _import_service(cwd: Path, selected: str) -> subprocess.CompletedProcess:
    code = BLOCK_STAGES + (
        "import serve.service, sys\n"
        "assert serve.service.__file__.startswith(sys.argv[1]), serve.service.__file__\n"
        "print(serve.service.VARIANT.name, sorted(m for m in sys.modules if m.split('.')[0] in ('train', 'export', "
        "'perf', 'torch')))\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIMSERVE_")},
        "TRIMSERVE_SELECTED": selected,
        "TRIMSERVE_ALLOW_NO_AUTH": "1",
        "BENTOML_DO_NOT_TRACK": "True",
    }
    return subprocess.run([sys.executable, "-c", code, str(cwd)], cwd=cwd, env=env, capture_output=True, text=True)


def test_service_imports_with_the_other_stages_absent(tiny_fp32, tmp_path):
    shutil.copytree(REPO / "serve", tmp_path / "serve", ignore=shutil.ignore_patterns("__pycache__", "deploy"))
    selected = _select(tiny_fp32, tmp_path / "selected.json")
    done = _import_service(tmp_path, str(selected))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "onnx-fp32 []"


@pytest.mark.slow
def test_bento_builds_from_serve_alone_and_its_service_imports(tiny_fp32, tmp_path):
    """`bentoml build` of a checkout holding only serve/, bentofile.yaml and a staged variant."""
    context = tmp_path / "context"
    shutil.copytree(REPO / "serve", context / "serve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "bentofile.yaml", context)
    assert _stage(_select(tiny_fp32, tmp_path / "selected.json"), context / "artifacts" / "bento").returncode == 0
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIMSERVE_")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BENTOML_HOME": str(tmp_path / "home"),
        "BENTOML_DO_NOT_TRACK": "True",
        "TRIMSERVE_SELECTED": "artifacts/bento/selected.json",
        "TRIMSERVE_ALLOW_NO_AUTH": "1",
    }
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(context)],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    [src] = (tmp_path / "home" / "bentos" / "trimserve").glob("*/src")
    shipped = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    assert {"serve", "artifacts"} <= {p.split("/")[0] for p in shipped} <= {"serve", "artifacts", "bentofile.yaml"}
    assert "artifacts/bento/onnx-fp32/model.onnx" in shipped and not any(p.startswith("serve/deploy") for p in shipped)
    done = _import_service(src, "artifacts/bento/selected.json")  # as the container runs it, from the bento
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "onnx-fp32 []"
