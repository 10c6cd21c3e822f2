"""Making and bending LUKS2 images for tests: a small valid image (fusedisk's own format,
cheap PBKDF2), and rewrites of its JSON or binary fields with valid checksums, so a test
reaches the check it means to reach."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from fusedisk.filters.luks import luks2_header as h2
from fusedisk.filters.luks import luks2_manage as lm

MiB = 1 << 20
PASSPHRASE = b"crafted"
CHEAP = lm.KdfChoice(type="pbkdf2", iterations=1000)


def file_writer(path: Path) -> lm.Write:
    async def write(offset: int, data: bytes) -> None:
        with open(path, "r+b") as f:
            os.pwrite(f.fileno(), data, offset)

    return write


def make_image(path: Path, kdf: lm.KdfChoice = CHEAP, sector_size: int = 4096) -> Path:
    """A LUKS2 image with 1 MiB of payload, PASSPHRASE in key slot 0."""
    with open(path, "wb") as f:
        f.truncate(lm.PAYLOAD_OFFSET + MiB)
    trio.run(
        lambda: lm.format_volume(
            file_writer(path), lm.PAYLOAD_OFFSET + MiB, "craft", PASSPHRASE,
            kdf=kdf, sector_size=sector_size,
        )
    )  # fmt: skip
    return path


def read_copy(path: Path, which: str = "primary") -> tuple[h2.BinaryHeader, dict[str, Any]]:
    raw = path.read_bytes()[: 2 * lm.HDR_SIZE]
    offset = 0 if which == "primary" else lm.HDR_SIZE
    copy = h2.check_copy(raw[offset:], offset, which)
    return copy.binary, json.loads(copy.json_text)


def rewrite(
    path: Path,
    json_change: Callable[[dict[str, Any]], Any] | None = None,
    text: bytes | None = None,
    **binary_fields: Any,
) -> None:
    """Rewrite both copies (valid checksums, same seqid) with the JSON changed by
    `json_change` (or replaced by `text`) and binary fields replaced."""
    binary, meta = read_copy(path)
    if json_change is not None:
        json_change(meta)
    body = text if text is not None else json.dumps(meta).encode()
    with open(path, "r+b") as f:
        for magic, offset in ((h2.MAGIC_PRIMARY, 0), (h2.MAGIC_SECONDARY, lm.HDR_SIZE)):
            b = replace(binary, magic=magic, hdr_offset=offset, **binary_fields)
            raw = bytearray(b.pack(b""))
            raw[4096 : 4096 + len(body)] = body[: lm.HDR_SIZE - 4096]
            # the checksum again, over the (possibly oversized) body
            raw[448:512] = bytes(64)
            if b.csum_alg in h2.CSUM_ALGS:
                digest = hashlib.new(b.csum_alg, raw).digest()
                raw[448 : 448 + len(digest)] = digest
            os.pwrite(f.fileno(), bytes(raw), offset)


def patch_binary(path: Path, at: int, value: bytes) -> None:
    """Put `value` at byte `at` of both binary headers, checksums recomputed (sha256, 16 KiB)."""
    with open(path, "r+b") as f:
        for offset in (0, lm.HDR_SIZE):
            raw = bytearray(os.pread(f.fileno(), lm.HDR_SIZE, offset))
            raw[at : at + len(value)] = value
            raw[448:512] = bytes(64)
            raw[448:480] = hashlib.sha256(raw).digest()
            os.pwrite(f.fileno(), bytes(raw), offset)


def damage(path: Path, offset: int, length: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in f.read(length)))
        f.seek(offset)
