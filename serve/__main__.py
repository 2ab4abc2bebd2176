"""``python -m serve [bentoml serve options]``: serve the selected variant.

The same as ``bentoml serve serve.service:Classifier``; the service reads its settings from
``TRIMSERVE_*`` variables, listed by ``python -m serve --help``.

``python -m serve hash-key`` reads a key on stdin and prints the ``sha256:<hex>`` line to put
in the keys file instead of the key itself.

``python -m serve stage [--selected S] [--output DIR]`` copies the selected variant, verified,
into DIR for ``bentoml build`` (``make bento`` runs it).
"""

import os
import sys
from dataclasses import fields

from serve.config import ServeConfig, env_name
from serve.contract import run_cli

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["stage"]:
        from serve.stage import main

        run_cli(main, args[1:])
        sys.exit(0)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        for f in fields(ServeConfig):
            default = "" if f.default in (None, ()) else f" (default: {f.default})"
            print(f"  {env_name(f.name):34} {f.metadata.get('help', '')}{default}")
        sys.exit(0)
    if args == ["hash-key"]:
        from serve.auth import digest

        key = sys.stdin.readline().strip()
        if not key:
            print("trimserve: no key on stdin; e.g. python -m serve hash-key < key.txt", file=sys.stderr)
            sys.exit(2)
        print(digest(key))
        sys.exit(0)
    os.execvp(sys.executable, [sys.executable, "-m", "bentoml", "serve", "serve.service:Classifier", *args])
