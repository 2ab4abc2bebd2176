"""Loading that loses nothing and splits that do not leak (train/data.py), on small hand-made files."""

from __future__ import annotations

import bz2
import gzip
import json
import time

import numpy as np
import pandas as pd
import pytest

from serve.contract import UserError
from train.data import SPLITS, DataSpec, check_rebuilt, load_splits
from train.scoring import score

# An intent-recognition export: the catch-all class is called None, and one text is literally NA.
# pandas' defaults read both as missing: 48 of these 84 rows and the None class used to vanish.
INTENTS = pd.DataFrame(
    {
        "text": ["NA", "null", "N/A"] + [f"utterance number {i}" for i in range(81)],
        "label": ["None"] * 35 + ["greeting"] * 25 + ["order"] * 24,
    }
)


def _write(frame: pd.DataFrame, path) -> str:
    name = str(path)
    if ".jsonl" in name:
        text = "".join(json.dumps(r) + "\n" for r in frame.to_dict(orient="records"))
    elif ".json" in name:
        text = json.dumps(frame.to_dict(orient="records"))
    else:
        text = frame.to_csv(index=False, sep="\t" if ".tsv" in name else ",")
    opener = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else open
    with opener(name, "wt") as fh:
        fh.write(text)
    return name


def _texts(splits) -> dict[str, set[str]]:
    return {name: set(getattr(splits, name)["text"]) for name in SPLITS}


@pytest.mark.parametrize("name", ["intents.csv", "intents.tsv", "intents.jsonl", "intents.csv.gz", "intents.jsonl.bz2"])
def test_intents_keep_the_none_class_and_the_na_text(tmp_path, name, capsys):
    splits = load_splits(DataSpec(source=_write(INTENTS, tmp_path / name)))
    assert splits.label_names == ["None", "greeting", "order"]
    assert sum(splits.describe()["sizes"].values()) == 84
    assert splits.report["rows"]["dropped"] == {"empty text": 0, "missing label": 0, "duplicate text": 0}
    assert {"NA", "null", "N/A"} <= set().union(*_texts(splits).values())
    assert "dropped" not in capsys.readouterr().err  # nothing dropped, nothing said


@pytest.mark.parametrize("name", ["labels.csv", "labels.jsonl"])
def test_integer_labels_with_a_blank_stay_integers_and_the_row_is_counted(tmp_path, name, capsys):
    rows = [{"text": f"sentence {i}", "label": i % 2} for i in range(30)]
    rows[7]["label"] = None  # a blank cell in the CSV, null in the JSONL
    splits = load_splits(DataSpec(source=_write(pd.DataFrame(rows, dtype=object), tmp_path / name)))
    assert splits.label_names == ["0", "1"]
    assert splits.report["rows"]["dropped"]["missing label"] == 1 and splits.report["rows"]["kept"] == 29
    assert f"data: dropped 1 of 30 rows of {tmp_path / name}: 1 missing label" in capsys.readouterr().err


def test_float_labels_are_an_error_not_new_class_names(tmp_path):
    path = tmp_path / "floats.jsonl"
    path.write_text('{"text": "a", "label": 1.0}\n{"text": "b", "label": 0.0}\n{"text": "c", "label": NaN}\n')
    with pytest.raises(
        UserError, match=r"label column label of .* holds floating-point numbers \(0.0, 1.0\) and 1 blank"
    ):
        load_splits(DataSpec(source=str(path)))


def test_a_class_that_loses_all_its_rows_is_an_error(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(20)] + ["", " ", ""], "label": ["a", "b"] * 10 + ["c"] * 3})
    with pytest.raises(UserError, match=r"class\(es\) 'c' of .* lost all their rows \(3 empty text\)"):
        load_splits(DataSpec(source=_write(frame, tmp_path / "d.csv")))


def test_duplicate_texts_never_cross_splits(tmp_path, capsys):
    texts = [f"review {i % 40}" for i in range(100)]  # 40 texts, 60 repeats
    labels = ["pos" if i % 40 < 20 else "neg" for i in range(100)]
    labels[99] = "pos"  # text 19 has "pos" already: a repeat with the same label; text 39 below differs
    labels[79] = "pos"  # "review 39" is neg first: a repeat with another label
    splits = load_splits(DataSpec(source=_write(pd.DataFrame({"text": texts, "label": labels}), tmp_path / "d.csv")))
    seen = _texts(splits)
    assert not (seen["train"] & seen["test"] or seen["train"] & seen["validation"] or seen["validation"] & seen["test"])
    rows = splits.report["rows"]
    assert rows["kept"] == 40 and rows["dropped"]["duplicate text"] == 60 and rows["duplicates_with_other_label"] == 1
    err = capsys.readouterr().err
    assert "dropped 60 of 100 rows" in err and "(1 of those repeats had another label than the kept copy)" in err


