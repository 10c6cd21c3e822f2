"""`fusedisk create -f FMT [-b BACKING -F FMT] [-o k=v,...] FILE [SIZE]`: make a new image.

Each format that can be created is one entry in CREATORS: its `-o` options
(QEMU's qemu-img names) and a function that makes the image.  A new format
adds its entry and nothing else changes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusedisk.errors import OpenError, SpecError
from fusedisk.formats.qcow2.create import create_qcow2
from fusedisk.formats.rbd.create import CREATE_OPTIONS as RBD_CREATE_OPTIONS
from fusedisk.graph.options import Option, OptionValueError, option_table, parse_size


@dataclass(frozen=True)
class Creator:
    """How to create one format: its -o options and the function that does it.

    `create(path, size, backing, backing_fmt, options)`; `size` is None when
    the user gave none (take the backing file's).
    """

    options: Mapping[str, Option]
    create: Callable[[Path, int | None, str | None, str | None, dict[str, Any]], None]
    backing: bool = False


def _create_qcow2(
    path: Path, size: int | None, backing: str | None, fmt: str | None, o: dict[str, Any]
) -> None:
    create_qcow2(
        path,
        size,
        backing,
        fmt,
        o["cluster_size"],
        version=2 if o["compat"] in ("0.10", "v2") else 3,
        refcount_bits=o["refcount_bits"],
        extended_l2=o["extended_l2"],
        compression_type=o["compression_type"],
        lazy_refcounts=o["lazy_refcounts"],
        data_file=o["data_file"],
        data_file_raw=o["data_file_raw"],
    )


def _create_raw(
    path: Path, size: int | None, backing: str | None, fmt: str | None, o: dict[str, Any]
) -> None:
    if size is None:
        raise SpecError("a raw image needs a size")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise OpenError(f"cannot create '{path}': the file exists (remove it first)") from None
    except OSError as e:
        raise OpenError(f"cannot create '{path}': {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_dedup(
    path: Path, size: int | None, backing: str | None, fmt: str | None, o: dict[str, Any]
) -> None:
    from fusedisk.commands.dedup import create_image

    if size is None or not o["data"]:
        raise SpecError("a dedup image needs a size and -o data=DATAFILE")
    create_image(path, o["data"], size, o["block_size"])


def _create_rbd(
    path: Path, size: int | None, backing: str | None, fmt: str | None, o: dict[str, Any]
) -> None:
    from fusedisk.formats.rbd.create import create_image

    create_image(str(path), size, o, backing, fmt)


CREATORS: dict[str, Creator] = {
    "qcow2": Creator(
        option_table(
            Option("cluster_size", "size", 65536, "cluster size, 512 to 2M"),
            Option("compat", "str", "1.1", "format version", choices=("0.10", "1.1", "v2", "v3")),
            Option("refcount_bits", "int", 16, "refcount width", choices=(1, 2, 4, 8, 16, 32, 64)),
            Option("extended_l2", "bool", False, "32 subclusters per cluster"),
            Option("compression_type", "str", "zlib", "zlib or zstd", choices=("zlib", "zstd")),
            Option("lazy_refcounts", "bool", False, "set the lazy refcounts compatible bit"),
            Option("data_file", "str", None, "keep guest data in this external file"),
            Option("data_file_raw", "bool", False, "keep the data file a valid raw image"),
        ),
        _create_qcow2,
        backing=True,
    ),
    "raw": Creator({}, _create_raw),
    "dedup": Creator(
        option_table(
            Option("data", "str", None, "the data file (FILE holds the metadata)"),
            Option("block_size", "size", 4096, "deduplication block size"),
        ),
        _create_dedup,
    ),
    "rbd": Creator(RBD_CREATE_OPTIONS, _create_rbd),  # FILE is rbd:POOL/IMAGE:conf=...
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "create",
        help="create a new disk image",
        description="Create FILE in format FMT, SIZE bytes (suffixes K, M, G, T), or as an "
        "overlay of BACKING (its size by default).  A relative BACKING is resolved against "
        "FILE's folder, as QEMU does.  An existing FILE is never replaced.",
    )
    p.add_argument("-f", dest="fmt", default="raw", choices=sorted(CREATORS), help="format")
    p.add_argument("-b", dest="backing", help="backing file (qcow2 overlays)")
    p.add_argument("-F", dest="backing_fmt", help="format of the backing file (probed if absent)")
    p.add_argument(
        "-o", dest="options", action="append", default=[], help="format options: k=v,k=v"
    )
    p.add_argument("file", help="the image to create")
    p.add_argument("size", nargs="?", help="virtual size, e.g. 10G")
    p.set_defaults(func=run)


def parse_create_options(fmt: str, texts: list[str]) -> dict[str, Any]:
    specs = CREATORS[fmt].options
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
    creator = CREATORS[args.fmt]
    if (args.backing or args.backing_fmt) and not creator.backing:
        raise SpecError(f"format {args.fmt} cannot have a backing file")
    options = parse_create_options(args.fmt, args.options)
    try:
        size = parse_size(args.size) if args.size is not None else None
    except OptionValueError as e:
        raise SpecError(f"SIZE: {e}") from None
    creator.create(Path(args.file), size, args.backing, args.backing_fmt, options)
    print(f"created {args.file} ({args.fmt})")
    return 0
