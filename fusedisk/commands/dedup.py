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

from fusedisk.errors import SpecError
from fusedisk.formats.dedup.create import check_image, create_image
from fusedisk.formats.dedup.layout import DEFAULT_JOURNAL_SIZE
from fusedisk.graph.options import OptionValueError, parse_size


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
