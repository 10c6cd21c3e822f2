"""`fusedisk dedup create|check`: make a dedup image, or check one offline.

    fusedisk dedup create --metadata M --data D --size S [--block-size B] [--journal-size J]
    fusedisk dedup check  --metadata M --data D [--quick]

`create` makes the two files if they do not exist and formats them; files that
exist must be empty (as the driver's `format = true` requires), and an
existing dedup image is never formatted again.  `check` opens the image
read-only (nothing is written, a pending journal is read but not replayed),
checks every refcount, map and index entry and, unless --quick, every block's
hash, prints the findings and exits 0 (clean), 2 (corruption) or 3 (leaked
blocks only), as `qemu-img check` does.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import trio

from fusedisk.errors import OpenError, SpecError
from fusedisk.formats.dedup.check import CheckReport
from fusedisk.formats.dedup.driver import DedupNode
from fusedisk.formats.dedup.layout import DEFAULT_JOURNAL_SIZE, MAGIC
from fusedisk.graph.graph import Graph
from fusedisk.graph.options import OptionValueError, parse_size
from fusedisk.spec import parse_spec


def _spec_text(metadata: Path, data: Path, options: dict[str, object]) -> str:
    lines = ["[nodes.dedup]", 'driver = "dedup"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    lines += [
        f'metadata = {{ driver = "file", filename = {json.dumps(str(metadata))}, '
        f"read-only = {json.dumps(options.get('read-only', False))} }}",
        f'data = {{ driver = "file", filename = {json.dumps(str(data))}, '
        f"read-only = {json.dumps(options.get('read-only', False))} }}",
        "[disks.dedup]",
        'node = "dedup"',
    ]
    return "\n".join(lines) + "\n"


async def _open(metadata: Path, data: Path, options: dict[str, object]) -> Graph:
    spec = parse_spec(_spec_text(metadata, data, options), Path.cwd() / "dedup.toml")
    return await Graph.open(spec)


def create_image(
    metadata: str | Path,
    data: str | Path,
    size: int,
    block_size: int = 4096,
    journal_size: int = DEFAULT_JOURNAL_SIZE,
) -> None:
    """Create (if needed) and format a dedup image on two files."""
    metadata, data = Path(metadata).absolute(), Path(data).absolute()
    if metadata == data:
        raise SpecError("the metadata and the data must be two different files")
    try:
        with open(metadata, "rb") as f:
            if f.read(8) == MAGIC:
                raise OpenError(f"'{metadata}' already holds a dedup image; it is not replaced")
    except FileNotFoundError:
        pass
    created = []
    for path in (metadata, data):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        except OSError as e:
            raise OpenError(f"cannot create '{path}': {e.strerror}") from None
        os.close(fd)
        created.append(path)
    options: dict[str, object] = {
        "format": True,
        "size": size,
        "block-size": block_size,
        "journal-size": journal_size,
    }

    async def run() -> None:
        graph = await _open(metadata, data, options)
        await graph.close()

    try:
        trio.run(run)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def check_image(metadata: str | Path, data: str | Path, hashes: bool = True) -> CheckReport:
    """Open the image read-only and check it; nothing is written."""

    async def run() -> CheckReport:
        graph = await _open(Path(metadata).absolute(), Path(data).absolute(), {"read-only": True})
        try:
            node = graph.nodes["dedup"]
            assert isinstance(node, DedupNode)
            return await node.check(hashes)
        finally:
            await graph.close(flush=False)

    return trio.run(run)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dedup",
        help="create or check a dedup image (metadata and data files)",
        description="Create or check a deduplicating image made of a metadata file "
        "(map, index, refcounts, journal: put it on fast storage) and a data file.",
    )
    cmds = p.add_subparsers(dest="dedup_command", metavar="ACTION")
    cmds.required = True
    c = cmds.add_parser("create", help="create and format a dedup image")
    c.add_argument("--metadata", required=True, help="the metadata file (made if missing)")
    c.add_argument("--data", required=True, help="the data file (made if missing)")
    c.add_argument("--size", required=True, help="the disk's size, e.g. 10G")
    c.add_argument("--block-size", default="4096", help="deduplication block size (4096)")
    c.add_argument("--journal-size", default=str(DEFAULT_JOURNAL_SIZE), help="journal size")
    c.set_defaults(func=run_create)
    k = cmds.add_parser("check", help="check refcounts, map, index and hashes (read-only)")
    k.add_argument("--metadata", required=True, help="the metadata file")
    k.add_argument("--data", required=True, help="the data file")
    k.add_argument("--quick", action="store_true", help="do not read the data to check hashes")
    k.add_argument("--json", action="store_true", help="print the report as JSON")
    k.set_defaults(func=run_check)


def _size(name: str, text: str) -> int:
    try:
        return parse_size(text)
    except OptionValueError as e:
        raise SpecError(f"option '{name}': {e}") from None


def run_create(args: argparse.Namespace) -> int:
    size = _size("--size", args.size)
    create_image(
        args.metadata,
        args.data,
        size,
        _size("--block-size", args.block_size),
        _size("--journal-size", args.journal_size),
    )
    print(f"formatted a {size}-byte dedup image: metadata {args.metadata}, data {args.data}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    report = check_image(args.metadata, args.data, hashes=not args.quick)
    if args.json:
        print(report.to_json(), end="")
    else:
        for line in report.lines():
            print(line)
    return report.exit_code
