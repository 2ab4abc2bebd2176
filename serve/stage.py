"""Stage the selected variant for a bento: the one variant, a manifest of it, a selection of it.

    python -m serve stage --selected artifacts/selected.json --output artifacts/bento

writes ``OUTPUT/<variant>/`` (a copy of the variant directory), ``OUTPUT/manifest.json`` (the
manifest with that variant only) and ``OUTPUT/selected.json`` (pointing at it by relative path
and sha256), after checking every file against the sha256 export/ recorded.  The bento then
carries one model, and ``TRIMSERVE_SELECTED=OUTPUT/selected.json`` serves it from wherever
the bento is unpacked.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

from serve.contract import Selection, UserError, VariantsManifest, read, sha256_file, write


def stage(selected: Path, output: Path) -> Path:
    """Copy the selection's verified variant under ``output``; returns the new selection file.

    Raises UserError if the selection does not verify, or if ``output`` exists and is not an
    earlier staging (it never deletes what it did not write).
    """
    selection = read(selected, Selection)
    manifest, entry, _ = selection.resolve()
    output = output.resolve()
    if output.exists() and any(output.iterdir()) and not (output / Selection.FILE).is_file():
        raise UserError(f"--output {output} holds other files, not a staged variant; choose an empty or new directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".stage-", dir=output.parent))
    try:
        shutil.copytree(manifest.directory(entry), staging / entry.name)
        only = dataclasses.replace(manifest, variants=[dataclasses.replace(entry, path=entry.name)])
        write(staging / VariantsManifest.FILE, only)
        write(
            staging / Selection.FILE,
            dataclasses.replace(
                selection, manifest=VariantsManifest.FILE, manifest_sha256=sha256_file(staging / VariantsManifest.FILE)
            ),
        )
        read(staging / Selection.FILE, Selection).resolve()  # the staged copy verifies as the original did
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"staged {entry.name} ({len(entry.files)} files, sha256-verified) in {output}")
    return output / Selection.FILE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other bad input
        raise UserError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="python -m serve stage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--selected", default="artifacts/selected.json", help="selection file written by perf/")
    parser.add_argument(
        "--output", default="artifacts/bento", help="directory to stage into (replaced if staged before)"
    )
    args = parser.parse_args(argv)
    stage(Path(args.selected), Path(args.output))
