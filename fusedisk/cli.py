"""The `fusedisk` command line: one sub-command per module in fusedisk.commands.

Each module there defines `register(subparsers)` which adds its parser and
sets `func` (taking the parsed arguments, returning an exit status).  A new
command is a new file; nothing here changes.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import fusedisk
import fusedisk.commands
from fusedisk.errors import FuseDiskError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedisk",
        description="Virtual disks built from trees of block nodes, served through FUSE.",
    )
    parser.add_argument("--version", action="version", version=f"fusedisk {fusedisk.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(fusedisk.commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"fusedisk.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FuseDiskError as e:
        print(f"fusedisk: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
