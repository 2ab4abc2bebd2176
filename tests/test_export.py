import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from export.export import ExportConfig, export
from serve.classifier import OnnxClassifier
from serve.contract import TrainManifest, UserError, VariantRecord, VariantsManifest, read, verify_files
from tests.conftest import CPU_RECIPES, REPO
from train.data import DataSpec, load_splits


@pytest.fixture(scope="module")
def manifest(tiny_variants) -> VariantsManifest:
    return read(tiny_variants, VariantsManifest)


@pytest.fixture(scope="module")
def records(manifest) -> dict[str, VariantRecord]:
    return {v.name: manifest.load(v) for v in manifest.ok()}


@pytest.mark.slow
def test_manifest_lists_every_recipe_with_checks_and_hashes(manifest, records):
    assert {v.name for v in manifest.variants} == set(CPU_RECIPES)
    assert {v.name for v in manifest.ok()} == set(CPU_RECIPES)
    for v in manifest.variants:
        record = records[v.name]
        assert record.check["passed"] and record.check["samples"] == 128
        assert record.check["max_abs_logit_diff"] <= record.check["tolerance"]["max_abs_logit_diff"]
        assert set(record.metrics) == {"validation", "test"}
        assert len(v.files["model.onnx"]["sha256"]) == 64 and "variant.json" in v.files
        assert verify_files(manifest.directory(v), v.files) == []
        assert record.labels == ["fresh", "rotten"] and record.max_length == 64 and record.pad_token_id == 0
        assert record.inputs == ["input_ids", "attention_mask", "token_type_ids"]
        assert record.batch_invariance["texts"] == 128 and record.batch_invariance["tolerance"] == 1e-4
        if record.precision == "fp32" or record.recipe.get("is_static"):  # fixed arithmetic per text
            assert record.batch_invariance["invariant"], (v.name, record.batch_invariance)
    sizes = {v.name: v.files["model.onnx"]["bytes"] for v in manifest.variants}
    assert sizes["int8-dynamic"] < sizes["onnx-fp32"] / 3  # int8 weights: about a quarter
    assert sizes["pruned-int8"] < sizes["int8-dynamic"]


@pytest.mark.slow
def test_int8_recipes_record_their_configuration(manifest, records):
    assert records["int8-dynamic"].recipe["isa"] == manifest.isa
    assert records["int8-static"].recipe["is_static"] is True
    assert records["int8-static"].recipe["calibration"]["samples"] == 16
    assert records["pruned-int8-static"].recipe["is_static"] is True and records["pruned-int8-static"].pruning
    assert records["onnx-opt"].recipe["fused_operators"].get("Attention", 0) > 0


@pytest.mark.slow
def test_pruning_really_removes_structure(records):
    report = records["pruned-fp32"].pruning
    assert report["flops_reduction"] >= 0.40
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert sum(report["heads_per_layer"]) < 12 * 6 and sum(report["ffn_per_layer"]) < 1536 * 6
    assert report["distillation"]["steps"] == 4
    assert report["kept_layers"] == list(range(6))
    assert records["pruned-int8"].pruning == report  # built from pruned-fp32: the same structure
    deep = records["pruned-l3-int8"].pruning
    assert len(deep["kept_layers"]) == 3 and len(deep["heads_per_layer"]) == 3
    assert deep["flops_reduction"] > 0.7


@pytest.mark.slow
def test_shallow_students_distil_layer_by_layer_on_the_transfer_set(records):
    assert "intermediate" not in records["pruned-fp32"].pruning["distillation"]  # logits only
    for name, layers in (("pruned-l4-fp32", 4), ("pruned-l3-fp32", 3)):
        report = records[name].pruning
        distillation = report["distillation"]
        assert len(report["kept_layers"]) == layers
        assert distillation["intermediate"]["teacher_layers"] == report["kept_layers"]
        assert distillation["intermediate"]["heads_per_student_layer"] == report["heads_per_layer"]
        assert [len(h) for h in distillation["intermediate"]["teacher_heads"]] == report["heads_per_layer"]
        parts = distillation["transfer_set"]
        assert parts["training split"] == parts["augmented training sentences"] == 256
        assert parts["plot summaries, as sentences"] > 4000 and parts["Guardian headlines"] > 4000
        assert distillation["examples"] == sum(parts.values()) and distillation["labelled_examples"] == 256
        assert distillation["probe"]["texts"] == 128  # the validation split, cut to --max-eval-samples
        assert set(distillation["probe"]["after"]) == {"soft", "hidden", "attention"}
    assert records["pruned-l4-int8-static"].pruning == records["pruned-l4-fp32"].pruning


