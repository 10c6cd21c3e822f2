"""`fusedisk create -f FMT [-b BACKING -F FMT] [-o k=v,...] FILE [SIZE]`: make a new image.

Every driver that can create images declares its `-o` options and its `create`
slot (graph/driver_slots.py); this command only parses and asks it, so a new
format needs nothing here.
"""

from __future__ import annotations

import argparse
from typing import Any

from fusedisk.errors import SpecError
from fusedisk.graph.options import OptionValueError, parse_size
from fusedisk.graph.registry import creatable_drivers


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "create",
        help="create a new disk image",
        description="Create FILE in format FMT, SIZE bytes (suffixes K, M, G, T), or as an "
        "overlay of BACKING (its size by default).  A relative BACKING is resolved against "
        "FILE's folder, as QEMU does.  An existing FILE is never replaced.",
    )
    p.add_argument("-f", dest="fmt", default="raw", choices=sorted(creatable_drivers()))
    p.add_argument("-b", dest="backing", help="backing file (qcow2 overlays)")
    p.add_argument("-F", dest="backing_fmt", help="format of the backing file (probed if absent)")
    p.add_argument(
        "-o", dest="options", action="append", default=[], help="format options: k=v,k=v"
    )
    p.add_argument("file", help="the image to create")
    p.add_argument("size", nargs="?", help="virtual size, e.g. 10G")
    p.set_defaults(func=run)


def parse_create_options(fmt: str, texts: list[str]) -> dict[str, Any]:
    specs = creatable_drivers()[fmt].create_options or {}
    values = {name: spec.default for name, spec in specs.items()}
    for text in texts:
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            key = key.strip()
            spec = specs.get(key)
            if spec is None:
                known = ", ".join(specs) or "none"
                raise SpecError(f"format {fmt}: unknown option '{key}' (known: {known})")
            try:
                values[key] = spec.parse(value.strip() if sep else "on")
            except OptionValueError as e:
                raise SpecError(f"format {fmt}: option '{key}': {e}") from None
    return values


def run(args: argparse.Namespace) -> int:
    driver = creatable_drivers()[args.fmt]
    if (args.backing or args.backing_fmt) and not driver.creates_overlays_of_backing:
        raise SpecError(f"format {args.fmt} cannot have a backing file")
    options = parse_create_options(args.fmt, args.options)
    try:
        size = parse_size(args.size) if args.size is not None else None
    except OptionValueError as e:
        raise SpecError(f"SIZE: {e}") from None
    driver.create(args.file, size, options, args.backing, args.backing_fmt)
    print(f"created {args.file} ({args.fmt})")
    return 0
