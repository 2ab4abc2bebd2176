import subprocess
import sys

import pandas as pd
import pytest

from serve.contract import TrainManifest, UserError, read
from tests.conftest import REPO
from train.data import DataSpec, load_splits
from train.train import TrainConfig, eval_interval, train


def test_default_split_is_movie_disjoint_and_deterministic():
    a, b = load_splits(DataSpec()), load_splits(DataSpec())
    assert a.describe() == b.describe()
    assert a.label_names == ["fresh", "rotten"]
    movies = {name: set(getattr(a, name)["group"]) for name in ("train", "validation", "test")}
    assert not movies["train"] & movies["test"] and not movies["train"] & movies["validation"]
    assert not movies["validation"] & movies["test"]
    sizes = a.describe()["sizes"]
    assert sum(sizes.values()) == 7403 + 5405 - 0  # every fresh/rotten snippet, no 'plot' rows
    assert 0.08 < sizes["test"] / sum(sizes.values()) < 0.12
    other_seed = load_splits(DataSpec(seed=7))
    assert set(other_seed.test["group"]) != movies["test"]


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_local_files_with_custom_columns(tmp_path, suffix):
    rows = pd.DataFrame(
        {"sentence": [f"text number {i}" for i in range(30)], "topic": ["sport", "music", "politics"] * 10}
    )
    path = tmp_path / f"data.{suffix}"
    rows.to_csv(path, index=False) if suffix == "csv" else rows.to_json(path, orient="records", lines=True)
    splits = load_splits(DataSpec(source=str(path), text_column="sentence", label_column="topic"))
    assert splits.label_names == ["music", "politics", "sport"]
    assert sum(splits.describe()["sizes"].values()) == 30
    assert len(splits.sha256) == 64


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("", "cannot parse data file"),
        ("sentence,label\nhello,a\nworld,b\n", "has no column\\(s\\) text"),
        ("text,label\nhello,a\nworld,a\nagain,a\n", "has a single class"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, content, message):
    path = str(tmp_path / "missing.csv") if content is None else _write(tmp_path, "d.csv", content)
    with pytest.raises(UserError, match=message):
        train(TrainConfig(data=path, output=str(tmp_path / "out")))


