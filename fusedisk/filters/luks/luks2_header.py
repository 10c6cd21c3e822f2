"""The LUKS2 binary headers: two copies, checksums, seqid, the JSON area they carry.

Layout of a LUKS2 device (integers big-endian):

    0            primary binary header (4096 bytes), then its JSON area, to hdr_size
    hdr_size     secondary copy: same, with the magic "SKUL\\xba\\xbe"
    2·hdr_size   key slot areas (config.keyslots_size bytes), then the data segment

A binary header (the first 512 bytes of its 4096 matter):

    0    magic[6]  version u16 (2)  hdr_size u64  seqid u64  label[48]
    72   csum_alg[32]  salt[64]  uuid[40]  subsystem[48]  hdr_offset u64
    448  csum[64]: the hash named by csum_alg over the whole hdr_size bytes of
         this copy (binary header and JSON area) with this field zeroed

hdr_size is 16 KiB .. 4 MiB, a power of two.  Each update writes both copies
with seqid + 1; when both are valid the higher seqid wins, when one is
damaged the other serves.  Copies are written secondary first, each flushed,
so a crash at any point leaves one valid copy holding either the old or the
new metadata (see write_copies).

This module reads and writes bytes; luks2_json.py gives the JSON its meaning.
Reference: the "LUKS2 On-Disk Format Specification" (cryptsetup, 1.1.x).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from fusedisk.errors import CorruptImage

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
VERSION = 2
BINARY_SIZE = 4096
#: the hdr_size values the format allows: 16 KiB .. 4 MiB
HDR_SIZES = tuple((16 << 10) << i for i in range(9))
MAX_HDR_SIZE = HDR_SIZES[-1]
#: checksum algorithms accepted (cryptsetup writes sha256 unless told otherwise)
CSUM_ALGS = ("sha1", "sha224", "sha256", "sha384", "sha512")
_CSUM_AT = 448
_CSUM_LEN = 64

_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")  # 512 bytes

_NOTHING_THERE = ("no LUKS2 magic", "the device ends before it")

#: reads `length` bytes at `offset` of the device holding the header
Reader = Callable[[int, int], Awaitable[bytes]]


@dataclass(frozen=True)
class BinaryHeader:
    magic: bytes
    version: int
    hdr_size: int
    seqid: int
    label: str
    csum_alg: str
    salt: bytes
    uuid: str
    subsystem: str
    hdr_offset: int

    def pack(self, json_area: bytes) -> bytes:
        """This copy's hdr_size bytes, with the checksum computed."""
        area_size = self.hdr_size - BINARY_SIZE
        if len(json_area) > area_size:
            raise ValueError(f"LUKS2 metadata of {len(json_area)} bytes exceeds {area_size}")
        head = _BIN.pack(
            self.magic,
            self.version,
            self.hdr_size,
            self.seqid,
            _cstr(self.label, 48),
            _cstr(self.csum_alg, 32),
            self.salt,
            _cstr(self.uuid, 40),
            _cstr(self.subsystem, 48),
            self.hdr_offset,
            bytes(184),
            bytes(_CSUM_LEN),
        )
        raw = bytearray(head.ljust(BINARY_SIZE, b"\0") + json_area.ljust(area_size, b"\0"))
        digest = hashlib.new(self.csum_alg, raw).digest()
        raw[_CSUM_AT : _CSUM_AT + len(digest)] = digest
        return bytes(raw)


@dataclass(frozen=True)
class HeaderCopy:
    """One valid copy: its binary header and its JSON text (up to the first NUL)."""

    which: str  # "primary" or "secondary"
    binary: BinaryHeader
    json_text: bytes


@dataclass(frozen=True)
class Luks2Headers:
    """The copy in use, and what was wrong with the other (None if both are valid)."""

    current: HeaderCopy
    other_problem: str | None


def _cstr(text: str, size: int) -> bytes:
    raw = text.encode("ascii")
    if len(raw) >= size:
        raise ValueError(f"{text!r} is too long for a {size}-byte LUKS2 header field")
    return raw.ljust(size, b"\0")


def _text(raw: bytes, name: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise ValueError(f"field '{name}' is not NUL-terminated")
    try:
        return raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"field '{name}' is not ASCII text") from None


def parse_binary(raw: bytes, offset: int) -> BinaryHeader:
    """The binary header in `raw` (≥ 512 bytes) found at byte `offset` of the device.

    Raises ValueError saying what is wrong; the checksum is checked by check_copy.
    """
    if len(raw) < _BIN.size:
        raise ValueError("the device ends inside the header")
    f = _BIN.unpack_from(raw)
    magic = f[0]
    if magic not in (MAGIC_PRIMARY, MAGIC_SECONDARY):
        raise ValueError("no LUKS2 magic")
    if f[1] != VERSION:
        raise ValueError(f"version {f[1]} instead of 2")
    hdr_size = f[2]
    if hdr_size not in HDR_SIZES:
        raise ValueError(f"header size {hdr_size} is not a power of two in 16 KiB-4 MiB")
    if f[9] != offset:
        raise ValueError(f"it says it lies at byte {f[9]}, but it was read at byte {offset}")
    csum_alg = _text(f[5], "checksum_alg")
    if csum_alg not in CSUM_ALGS:
        raise ValueError(
            f"checksum algorithm {csum_alg!r} is not supported ({', '.join(CSUM_ALGS)})"
        )
    return BinaryHeader(
        magic=magic,
        version=f[1],
        hdr_size=hdr_size,
        seqid=f[3],
        label=_text(f[4], "label"),
        csum_alg=csum_alg,
        salt=f[6],
        uuid=_text(f[7], "uuid"),
        subsystem=_text(f[8], "subsystem"),
        hdr_offset=f[9],
    )


