"""The one error type every stage raises for bad input, and the CLI wrapper that prints it.

A ``UserError`` is a problem the user can fix (a missing file, a bad flag value); its
message says what was expected, what was found and how to fix it.  Every stage's
``main`` runs under :func:`run_cli`, which turns it into one line on stderr and exit
status 2 instead of a traceback.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input or configuration, reported as one line without a traceback."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
