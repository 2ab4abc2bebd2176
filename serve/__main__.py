"""``python -m serve [bentoml serve options]``: serve the selected variant.

The same as ``bentoml serve serve.service:Classifier``; the service reads its settings from
``TRIMSERVE_*`` variables, listed by ``python -m serve --help``.

``python -m serve hash-key`` reads a key on stdin and prints the ``sha256:<hex>`` line to put
in the keys file instead of the key itself.
"""

import os
import sys
from dataclasses import fields

from serve.config import ServeConfig, env_name

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        for f in fields(ServeConfig):
            default = "" if f.default in (None, ()) else f" (default: {f.default})"
            print(f"  {env_name(f.name):34} {f.metadata.get('help', '')}{default}")
        sys.exit(0)
    if sys.argv[1:] == ["hash-key"]:
        from serve.auth import digest

        key = sys.stdin.readline().strip()
        if not key:
            sys.exit("trimserve: no key on stdin; e.g. python -m serve hash-key < key.txt")
        print(digest(key))
        sys.exit(0)
    os.execvp(sys.executable, [sys.executable, "-m", "bentoml", "serve", "serve.service:Classifier", *sys.argv[1:]])