def check_copy(raw: bytes, offset: int, which: str) -> HeaderCopy:
    """A whole copy (`raw` = hdr_size bytes read at `offset`), checksum verified."""
    binary = parse_binary(raw, offset)
    expected = MAGIC_PRIMARY if which == "primary" else MAGIC_SECONDARY
    if binary.magic != expected:
        raise ValueError(f"the magic of the other copy ({binary.magic!r})")
    if len(raw) < binary.hdr_size:
        raise ValueError(f"the device ends inside the {binary.hdr_size}-byte header")
    raw = raw[: binary.hdr_size]
    stored = raw[_CSUM_AT : _CSUM_AT + _CSUM_LEN]
    zeroed = raw[:_CSUM_AT] + bytes(_CSUM_LEN) + raw[_CSUM_AT + _CSUM_LEN :]
    digest = hashlib.new(binary.csum_alg, zeroed).digest()
    if not hmac.compare_digest(digest, stored[: len(digest)]):
        raise ValueError(f"its {binary.csum_alg} checksum does not match")
    area = raw[BINARY_SIZE:]
    end = area.find(b"\0")
    if end < 0:
        raise ValueError("its JSON area is not NUL-terminated")
    return HeaderCopy(which, binary, area[:end])


async def _read_copy(read: Reader, device_size: int, offset: int, which: str) -> HeaderCopy:
    if offset + BINARY_SIZE > device_size:
        raise ValueError("the device ends before it")
    head = await read(offset, BINARY_SIZE)
    binary = parse_binary(head, offset)
    if offset + binary.hdr_size > device_size:
        raise ValueError(f"the device ends inside the {binary.hdr_size}-byte header")
    rest = await read(offset + BINARY_SIZE, binary.hdr_size - BINARY_SIZE)
    return check_copy(head + rest, offset, which)


async def read_headers(read: Reader, device_size: int, where: str) -> Luks2Headers:
    """The LUKS2 header copy to use: the valid one, or of two valid the higher seqid.

    The secondary sits at the primary's hdr_size; with the primary damaged, every
    allowed hdr_size is tried (as cryptsetup does).  Both damaged: CorruptImage
    saying what is wrong with each.
    """
    problems: dict[str, str] = {}
    copies: list[HeaderCopy] = []
    try:
        copies.append(await _read_copy(read, device_size, 0, "primary"))
    except ValueError as e:
        problems["primary"] = str(e)
    offsets = [copies[0].binary.hdr_size] if copies else list(HDR_SIZES)
    secondary_errors = []
    for offset in offsets:
        try:
            copies.append(await _read_copy(read, device_size, offset, "secondary"))
            break
        except ValueError as e:
            if len(offsets) == 1 or str(e) not in _NOTHING_THERE:
                secondary_errors.append(f"{e} (at byte {offset})")
    else:
        problems["secondary"] = secondary_errors[0] if secondary_errors else "none found"
    if not copies:
        raise CorruptImage(
            f"{where}: damaged LUKS2 header: both copies are unusable (primary: "
            f"{problems['primary']}; secondary: {problems['secondary']})"
        )
    if len(copies) == 2 and copies[1].binary.seqid > copies[0].binary.seqid:
        return Luks2Headers(copies[1], "it is older (lower seqid)")
    if len(copies) == 2:
        if copies[1].binary.seqid < copies[0].binary.seqid:
            return Luks2Headers(copies[0], "it is older (lower seqid)")
        return Luks2Headers(copies[0], None)
    other = "secondary" if copies[0].which == "primary" else "primary"
    return Luks2Headers(copies[0], problems[other])


#: writes bytes at an offset of the device holding the header, then flushes
Writer = Callable[[int, bytes], Awaitable[None]]


async def write_copies(write: Writer, current: BinaryHeader, json_text: bytes) -> BinaryHeader:
    """Write new metadata into both copies with seqid + 1; returns the new primary.

    Order: the secondary, flushed, then the primary, flushed.  A crash while the
    secondary is written leaves the primary (old, valid); after it, the
    secondary (new, higher seqid) wins whatever the primary holds.
    """
    seqid = current.seqid + 1
    primary = replace(current, magic=MAGIC_PRIMARY, seqid=seqid, hdr_offset=0)
    secondary = replace(primary, magic=MAGIC_SECONDARY, hdr_offset=current.hdr_size)
    await write(current.hdr_size, secondary.pack(json_text))
    await write(0, primary.pack(json_text))
    return primary