def test_random_split_is_stratified_and_says_how_it_was_made(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(200)], "label": ["big"] * 180 + ["rare"] * 20})
    spec = DataSpec(source=_write(frame, tmp_path / "d.csv"), validation_fraction=0.2, test_fraction=0.15)
    splits = load_splits(spec)
    split = splits.describe()["split"]
    assert split["method"] == "random by row, stratified by label"
    assert split["requested"] == {"train": 0.65, "validation": 0.2, "test": 0.15}
    assert split["fractions"] == {"train": 0.65, "validation": 0.2, "test": 0.15}
    assert [int((getattr(splits, s)["label"] == "rare").sum()) for s in SPLITS] == [13, 4, 3]
    assert "split random by row, stratified by label: 65.0/20.0/15.0 % of rows (requested 65/20/15)" in (
        splits.summary()
    )
    assert load_splits(spec).describe() == splits.describe()  # deterministic from the seed


def test_a_class_too_small_for_every_split_is_an_error(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(32)], "label": ["a"] * 30 + ["rare"] * 2})
    with pytest.raises(UserError, match=r"class 'rare' has 2 row\(s\); train, test and validation each need one"):
        load_splits(DataSpec(source=_write(frame, tmp_path / "d.csv")))


def test_grouped_split_with_four_unequal_groups_warns_and_reports_fractions(tmp_path, capsys):
    sizes = {"VP": 520, "1st": 325, "3rd": 166, "2nd": 111}  # the 2016 debates' statements per debate
    frame = pd.DataFrame(
        [{"text": f"{g} statement {i}", "label": "ab"[i % 2], "debate": g} for g, n in sizes.items() for i in range(n)]
    )
    splits = load_splits(DataSpec(source=_write(frame, tmp_path / "d.csv"), group_column="debate"))
    split = splits.describe()["split"]
    assert split["method"] == "by debate" and split["fill"] == "every assignment tried"
    assert split["groups"] == {"train": 2, "validation": 1, "test": 1}
    assert split["fractions"]["train"] == 0.7531  # VP + 1st: the closest any assignment gets to 80 %
    assert sorted([split["fractions"]["validation"], split["fractions"]["test"]]) == [0.0989, 0.148]
    assert "far from the requested 80/10/10 %" in split["warning"]
    assert "warning: the split by debate (4 groups) gives train 75.3 %" in capsys.readouterr().err
    groups = {name: set(getattr(splits, name)["group"]) for name in SPLITS}
    assert not (groups["train"] & groups["test"] or groups["validation"] & groups["test"])


def test_grouped_split_close_to_the_fractions_keeps_the_random_fill(tmp_path, capsys):
    frame = pd.DataFrame(
        [{"text": f"g{g} t{i}", "label": "ab"[i % 2], "g": str(g)} for g in range(60) for i in range(5 + g % 4)]
    )
    split = load_splits(DataSpec(source=_write(frame, tmp_path / "d.csv"), group_column="g")).describe()["split"]
    assert split["fill"] == "random" and "warning" not in split
    assert "warning" not in capsys.readouterr().err


def test_fractions_are_checked(tmp_path):
    with pytest.raises(UserError, match="--validation-fraction and --test-fraction must lie in"):
        load_splits(DataSpec(validation_fraction=0.5, test_fraction=0.5))


def test_default_split_is_unchanged():
    """The rotten-tomatoes split every README figure was measured on: same rows, same order, same groups."""
    splits = load_splits(DataSpec())
    info = splits.describe()
    assert info["sizes"] == {"train": 10225, "validation": 1301, "test": 1282}
    assert info["split"]["sha256"] == {  # recorded before issue 14's loading changes
        "train": "407e30cc51d19ba63bf25b820fd7350663c4ed99e1e79c64ef45520cea84b02f",
        "validation": "897160e53610fe222bee7ceda39fc722285065542b94b3f2bac2d4e4eb8f2aa4",
        "test": "23bab4140b5e893163d20bd8d9485e2d43a0b5a916a08b87b7412630b5b81473",
    }
    assert info["groups_per_split"] == {"train": 405, "validation": 54, "test": 49}
    assert info["test_groups_sha256"] == "39235931edea66b33f9a6083a6faf58b0eca917ff62157c616c603bd3106cc77"
    # The default data keeps its 56 repeated snippets (same movie, so the same split): none crosses.
    assert info["deduplicate"] is False and info["rows"]["repeated_texts_kept"] == 56
    seen = _texts(splits)
    assert not (seen["train"] & seen["test"] or seen["train"] & seen["validation"] or seen["validation"] & seen["test"])
    check_rebuilt(splits, info)
    changed = {**info, "split": {**info["split"], "sha256": {**info["split"]["sha256"], "test": "0" * 64}}}
    with pytest.raises(UserError, match="the test split\\(s\\) rebuilt from rotten-tomatoes differ"):
        check_rebuilt(splits, changed)


