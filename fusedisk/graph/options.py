"""Declared options of a driver: their types, defaults, and how they are checked.

A driver lists its options once; the same declaration validates the spec,
renders `options/<name>` in the mount, parses a run-time write to it and
redacts secrets.  Values come either from TOML (already typed) or from a
control-file write (text), so each kind parses both.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SIZE_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtpeb]?)(?:i?b)?\s*$", re.IGNORECASE)


class OptionValueError(ValueError):
    """A value does not fit its option; the message completes 'option X: ...'."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def parse_size(value: Any) -> int:
    """A byte count: an integer, or text such as '64K', '1M', '10G' (QEMU's suffixes)."""
    if isinstance(value, bool):
        raise OptionValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_SUFFIXES[m.group(2).lower()]
    raise OptionValueError(f"expected a size such as 4096 or '64K', got {value!r}")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise OptionValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 0)
        except ValueError:
            pass
    raise OptionValueError(f"expected an integer, got {value!r}")


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise OptionValueError(f"expected a number, got {value!r}")
    number: float | None = None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value.strip())
    if number is None or not math.isfinite(number):  # nan passes every range check
        raise OptionValueError(f"expected a finite number, got {value!r}")
    return number


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "on", "yes"):
            return True
        if text in ("0", "false", "off", "no"):
            return False
    raise OptionValueError(f"expected true or false, got {value!r}")


def _parse_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise OptionValueError(f"expected a string, got {value!r}")


def _parse_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return list(value)
    raise OptionValueError(f"expected a list, got {value!r}")


def _parse_table(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    raise OptionValueError(f"expected a table, got {value!r}")


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "int": _parse_int,
    "size": parse_size,
    "float": _parse_float,
    "bool": _parse_bool,
    "str": _parse_str,
    "path": _parse_str,
    "list": _parse_list,  # checked further by the driver (rbd's `server`)
    "table": _parse_table,  # likewise (rbd's `rados-options`)
}


@dataclass(frozen=True)
class Option:
    """One option of a driver.

    `runtime` options may be changed by writing `options/<name>` in the mount;
    the node is told through `Node.set_option`.  `secret` ones are never shown.
    `path` options are resolved against the spec file's folder.
    """

    name: str
    kind: str = "str"
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    runtime: bool = False
    secret: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _PARSERS:
            raise TypeError(f"option {self.name}: unknown kind {self.kind!r}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def parse(self, value: Any, base: Path | None = None) -> Any:
        """Check and convert `value`; raises OptionValueError with the reason."""
        parsed = _PARSERS[self.kind](value)
        if self.choices is not None and parsed not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            raise OptionValueError(f"expected one of {allowed}, got {value!r}")
        if self.minimum is not None and parsed < self.minimum:
            raise OptionValueError(f"must be at least {_bound(self.minimum)}, got {value!r}")
        if self.maximum is not None and parsed > self.maximum:
            raise OptionValueError(f"must be at most {_bound(self.maximum)}, got {value!r}")
        if self.kind == "path" and base is not None:
            parsed = str((base / parsed) if not Path(parsed).is_absolute() else Path(parsed))
        return parsed

    def render(self, value: Any) -> str:
        """The text of `options/<name>`: what a reader would write back."""
        if self.secret:
            return "<redacted>" if value is not None else ""
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


def option_table(*options: Option) -> Mapping[str, Option]:
    """A driver's option declarations, by name, in declaration order."""
    return {o.name: o for o in options}


def _bound(limit: float) -> str:
    """A limit as people write it: 4294967295, not 4.29497e+09."""
    return str(int(limit)) if float(limit).is_integer() else f"{limit:g}"