@pytest.mark.slow
def test_every_variant_predicts_like_pytorch(manifest, tiny_model):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = load_splits(DataSpec()).validation["text"].tolist()[:32]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits
    expected = expected.numpy().argmax(1)
    for v in manifest.ok():
        if v.name.startswith("pruned"):
            continue  # a different (smaller) model: checked against its own PyTorch form below
        clf = OnnxClassifier.load(manifest.directory(v))
        preds = np.array([clf.labels.index(p["label"]) for p in clf.predict(texts)])
        assert (preds == expected).mean() >= 0.9, v.name


@pytest.mark.slow
def test_pruned_pytorch_weights_reload_and_match_onnx(manifest):
    import torch
    from transformers import AutoTokenizer

    from export.prune import load_pruned

    model = load_pruned(manifest.root / "torch" / "pruned-l3-fp32")
    onnx_dir = manifest.directory(manifest.entry("pruned-l3-fp32"))
    texts = ["a warm, funny film", "tedious and far too long"]
    batch = AutoTokenizer.from_pretrained(onnx_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch_logits = model(**batch).logits.numpy()
    clf = OnnxClassifier.load(onnx_dir)
    onnx_logits = clf.logits(clf.encode(texts))
    assert np.abs(torch_logits - onnx_logits).max() < 1e-3


def test_fp32_export_alone_is_checked_and_recorded(tiny_fp32, tiny_model):
    manifest = read(tiny_fp32, VariantsManifest)
    assert [v.name for v in manifest.variants] == ["onnx-fp32"] and manifest.model["model_type"] == "bert"
    record = manifest.load(manifest.entry("onnx-fp32"))
    assert record.check["passed"] and record.check["max_abs_logit_diff"] < 1e-3
    assert record.metrics["test"]["accuracy"] == pytest.approx(manifest.pytorch["test"]["accuracy"], abs=0.01)
    per_class, confusion = record.metrics["test"]["per_class"], record.metrics["test"]["confusion_matrix"]
    assert list(per_class) == record.labels and sum(c["support"] for c in per_class.values()) == 128
    assert confusion["labels"] == record.labels and sum(map(sum, confusion["matrix"])) == 128
    assert manifest.data["split"]["sha256"] == read(tiny_model, TrainManifest).data["split"]["sha256"]


def test_corrupt_onnx_file_is_refused_by_readers(tiny_fp32, tmp_path):
    copy = tmp_path / "variants"
    shutil.copytree(tiny_fp32, copy)
    model = copy / "onnx-fp32" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    reloaded = read(copy, VariantsManifest)
    entry = reloaded.entry("onnx-fp32")
    assert verify_files(copy / "onnx-fp32", entry.files) == ["model.onnx (sha256 mismatch)"]
    with pytest.raises(
        UserError,
        match=r"variant onnx-fp32 in .* does not match .*manifest.json: model.onnx "
        r"\(sha256 mismatch\); re-run `python -m export`",
    ):
        reloaded.load(entry)
    model.write_bytes(b"not an onnx graph")
    with pytest.raises(UserError, match="model.onnx is not a loadable ONNX model \\(InvalidProtobuf\\); re-export"):
        OnnxClassifier.load(copy / "onnx-fp32")


def test_missing_model_directory_and_bad_arguments(tmp_path, tiny_model):
    with pytest.raises(UserError, match="does not exist; run `python -m train` first"):
        export(ExportConfig(model=str(tmp_path / "none"), output=str(tmp_path / "v")))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        export(ExportConfig(model=str(broken), output=str(tmp_path / "v")))
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2", "id2label": {"0": "a"}}))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        export(ExportConfig(model=str(broken), output=str(tmp_path / "v")))
    with pytest.raises(UserError, match="unknown recipe\\(s\\) int4; choose from"):
        ExportConfig(recipes=("int4",))
    with pytest.raises(UserError, match="needs a CUDA device"):
        export(ExportConfig(model=str(tiny_model), output=str(tmp_path / "v"), recipes=("onnx-fp16",), device="cpu"))


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--model", str(tmp_path / "none")], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: model directory")
    proc = subprocess.run([sys.executable, "-m", "export", "--isa", "sse"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_distillation_lengths_must_be_finite_and_positive(value):
    with pytest.raises(UserError, match=f"--student-epochs must be a positive number, got {value}"):
        ExportConfig(student_epochs=float(value))
    with pytest.raises(UserError, match="--distill-epochs must be a positive number"):
        ExportConfig(distill_epochs=float(value))
    with pytest.raises(UserError, match="--distill-alpha must lie in"):
        ExportConfig(distill_alpha=float("nan"))


def test_isa_resolution():
    from export.machine import resolve_isa

    host = {"arch": "x86_64", "flags": ["avx2", "fma"], "cpu": "test cpu"}
    assert resolve_isa("auto", host) == "avx2"
    with pytest.raises(UserError, match="lacks it"):
        resolve_isa("avx512_vnni", host)
    assert resolve_isa("auto", {"arch": "aarch64", "flags": [], "cpu": "arm"}) == "arm64"