# --- datasets: official splits, local stand-ins for the hub ---------------------------------------


def test_saved_dataset_keeps_its_official_splits(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    train = {"text": [f"train text {i}" for i in range(40)] + ["shared"], "label": [i % 2 for i in range(41)]}
    test = {"text": [f"test text {i}" for i in range(9)] + ["shared"], "label": [i % 2 for i in range(10)]}
    unlabelled = {"text": ["u1", "u2"], "label": [-1, -1]}
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(train, features=features),
            "test": datasets.Dataset.from_dict(test, features=features),
            "unsupervised": datasets.Dataset.from_dict(unlabelled, features=features),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    splits = load_splits(DataSpec(source=str(tmp_path / "saved")))
    assert splits.label_names == ["neg", "pos"]  # ClassLabel ids read as their names
    split = splits.describe()["split"]
    assert (
        split["method"]
        == "official splits (train, test); validation carved from train, random by row, stratified by label"
    )
    assert split["official"] == ["train", "test"]
    assert split["ignored"] == ["unsupervised (not a train, validation or test split)"]
    assert len(splits.test) == 10  # the official test split, whole
    assert "shared" in set(splits.test["text"]) and "shared" not in set(splits.train["text"])  # its copy left train
    assert len(splits.train) + len(splits.validation) == 40


def test_split_files_in_a_directory_and_nullable_integer_labels(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(30)], "label": [i % 2 for i in range(29)] + [None]}
    )
    assert ds.features["label"].dtype == "int64"  # Arrow keeps ints with a null; pandas would make floats
    ds.save_to_disk(str(tmp_path / "one"))
    splits = load_splits(DataSpec(source=str(tmp_path / "one")))
    assert splits.label_names == ["0", "1"] and splits.report["rows"]["dropped"]["missing label"] == 1
    assert splits.describe()["split"]["method"] == "random by row, stratified by label"  # one split: split like a file

    folder = tmp_path / "files"
    folder.mkdir()
    _write(INTENTS.iloc[::2], folder / "train.csv")
    _write(INTENTS.iloc[1::4], folder / "dev.csv")
    _write(INTENTS.iloc[3::4], folder / "test.jsonl")
    splits = load_splits(DataSpec(source=str(folder)))
    assert splits.describe()["split"]["method"] == "official splits (train, validation, test)"
    assert [len(getattr(splits, s)) for s in SPLITS] == [42, 21, 21]
    assert splits.label_names == ["None", "greeting", "order"]


def test_mistyped_hub_name_fails_fast_and_says_it_was_taken_for_one(monkeypatch):
    started = time.perf_counter()
    with pytest.raises(
        UserError,
        match=r"'debates.cvs' is not a file or directory here, so it was taken for a Hugging Face hub dataset "
        r"name, and it is not in the local datasets cache \(offline mode is on \(HF_HUB_OFFLINE\)\)",
    ):
        load_splits(DataSpec(source="debates.cvs"))
    # Not offline, but the hub cannot be reached: one quick probe, then the local cache only.
    import datasets
    from huggingface_hub import constants

    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(UserError, match=r"https://127.0.0.1:9 cannot be reached"):
        load_splits(DataSpec(source="someone/no-such-dataset"))
    assert time.perf_counter() - started < 15  # the hub client alone retries for ~25 s


def test_score_has_per_class_figures_and_a_confusion_matrix():
    logits = np.eye(3)[[0, 0, 1, 1, 0, 2]]
    result = score(logits, ["a", "a", "b", "b", "b", "a"], ["a", "b", "c"])
    assert result["accuracy"] == 0.66667
    assert result["per_class"]["a"] == {"precision": 0.66667, "recall": 0.66667, "f1": 0.66667, "support": 3}
    assert result["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert result["confusion_matrix"] == {"labels": ["a", "b", "c"], "matrix": [[2, 0, 1], [1, 2, 0], [0, 0, 0]]}
