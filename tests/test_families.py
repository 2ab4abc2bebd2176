"""Every encoder family through train -> export -> perf -> serve, on tiny random models (tests/tiny_families.py).

For each family other than BERT (which the other tests run through every stage as the real
all-MiniLM-L6-v2): a tiny model fine-tuned a few steps in full and with LoRA, every export recipe
built from the full one and checked against its PyTorch model, perf with a handful of
iterations, and predictions through the served classifier; RoBERTa also through a real
`bentoml serve`.  The matrix is marked ``families`` (part of `make test`).  Torch runs on one
thread here: the models are tiny, and on a shared 2-core machine two spinning threads are
several times slower than one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from serve import families
from serve.classifier import OnnxClassifier
from serve.contract import Selection, TrainManifest, UserError, VariantsManifest, read
from tests import tiny_families
from tests.conftest import CPU_RECIPES, REPO

pytestmark = pytest.mark.families

# BERT itself goes through every stage in the other tests, as the real all-MiniLM-L6-v2 (conftest.py)
FAMILIES = [name for name in tiny_families.SPECS if name != "bert"]
RECIPES = list(CPU_RECIPES)
# Recipes that do not apply, with a word of the reason the manifest must give.
# The tiny models have 4 layers, so a 4-layer student drops none.
_NO_L4 = dict.fromkeys(("pruned-l4-fp32", "pruned-l4-int8", "pruned-l4-int8-static"), "drops none")
SKIPPED = {name: dict(_NO_L4) for name in FAMILIES}
SKIPPED["deberta-v2"].update({"int8-static": "subgraphs", "pruned-int8-static": "subgraphs"})
MAX_LENGTH = 48
TRAIN = {
    "max_train_samples": 512,
    "max_eval_samples": 32,
    "batch_size": 32,
    "max_length": MAX_LENGTH,
    "learning_rate": 1e-3,
    "threads": 1,
}


@contextmanager
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Run:
    name: str
    family: families.Family
    model: Path  # fully fine-tuned
    lora: Path  # LoRA, merged
    variants: VariantsManifest
    perf: dict
    selected: Path


class Runs:
    """Each family's pipeline, run once when first asked for."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Run] = {}
        self.sentences = tiny_families.training_sentences()

    def get(self, name: str) -> Run:
        if name not in self.done:
            with one_thread():
                self.done[name] = self._run(name, self.root / name)
        return self.done[name]

    def _run(self, name: str, root: Path) -> Run:
        from export.export import ExportConfig, export
        from perf.bench import PerfConfig, run
        from train.train import TrainConfig, train

        base = tiny_families.build(name, root / "base", self.sentences)
        train(TrainConfig(model=str(base), output=str(root / "full"), max_steps=8, eval_steps=8, **TRAIN))
        train(
            TrainConfig(model=str(base), output=str(root / "lora"), method="lora", max_steps=2, eval_steps=2, **TRAIN)
        )
        manifest = export(
            ExportConfig(
                model=str(root / "full"),
                output=str(root / "variants"),
                recipes=CPU_RECIPES,
                max_train_samples=128,
                max_eval_samples=32,
                calibration_samples=8,
                importance_samples=32,
                distill_max_steps=2,
            )
        )
        results = run(
            PerfConfig(
                variants=str(root / "variants"),
                output=str(root / "perf"),
                selected=str(root / "selected.json"),
                scenarios=("single", "sweep"),
                single_stream_queries=4,
                warmup=1,
                rounds=1,
                sweep_batches=(2,),
                sweep_lengths=(16, 256),  # 256 is past every tiny model's positions: left out
                sweep_seconds=0.001,
                max_eval_samples=32,
                threads=1,
            )
        )
        return Run(name, families.family(name), root / "full", root / "lora", manifest, results, root / "selected.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, runs) -> Run:
    return runs.get(request.param)


def _texts(n: int = 8) -> list[str]:
    from train.data import DataSpec, load_splits

    return load_splits(DataSpec()).validation["text"].tolist()[:n]


def _torch_logits(model_dir: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from export.evaluate import batched_torch_logits

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    return batched_torch_logits(model, tokenizer, texts, MAX_LENGTH)


# --- the matrix ---------------------------------------------------------------------------------


def test_full_and_lora_training_reload_with_their_recorded_accuracy(family_run):
    """LoRA targets the family's own layers (DistilBERT's q_lin..., ModernBERT's Wqkv...) and its merged
    weights score what the training run recorded, as export/ computes it."""
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from export.evaluate import torch_reference
    from train.data import load_splits, spec_from_description

    full, lora = read(family_run.model, TrainManifest), read(family_run.lora, TrainManifest)
    assert full.model_type == lora.model_type == family_run.name
    assert lora.parameters["trainable"] < 0.5 * lora.parameters["total"] and lora.train["steps"] == 2
    with safe_open(family_run.lora / "model.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if "lora" in k]
    for manifest, directory in ((lora, family_run.lora), (full, family_run.model)):
        splits = load_splits(spec_from_description(manifest.data))
        splits.validation, splits.test = splits.validation.iloc[:32], splits.test.iloc[:32]
        with one_thread():
            model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
            reference = torch_reference(model, AutoTokenizer.from_pretrained(directory), splits, MAX_LENGTH)
        assert reference.test_metrics["accuracy"] == pytest.approx(manifest.metrics["test"]["accuracy"], abs=0.001)
    assert family_run.variants.pytorch["test"]["accuracy"] == pytest.approx(full.metrics["test"]["accuracy"], abs=0.001)


def test_every_recipe_runs_or_is_skipped_with_its_reason(family_run):
    statuses = {v.name: (v.status, v.error) for v in family_run.variants.variants}
    assert list(statuses) == RECIPES
    skipped = SKIPPED.get(family_run.name, {})
    for name, (status, error) in statuses.items():
        if name in skipped:
            assert status == "skipped" and skipped[name] in error, (name, status, error)
        else:
            assert status == "ok", (name, status, error)


def test_variants_match_their_pytorch_models(family_run):
    from transformers import AutoTokenizer

    from export.prune import load_pruned

    manifest = family_run.variants
    config = json.loads((family_run.model / "config.json").read_text())
    pad = AutoTokenizer.from_pretrained(family_run.model).pad_token_id
    for entry in manifest.ok():
        record = manifest.load(entry)
        assert record.check["passed"] and record.check["samples"] == 32, (entry.name, record.check)
        assert record.check["max_abs_logit_diff"] <= record.check["tolerance"]["max_abs_logit_diff"]
        assert record.inputs == family_run.family.graph_inputs(config), entry.name
        assert record.pad_token_id == pad and record.max_length == MAX_LENGTH
        assert record.labels == [config["id2label"][str(i)] for i in range(2)]
    # and independently of export/'s own check: the served path against PyTorch
    texts = _texts()
    with one_thread():
        expected = _torch_logits(family_run.model, texts)
    clf = OnnxClassifier.load(manifest.directory(manifest.entry("onnx-fp32")))
    assert np.abs(clf.logits(clf.encode(texts)) - expected).max() < 1e-4
    pruned_dir = manifest.directory(manifest.entry("pruned-l3-fp32"))
    with one_thread():
        import torch

        model = load_pruned(manifest.root / "torch" / "pruned-l3-fp32")
        batch = AutoTokenizer.from_pretrained(pruned_dir)(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            torch_logits = model(**batch).logits.numpy()
    clf = OnnxClassifier.load(pruned_dir)
    assert np.abs(clf.logits(clf.encode(texts)) - torch_logits).max() < 1e-4


def test_pruning_removes_real_structure_in_every_family(family_run):
    manifest = family_run.variants
    config = json.loads((family_run.model / "config.json").read_text())
    dims = family_run.family.dims(config)
    report = manifest.load(manifest.entry("pruned-fp32")).pruning
    assert report["family"] == family_run.name and report["kept_layers"] == list(range(tiny_families.LAYERS))
    assert report["flops_reduction"] > 0.3 and report["after"]["parameters"] < report["before"]["parameters"]
    assert len(report["heads_per_layer"]) == len(report["ffn_per_layer"]) == tiny_families.LAYERS
    assert sum(report["heads_per_layer"]) < dims["heads"] * tiny_families.LAYERS
    assert sum(report["ffn_per_layer"]) < dims["ffn"] * tiny_families.LAYERS
    if family_run.family.shared_head_bias or family_run.family.shared_layers:
        assert len(set(report["heads_per_layer"])) == 1  # the same heads everywhere
    deep = manifest.load(manifest.entry("pruned-l3-fp32")).pruning
    assert len(deep["kept_layers"]) == len(deep["heads_per_layer"]) == 3
    assert deep["flops_reduction"] > report["flops_reduction"]
    # the 3-layer student imitated the teacher's hidden states and attention maps, layer by layer
    distillation = deep["distillation"]
    assert distillation["intermediate"]["heads_per_student_layer"] == deep["heads_per_layer"]
    assert set(distillation["probe"]["before"]) == {"soft", "hidden", "attention"}, distillation["probe"]
    # any fused Attention node carries a real head count (ORT may leave a layer unfused)
    fused = manifest.load(manifest.entry("pruned-int8")).recipe["optimized_first"]
    assert fused.get("attention_fusion_disabled") is None
    assert set(fused["attention_heads"]) <= set(report["heads_per_layer"])
    assert len(fused["attention_heads"]) <= tiny_families.LAYERS
    opt = manifest.load(manifest.entry("onnx-opt")).recipe
    assert set(opt["attention_heads"]) <= {dims["heads"]}


def test_perf_measures_every_variant_and_serves_predictions(family_run):
    results = family_run.perf
    names = [e["name"] for e in results["entries"]]
    assert names[:2] == ["baseline-pipeline", "baseline-optimum-int8"]
    assert names[2:] == [v.name for v in family_run.variants.ok()]
    for entry in results["entries"]:
        assert entry["single_stream"]["queries"] == 4 and entry["single_stream"]["p50_ms"] > 0
        assert list(entry["sweep"]) == ["2x16"]  # 256 tokens are past the model's positions
    manifest, entry, record = read(family_run.selected, Selection).resolve()
    clf = OnnxClassifier.load(manifest.directory(entry), record, threads=1)
    predictions = clf.predict(["A warm, funny film.", "Tedious and far too long. " * 40])
    assert [set(p["probabilities"]) for p in predictions] == [set(record.labels)] * 2
    assert clf.encode(["x " * 200]).truncated == 1 and clf.encode(["x " * 200]).inputs["input_ids"].shape[1] == 48


# --- refusals -------------------------------------------------------------------------------------


def _config_dir(directory: Path, **config) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_unsupported_architecture_is_refused_in_one_line_before_training(tmp_path):
    model = _config_dir(tmp_path / "gpt2", model_type="gpt2", n_layer=2, n_embd=64, n_head=2)
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--model", str(model), "--output", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""  # nothing printed: not even the data was read
    assert proc.stderr == (
        "error: unsupported architecture 'gpt2'; trimserve supports bert, roberta, xlm-roberta, electra, "
        "distilbert, deberta-v2, mpnet, albert, modernbert (README: Encoder families)\n"
    )
    assert not (tmp_path / "out").exists()


def test_unsupported_task_and_too_long_inputs_are_refused(tmp_path):
    from train.train import TrainConfig, train

    model = _config_dir(tmp_path / "bert", model_type="bert", problem_type="regression")
    with pytest.raises(UserError, match=r"is set up for regression; trimserve trains and serves single-label"):
        train(TrainConfig(model=str(model), output=str(tmp_path / "out")))
    roberta = _config_dir(tmp_path / "roberta", model_type="roberta", max_position_embeddings=130)
    with pytest.raises(
        UserError, match=r"^--max-length 129 exceeds the model's 128 positions; use --max-length <= 128$"
    ):
        train(TrainConfig(model=str(roberta), output=str(tmp_path / "out"), max_length=129))


def test_family_table_paths_exist_on_real_modules():
    """Every path in serve/families.py names a module of the family's transformers classes."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    for name, spec in tiny_families.SPECS.items():
        family = families.family(name)
        ids = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "cls_token_id": 0, "sep_token_id": 2}
        config = AutoConfig.for_model(name, vocab_size=100, num_labels=2, **ids, **spec.config)
        model = AutoModelForSequenceClassification.from_config(config)
        layers = family.encoder_layers(model)
        assert len(family.passes(model)) == tiny_families.LAYERS, name
        for path in (*family.qkv, family.attention_out, family.ffn_in, family.ffn_out):
            assert isinstance(families.get(layers[0], path), torch.nn.Linear), (name, path)
        names = [n for n, _ in model.named_modules()]
        for head in family.head_modules:  # peft matches modules_to_save by name suffix
            assert [n for n in names if n == head or n.endswith("." + head)], (name, head)
        layer_prefix = family.layers.split(".*")[0]
        for target in family.lora_targets:
            if target.startswith("pos_"):
                continue  # DeBERTa's separate position projections: absent with shared attention keys
            hits = [n for n in names if n == target or n.endswith("." + target)]
            assert [n for n in hits if n.startswith(layer_prefix)], (name, target)


# --- the fused-attention guard --------------------------------------------------------------------------


def test_a_fused_attention_node_never_keeps_a_wrong_head_count(runs, tmp_path):
    """A graph whose reshapes infer the head count (-1) makes ORT's fusion fall back to the config's
    unpruned count; optimize() must see it and build the graph without attention fusion instead."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from export.recipes import optimize

    roberta = runs.get("roberta")
    source = tmp_path / "source"
    shutil.copytree(roberta.variants.directory(roberta.variants.entry("pruned-fp32")), source)
    model = onnx.load(str(source / "model.onnx"))
    constants = {o: n for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:  # [batch, -1, heads, size] -> [batch, 0 (copy), -1 (inferred), size]
        if node.op_type == "Concat" and "/attention/self/" in node.name and len(node.input) == 4:
            for index, value in ((1, 0), (2, -1)):
                constants[node.input[index]].attribute[0].t.CopyFrom(
                    numpy_helper.from_array(np.array([value], dtype=np.int64))
                )
    onnx.save(model, str(source / "model.onnx"))
    target = tmp_path / "opt"
    built = optimize(SimpleNamespace(family=families.family("roberta")), source, target, level=2)
    assert "declares 4 heads, its weights hold" in built.details["attention_fusion_disabled"]
    graph = onnx.load(str(target / "model.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Attention"]
    feeds = {"input_ids": np.array([[0, 40, 50, 60, 2]]), "attention_mask": np.ones((1, 5), dtype=np.int64)}
    expected = ort.InferenceSession(str(source / "model.onnx")).run(None, feeds)[0]
    got = ort.InferenceSession(str(target / "model.onnx")).run(None, feeds)[0]
    assert np.abs(expected - got).max() < 1e-4


# --- one family through a real `bentoml serve` --------------------------------------------------------


@pytest.mark.slow
def test_roberta_through_a_real_bentoml_serve(runs, tmp_path):
    import httpx

    from serve.launch import ServerProcess

    run = runs.get("roberta")
    env = {"TRIMSERVE_SELECTED": str(run.selected), "TRIMSERVE_ALLOW_NO_AUTH": "1", "TRIMSERVE_THREADS": "1"}
    with ServerProcess(env, tmp_path / "server.log", home=tmp_path / "home") as server:
        server.wait_ready(120)
        response = httpx.post(f"{server.url}/classify", json={"texts": ["A warm, funny film.", "Dull."]}, timeout=30)
    assert response.status_code == 200, response.text
    record = read(run.selected, Selection).resolve()[2]
    assert [set(p["probabilities"]) for p in response.json()] == [set(record.labels)] * 2
    assert record.pad_token_id == 1 and record.inputs == ["input_ids", "attention_mask"]
