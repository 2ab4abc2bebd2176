"""The artifacts contract: what the stages hand over on disk, and how bad input is reported.

Every stage imports this module and it imports no stage (stdlib and the standard library's
``json`` only), so it can ship inside the bento with serve/ and nothing else.

The hand-over files, each a typed record with a ``kind`` and a ``version``:

  model dir     ``train_manifest.json``  :class:`TrainManifest`, written by train/
  variants dir  ``manifest.json``        :class:`VariantsManifest`, written by export/: one
                                         :class:`VariantEntry` per variant (status and file
                                         hashes only)
  variant dir   ``variant.json``         :class:`VariantRecord`: everything about one variant
                                         (labels, max length, recipe, check, metrics); it
                                         travels with the variant and is the one owner of
                                         those facts
  anywhere      ``selected.json``        :class:`Selection`, written by perf/: which variant
                                         of which manifest (by sha256) to serve, and why

:func:`read` checks kind, version and fields and says in one line what is wrong;
:func:`write` replaces a file atomically.  :class:`UserError` is the one error type for
input a user can fix, and :func:`run_cli` turns it into one line on stderr and exit 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

TRAIN_MANIFEST = "train_manifest.json"
VARIANTS_MANIFEST = "manifest.json"
VARIANT_RECORD = "variant.json"
SELECTION = "selected.json"
MODEL_FILE = "model.onnx"
# What OnnxClassifier reads from a variant directory: each must have a recorded sha256.
SERVED_FILES = frozenset({MODEL_FILE, VARIANT_RECORD, "tokenizer.json"})


class UserError(Exception):
    """Bad input or configuration, reported as one line without a traceback.

    The message says what was expected, what was found and how to fix it.  Anything else
    raised is a bug and keeps its traceback.
    """


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a stage's ``main``: a UserError becomes ``error: ...`` on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


# --- files and their hashes ---------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def describe_files(directory: Path, names: list[str] | None = None) -> dict[str, dict]:
    """``{name: {"bytes": int, "sha256": hex}}`` for ``names`` (default: every file in ``directory``)."""
    paths = [directory / n for n in names] if names else sorted(p for p in directory.iterdir() if p.is_file())
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths if p.is_file()}


def verify_files(directory: Path, files: dict[str, dict]) -> list[str]:
    """Names of the files in ``files`` that are missing from ``directory`` or whose sha256 differs.

    Returns e.g. ``["model.onnx (sha256 mismatch)", "tokenizer.json (missing)"]``; empty when all match.
    """
    bad = []
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif sha256_file(path) != info["sha256"]:
            bad.append(f"{name} (sha256 mismatch)")
    return bad


# --- records --------------------------------------------------------------------------------


@dataclass
class Record:
    """A JSON hand-over file: subclasses name their ``KIND``, ``VERSION``, file name and who writes it."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    FILE: ClassVar[str] = ""
    WRITER: ClassVar[str] = ""  # the command that (re)writes it, for error messages

    def to_json(self) -> dict:
        assert not {"kind", "version"} & {f.name for f in dataclasses.fields(self)}, "reserved field names"
        return {"kind": self.KIND, "version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, source: str = "record") -> Record:
        """The record from parsed JSON; UserError naming ``source`` if it is not this kind of record."""
        if not isinstance(data, dict) or data.get("kind") != cls.KIND:
            found = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{source} is not a {cls.KIND} record (kind {found!r}); {cls.WRITER} writes one")
        if data.get("version") != cls.VERSION:
            raise UserError(
                f"{source} has version {data.get('version')!r} of {cls.KIND}, this trimserve reads "
                f"version {cls.VERSION}; re-run {cls.WRITER}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k not in ("kind", "version")}
        unknown = sorted(set(values) - set(fields))
        missing = sorted(n for n, f in fields.items() if n not in values and _required(f))
        if unknown or missing:
            what = "; ".join(
                p
                for p in (missing and f"missing {', '.join(missing)}", unknown and f"unexpected {', '.join(unknown)}")
                if p
            )
            raise UserError(f"{source} is not a valid {cls.KIND} record ({what}); re-run {cls.WRITER}")
        return cls._convert(values)

    @classmethod
    def _convert(cls, values: dict) -> Record:
        return cls(**values)

    def _read_from(self, path: Path) -> None:
        """Called by :func:`read`; records holding relative paths remember where they came from."""


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


R = TypeVar("R", bound=Record)


def read(path: str | Path, cls: type[R]) -> R:
    """Read a record of type ``cls`` from ``path`` (a directory means its ``cls.FILE``).

    Raises UserError, in one line, if the file is missing, is not JSON, or is not a valid
    record of that kind and version.  ``VariantsManifest`` and ``Selection`` remember where
    they were read from (``.root``, ``.path``) to resolve the relative paths they hold.
    """
    path = Path(path)
    if path.is_dir():
        path = path / cls.FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; {cls.WRITER} writes it")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"{path} is not valid JSON ({reason}); re-run {cls.WRITER}") from None
    record = cls.from_json(data, str(path))
    record._read_from(path)
    return record


def write(path: str | Path, record: Record) -> Path:
    """Write ``record`` as JSON to ``path`` atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class TrainManifest(Record):
    """``train_manifest.json`` in a model directory: how the model was trained and how it scored.

    The model's labels are its ``config.json``'s ``id2label``; ``max_length`` (tokens) is the
    truncation length used in training, which export/ gives every variant.
    """

    KIND: ClassVar[str] = "trimserve.model"
    FILE: ClassVar[str] = TRAIN_MANIFEST
    WRITER: ClassVar[str] = "`python -m train`"

    base_model: str
    base_model_path: str
    model_type: str
    method: str  # "full" or "lora"
    # the split description (train.data.Splits.describe): rebuilds the same splits; "rows" counts what was
    # read and dropped by reason, "split" says how the split was made, with a fingerprint per split
    data: dict
    max_length: int
    seed: int
    hyperparameters: dict
    parameters: dict  # {"total": int, "trainable": int}
    # {"validation": {...}, "test": {...}}: accuracy, macro_f1, per_class (precision, recall, f1, support
    # per class name) and confusion_matrix ({"labels", "matrix": rows true, columns predicted})
    metrics: dict
    # {"seconds", "steps", "loss", "threads", "eval_steps", "best_step" (the step of the model kept),
    # "evaluations": [{"step", "accuracy", "macro_f1"}]}
    train: dict
    versions: dict
    created: str


@dataclass
class VariantRecord(Record):
    """``variant.json`` in a variant directory: the one owner of what serving needs to know.

    ``labels`` are in the model's output order (index i is logit i); ``max_length`` is the
    truncation length in tokens; ``inputs`` the ONNX graph's input names; ``pad_token_id``
    the id that pads a batch (0 for BERT's WordPiece, 1 for RoBERTa's BPE).
    """

    KIND: ClassVar[str] = "trimserve.variant"
    FILE: ClassVar[str] = VARIANT_RECORD
    WRITER: ClassVar[str] = "`python -m export`"

    name: str
    precision: str  # fp32 | optimized (fused fp32) | fp16 | int8: picks the tolerance of its numerical check
    source: str | None  # the variant it was built from
    description: str
    labels: list[str]
    max_length: int
    inputs: list[str]
    pad_token_id: int
    recipe: dict  # how it was built (tool, configuration)
    check: dict  # numerical check against its PyTorch model (label agreement, max |dlogit|)
    metrics: dict  # {"validation": {...}, "test": {...}}: the keys of TrainManifest.metrics
    provider: str  # ONNX Runtime execution provider the check ran on
    build_seconds: float
    pruning: dict | None = None  # what structure was removed (pruned recipes only)
    # Whether a text's probabilities depend on what shares its model call (export.evaluate.batch_invariance):
    # {"texts", "batches", "max_abs_prob_diff", "label_flips", "invariant", "tolerance"}; None: not measured
    # (records written before it was).  serve/ runs a variant that is not invariant one text per model call.
    batch_invariance: dict | None = None


@dataclass
class VariantEntry:
    """One variant in the manifest: where it is, whether to use it, and its files' hashes.

    ``status`` is ``ok`` (checked; the only kind perf/ and serve/ use), ``failed`` (its build
    or check failed: ``error`` says why) or ``skipped`` (the recipe does not apply: ``error``
    says why).  ``path`` is relative to the manifest's directory; ``files`` maps each file
    name to ``{"bytes": int, "sha256": hex}``.
    """

    name: str
    status: str
    path: str
    files: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class VariantsManifest(Record):
    """``manifest.json`` in a variants directory: every variant export/ built, and from what."""

    KIND: ClassVar[str] = "trimserve.variants"
    FILE: ClassVar[str] = VARIANTS_MANIFEST
    WRITER: ClassVar[str] = "`python -m export`"

    model: dict  # {"path", "model_type", "files", "train": summary of the train manifest or None}
    data: dict  # the split description the variants were checked and scored on
    config: dict
    machine: dict
    isa: str
    pytorch: dict  # the fine-tuned model's own metrics: {"validation": {...}, "test": {...}}
    variants: list[VariantEntry]
    seconds: float
    created: str

    @classmethod
    def _convert(cls, values: dict) -> VariantsManifest:
        try:
            variants = [VariantEntry(**v) for v in values["variants"]]
        except TypeError as err:
            raise UserError(f"a variant entry of the manifest is not valid ({err}); re-run {cls.WRITER}") from None
        return cls(**{**values, "variants": variants})

    def _read_from(self, path: Path) -> None:
        self.root = path.parent

    def ok(self) -> list[VariantEntry]:
        """The variants that passed their check, in build order."""
        return [v for v in self.variants if v.status == "ok"]

    def entry(self, name: str) -> VariantEntry:
        """The ok variant called ``name``; UserError listing the ok ones if there is none."""
        found = next((v for v in self.ok() if v.name == name), None)
        if found is None:
            raise UserError(
                f"{name!r} is not an ok variant of {self.root / self.FILE}; "
                f"choose one of {', '.join(v.name for v in self.ok()) or '(none)'}"
            )
        return found

    def directory(self, entry: VariantEntry) -> Path:
        return self.root / entry.path

    def load(self, entry: VariantEntry, directory: Path | None = None) -> VariantRecord:
        """The variant's record, after checking every one of its files against the manifest's sha256.

        ``directory`` defaults to where the manifest says the variant is.  Raises UserError naming
        the missing or changed files.
        """
        directory = directory or self.directory(entry)
        unlisted = sorted(SERVED_FILES - set(entry.files))
        if unlisted:
            raise UserError(
                f"{self.root / self.FILE} records no sha256 for {', '.join(unlisted)} of {entry.name}; "
                f"re-run {self.WRITER}"
            )
        bad = verify_files(directory, entry.files)
        if bad:
            raise UserError(
                f"variant {entry.name} in {directory} does not match {self.root / self.FILE}: "
                f"{', '.join(bad)}; re-run {self.WRITER}"
            )
        return read(directory, VariantRecord)


@dataclass
class Selection(Record):
    """``selected.json``: the variant to serve, the manifest it belongs to (by sha256), and why.

    ``manifest`` is a path relative to the selection file's directory (or absolute).
    ``rule`` says how the variant was chosen; ``figures`` what perf/ measured for it.
    """

    KIND: ClassVar[str] = "trimserve.selection"
    FILE: ClassVar[str] = SELECTION
    WRITER: ClassVar[str] = "`python -m perf`"

    variant: str
    manifest: str
    manifest_sha256: str
    rule: dict
    figures: dict = field(default_factory=dict)

    def _read_from(self, path: Path) -> None:
        self.path = path

    def resolve(self) -> tuple[VariantsManifest, VariantEntry, VariantRecord]:
        """The manifest (checked against ``manifest_sha256``), the variant's entry and its verified record."""
        path = Path(self.manifest)
        if not path.is_absolute():
            path = self.path.parent / path
        manifest = read(path, VariantsManifest)
        if sha256_file(manifest.root / VariantsManifest.FILE) != self.manifest_sha256:
            raise UserError(
                f"{self.path} was made for another {path} (sha256 differs): the variants were re-exported "
                f"since; re-run {self.WRITER}"
            )
        entry = manifest.entry(self.variant)
        return manifest, entry, manifest.load(entry)
