"""The variants manifest: the file export/ writes and perf/ and serve/ read.

``artifacts/variants/manifest.json`` lists every variant with its status, recipe, checks,
metrics and the sha256 of each of its files.  Readers only ever use variants whose status
is "ok", and verify file hashes before trusting a variant.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.checksum import sha256_file

MANIFEST = "manifest.json"
VARIANT_FILE = "variant.json"


def describe_files(directory: Path, names: list[str] | None = None) -> dict[str, dict]:
    """Size and sha256 of each file (all files in ``directory`` when ``names`` is None)."""
    paths = [directory / n for n in names] if names else sorted(p for p in directory.iterdir() if p.is_file())
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths if p.is_file()}


def load_manifest(path: Path) -> dict:
    """Read a variants manifest, or explain what is wrong with it."""
    from train.errors import UserError

    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise UserError(f"variants manifest {path} does not exist; run `python -m export` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}); re-run `python -m export`") from None
    if manifest.get("kind") != "trimserve.variants":
        raise UserError(f"{path} is not a trimserve variants manifest")
    manifest["_root"] = str(path.parent)
    return manifest


def ok_variants(manifest: dict) -> list[dict]:
    return [v for v in manifest["variants"] if v["status"] == "ok"]


def variant_dir(manifest: dict, variant: dict) -> Path:
    return Path(manifest["_root"]) / variant["path"]


def verify_files(directory: Path, files: dict[str, dict]) -> list[str]:
    """Names of the files that are missing or whose sha256 differs from the manifest."""
    bad = []
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif sha256_file(path) != info["sha256"]:
            bad.append(f"{name} (sha256 mismatch)")
    return bad
