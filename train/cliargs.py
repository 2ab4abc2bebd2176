"""Map a config dataclass onto argparse flags, one flag per field.

Each stage keeps one typed config (``TrainConfig``, ``ExportConfig``...).  This module
derives the command line from it so that a flag and a field can never drift apart:
``max_steps`` becomes ``--max-steps``, a ``bool`` becomes ``--x/--no-x``, a ``Literal``
becomes a choice list, and the field's ``metadata["help"]`` is the flag's help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

from serve.contract import UserError

T = TypeVar("T")


class ConfigParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``UserError``), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (defaults stay in the dataclass)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.metadata.get("cli") is False:
            continue
        tp = _unwrap_optional(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        help_text = field.metadata.get("help", "")
        if default is not None and default != "":
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is Literal:
            parser.add_argument(flag, choices=typing.get_args(tp), **kwargs)
        elif typing.get_origin(tp) in (list, tuple):
            item = typing.get_args(tp)[0]
            parser.add_argument(flag, type=item, nargs="+", **kwargs)
        else:
            parser.add_argument(flag, type=tp, metavar=field.name.upper(), **kwargs)


def config_from_args(cls: type[T], namespace: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from the flags that were given; unset flags keep the dataclass default."""
    values = {
        f.name: getattr(namespace, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if getattr(namespace, f.name, None) is not None
    }
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    values.update(overrides)
    return cls(**values)
