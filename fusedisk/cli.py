"""The `fusedisk` command line: one sub-command per module in fusedisk.commands.

Each module there defines `register(subparsers)` which adds its parser and
sets `func` (taking the parsed arguments, returning an exit status).  A new
command is a new file; nothing here changes.

One more form, for fstab: mount.fuse3 runs `fusedisk SPEC MOUNTPOINT -o OPTS`,
which is `fusedisk mount` with its options as mount options
(fusedisk/service/fstab.py).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import fusedisk
import fusedisk.commands
from fusedisk.errors import FuseDiskError
from fusedisk.service.fstab import helper_argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedisk",
        description="Virtual disks built from trees of block nodes, served through FUSE.",
    )
    parser.add_argument("--version", action="version", version=f"fusedisk {fusedisk.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(fusedisk.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # a command's helper module, not a command
            continue
        module = importlib.import_module(f"fusedisk.commands.{info.name}")
        module.register(sub)
    return parser


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    """The sub-command names (and aliases) the parser knows."""
    return {
        name
        for action in parser._subparsers._group_actions  # type: ignore[union-attr]
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in _commands(parser):
        try:  # the mount.fuse3 form: `fusedisk SPEC MOUNTPOINT -o OPTS`
            argv = helper_argv(argv)
        except FuseDiskError as e:
            print(f"fusedisk: {e}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FuseDiskError as e:
        print(f"fusedisk: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
