"""sha256 of a file, read in 1 MiB blocks.

Shared by train/ (the data fingerprint in the manifest) and export/ (every variant file,
which serve/ checks again at start), so it lives here without train/data.py's pandas.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