def test_unknown_model_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(TrainConfig(model=str(tmp_path / "nope"), output=str(tmp_path / "out")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        train(TrainConfig(model=str(tmp_path / "empty"), output=str(tmp_path / "out")))


def test_cli_prints_one_line_and_exits_non_zero(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--data", str(tmp_path / "x.csv"), "--output", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: data file {tmp_path / 'x.csv'} does not exist"
    bad_flag = subprocess.run(
        [sys.executable, "-m", "train", "--batch-size", "0"], cwd=REPO, capture_output=True, text=True
    )
    assert bad_flag.returncode == 2 and "Traceback" not in bad_flag.stderr
    assert "--batch-size must be >= 1" in bad_flag.stderr
    fractions = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--validation-fraction",
            "0.1",
            "--test-fraction",
            "0.95",
            "--output",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert fractions.returncode == 2 and fractions.stderr == (
        "error: --validation-fraction and --test-fraction must lie in (0, 1) and sum to less than 1, got 0.1 and 0.95\n"
    )


def test_evaluation_interval_fits_the_run():
    assert eval_interval(TrainConfig(), 10225) == 100  # the default run: 640 steps, as before
    assert eval_interval(TrainConfig(), 699) == 8  # 44 steps: 100 would mean no evaluation at all
    assert eval_interval(TrainConfig(max_steps=15), 699) == 3
    assert eval_interval(TrainConfig(eval_steps=10), 699) == 10  # asked for: kept


def _intents_csv(path, rows_per_class: int = 50) -> str:
    """Three intents a few steps can tell apart; the catch-all class is named None."""
    templates = {
        "None": "the weather today is item {}",
        "greeting": "hello there, good morning {}",
        "order": "I want to buy {} pizzas",
    }
    frame = pd.DataFrame(
        [{"utterance": t.format(i), "intent": name} for name, t in templates.items() for i in range(rows_per_class)]
    )
    frame.to_csv(path, index=False)
    return str(path)


def test_kept_model_is_the_best_evaluation_including_the_last_step(tmp_path):
    manifest = train(
        TrainConfig(
            data=_intents_csv(tmp_path / "intents.csv"),
            text_column="utterance",
            label_column="intent",
            output=str(tmp_path / "model"),
            max_steps=15,
            eval_steps=10,
            batch_size=8,
            max_length=32,
            learning_rate=2e-4,
            tensorboard=True,
        )
    )
    evaluations = manifest.train["evaluations"]
    assert [e["step"] for e in evaluations] == [10, 15]  # 15 is no multiple of 10: evaluated as the last step
    at = {e["step"]: e["accuracy"] for e in evaluations}
    assert manifest.train["best_step"] == (15 if at[15] > at[10] else 10)  # a tie keeps the earlier one
    assert manifest.metrics["validation"]["accuracy"] == at[manifest.train["best_step"]]  # that model was kept
    assert manifest.data["label_names"] == ["None", "greeting", "order"]
    test = manifest.metrics["test"]
    assert list(test["per_class"]) == ["None", "greeting", "order"]
    assert test["confusion_matrix"]["labels"] == ["None", "greeting", "order"]
    assert sum(map(sum, test["confusion_matrix"]["matrix"])) == manifest.data["sizes"]["test"] == 15
    runs = list((tmp_path / "runs").iterdir())  # one TensorBoard directory per run, named after it
    assert len(runs) == 1 and runs[0].name.startswith("model-") and any(runs[0].iterdir())


def test_tiny_training_run_end_to_end(tiny_model):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    manifest = read(tiny_model, TrainManifest)
    assert manifest.data["label_names"] == ["fresh", "rotten"] and manifest.model_type == "bert"
    assert manifest.data["sizes"] == {"train": 2048, "validation": 128, "test": 128}
    assert manifest.train["steps"] == 60
    assert set(manifest.metrics["test"]) == {"accuracy", "macro_f1", "per_class", "confusion_matrix"}
    assert set(manifest.metrics["test"]["per_class"]) == {"fresh", "rotten"}
    assert sum(map(sum, manifest.metrics["test"]["confusion_matrix"]["matrix"])) == 128
    assert [e["step"] for e in manifest.train["evaluations"]] == [30, 60]
    assert manifest.data["split"]["method"] == "by movie_name"
    assert (tiny_model / "model.safetensors").is_file()

    # Reload from disk and predict: the reloaded model reproduces the recorded test accuracy.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()
    assert model.config.id2label == {0: "fresh", 1: "rotten"}
    test = load_splits(DataSpec()).test.iloc[:128]
    with torch.no_grad():
        batch = tokenizer(test["text"].tolist(), truncation=True, max_length=64, padding=True, return_tensors="pt")
        preds = model(**batch).logits.argmax(-1).numpy()
    accuracy = float((preds == (test["label"] == "rotten").to_numpy()).mean())
    assert accuracy == pytest.approx(manifest.metrics["test"]["accuracy"], abs=1e-4)
    assert accuracy > 0.65  # 60 steps already learn something

    # The same output directory is not silently replaced.
    with pytest.raises(UserError, match="already holds a trained model; pass --overwrite"):
        train(TrainConfig(output=str(tiny_model)))


def test_lora_trains_few_parameters_and_merges(tmp_path):
    manifest = train(
        TrainConfig(
            output=str(tmp_path / "lora"),
            method="lora",
            max_train_samples=64,
            max_eval_samples=32,
            max_steps=2,
            batch_size=16,
            max_length=32,
        )
    )
    params = manifest.parameters
    assert params["trainable"] < params["total"] * 0.1
    saved = (tmp_path / "lora" / "config.json").read_text()
    assert "lora" not in saved.lower()
    from safetensors import safe_open

    with safe_open(tmp_path / "lora" / "model.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if "lora" in k]

    # The merged weights score what the run recorded, computed as export/ computes it.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from export.evaluate import torch_reference

    splits = load_splits(DataSpec())
    splits.validation, splits.test = splits.validation.iloc[:32], splits.test.iloc[:32]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora").eval()
    reference = torch_reference(model, AutoTokenizer.from_pretrained(tmp_path / "lora"), splits, 32)
    assert reference.test_metrics["accuracy"] == pytest.approx(manifest.metrics["test"]["accuracy"], abs=0.001)
