"""The LUKS1 on-disk header: its layout, parsing, checks and description.

Layout of a LUKS1 device (all integers big-endian, sectors of 512 bytes):


    byte 0      header (592 bytes)            magic "LUKS\\xba\\xbe", version 1,
                                              cipher name/mode, hash, payload
                                              offset, key size, master-key digest,
                                              uuid, 8 key slot descriptors
    4096        key slot 0 material           the master key, split into 4000
    ...         key slots 1..7 material       stripes (AFsplit) and encrypted
                                              with a key derived from a passphrase
    payload     the encrypted data            sector 0 of the payload has IV 0

A key slot opens when PBKDF2(hash, passphrase, slot salt, slot iterations)
decrypts its material into stripes that merge (AFmerge) into a key whose
PBKDF2 digest equals the header's master-key digest.


This module reads and checks the header (bytes in, a LuksHeader out) and
describes it; luks1_keyslot opens and seals key slots, luks1_manage formats
a device and adds and removes keys.  Secrets never go into a message: errors
name the node or image (`where`) and what is wrong.

References: "LUKS1 On-Disk Format Specification" 1.2.3 (C. Fruhwirth);
cryptsetup lib/luks1/keymanage.c; QEMU crypto/block-luks.c.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fusedisk.errors import CorruptImage, OpenError
from fusedisk.filters.luks.cipher import SECTOR, CipherSpecError, make_sector_cipher
from fusedisk.filters.luks.keyslot_crypto import HASHES

if TYPE_CHECKING:
    from fusedisk.graph.edge import Edge

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
NUM_KEY_SLOTS = 8
SALT_SIZE = 32
DIGEST_SIZE = 20
STRIPES = 4000
KEY_ENABLED = 0x00AC71F3
KEY_DISABLED = 0x0000DEAD
ALIGN_KEYSLOTS = 4096  # bytes: first key slot, and each slot's area, aligned so
ALIGN_PAYLOAD = 1 << 20  # bytes: where the payload starts, as cryptsetup does
MIN_ITERATIONS = 1000  # cryptsetup's floor for key slots and the master-key digest
#: PBKDF2 (cryptography's, in Rust) panics past a signed 32-bit count; cryptsetup's own
#: benchmark never goes near it
MAX_ITERATIONS = (1 << 31) - 1
MKD_ITER_MS = 125  # master-key digest iterations: this many ms worth (cryptsetup)

_HEAD = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
HEADER_SIZE = _HEAD.size + NUM_KEY_SLOTS * _SLOT.size  # 592

LUKS2_MESSAGE = "a LUKS2 header is read by luks2_volume, not by the LUKS1 parser"


@dataclass
class KeySlot:
    state: int = KEY_DISABLED
    iterations: int = 0
    salt: bytes = bytes(SALT_SIZE)
    key_offset: int = 0  # sector of its key material
    stripes: int = STRIPES

    @property
    def enabled(self) -> bool:
        return self.state == KEY_ENABLED


@dataclass
class LuksHeader:
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int  # sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iterations: int
    uuid: str
    slots: list[KeySlot] = field(default_factory=list)
    version: int = VERSION

    @property
    def cipher(self) -> str:
        return f"{self.cipher_name}-{self.cipher_mode}"

    @property
    def payload_bytes(self) -> int:
        """Where the payload starts, in bytes."""
        return self.payload_offset * SECTOR

    def material_size(self, slot: KeySlot) -> int:
        """Bytes of a slot's key material, rounded up to whole sectors."""
        return -(-self.key_bytes * slot.stripes // SECTOR) * SECTOR

    def active_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.enabled]

    def pack(self) -> bytes:
        head = _HEAD.pack(
            MAGIC,
            self.version,
            _cstr(self.cipher_name, 32),
            _cstr(self.cipher_mode, 32),
            _cstr(self.hash_spec, 32),
            self.payload_offset,
            self.key_bytes,
            self.mk_digest,
            self.mk_digest_salt,
            self.mk_digest_iterations,
            _cstr(self.uuid, 40),
        )
        slots = b"".join(
            _SLOT.pack(s.state, s.iterations, s.salt, s.key_offset, s.stripes) for s in self.slots
        )
        return head + slots


def _cstr(text: str, size: int) -> bytes:
    raw = text.encode("ascii")
    if len(raw) >= size:
        raise ValueError(f"{text!r} is too long for a {size}-byte header field")
    return raw.ljust(size, b"\0")


def _field(raw: bytes, name: str, where: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise CorruptImage(f"{where}: damaged LUKS header: field '{name}' is not terminated")
    try:
        return raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise CorruptImage(f"{where}: damaged LUKS header: field '{name}' is not text") from None


def probe(head: bytes) -> int | None:
    """The LUKS version of the header at the start of `head`, or None if there is none."""
    if len(head) < 8 or head[:6] != MAGIC:
        return None
    return int.from_bytes(head[6:8], "big")


def parse_header(head: bytes, device_size: int, where: str) -> LuksHeader:
    """Read and check a LUKS1 header; `device_size` is the size of the whole device.

    Raises OpenError (LUKS2, unsupported cipher or hash) or CorruptImage (no
    header, damaged fields, offsets that overlap or lie past the device's end).
    """
    version = probe(head)
    if version is None:
        raise CorruptImage(f"{where}: no LUKS header (the device does not start with the magic)")
    if version == 2:
        raise OpenError(f"{where}: {LUKS2_MESSAGE}")
    if version != VERSION:
        raise CorruptImage(f"{where}: damaged LUKS header: unknown version {version}")
    if len(head) < HEADER_SIZE:
        raise CorruptImage(
            f"{where}: the device is truncated: {len(head)} bytes cannot hold a LUKS header"
        )
    fields = _HEAD.unpack_from(head)
    slots = [
        KeySlot(*_SLOT.unpack_from(head, _HEAD.size + i * _SLOT.size)) for i in range(NUM_KEY_SLOTS)
    ]
    hdr = LuksHeader(
        cipher_name=_field(fields[2], "cipher-name", where),
        cipher_mode=_field(fields[3], "cipher-mode", where),
        hash_spec=_field(fields[4], "hash-spec", where),
        payload_offset=fields[5],
        key_bytes=fields[6],
        mk_digest=fields[7],
        mk_digest_salt=fields[8],
        mk_digest_iterations=fields[9],
        uuid=_field(fields[10], "uuid", where),
        slots=slots,
        version=version,
    )
    check_header(hdr, device_size, where)
    return hdr


def check_header(hdr: LuksHeader, device_size: int, where: str) -> None:
    """Check what can be checked without a key (see parse_header)."""

    def damaged(what: str) -> CorruptImage:
        return CorruptImage(f"{where}: damaged LUKS header: {what}")

    if hdr.hash_spec not in HASHES:
        raise OpenError(
            f"{where}: LUKS hash {hdr.hash_spec!r} is not supported "
            f"(supported: {', '.join(HASHES)})"
        )
    if not 16 <= hdr.key_bytes <= 64:
        raise damaged(f"key size of {hdr.key_bytes} bytes")
    try:
        make_sector_cipher(hdr.cipher_name, hdr.cipher_mode, bytes(hdr.key_bytes))
    except CipherSpecError as e:
        raise OpenError(f"{where}: {e}") from None
    if not 0 < hdr.mk_digest_iterations <= MAX_ITERATIONS:
        raise damaged(f"master-key digest has {hdr.mk_digest_iterations} iterations")
    payload = hdr.payload_bytes
    if payload == 0:
        raise OpenError(f"{where}: a detached LUKS header (payload offset 0) is not supported")
    if payload < HEADER_SIZE:
        raise damaged(f"payload offset {hdr.payload_offset} overlaps the header")
    areas: list[tuple[int, int, int]] = []
    for i, slot in enumerate(hdr.slots):
        if slot.state not in (KEY_ENABLED, KEY_DISABLED):
            raise damaged(f"key slot {i} has an unknown state 0x{slot.state:08x}")
        if not slot.enabled:
            continue
        if slot.iterations == 0:
            raise damaged(f"key slot {i} has 0 iterations")
        if slot.stripes != STRIPES:  # cryptsetup and QEMU refuse any other count too
            raise damaged(f"key slot {i} has {slot.stripes} stripes instead of {STRIPES}")
        if slot.iterations > MAX_ITERATIONS:
            raise damaged(f"key slot {i} has {slot.iterations} PBKDF2 iterations "
                          f"(at most {MAX_ITERATIONS} can run)")  # fmt: skip
        start = slot.key_offset * SECTOR
        end = start + hdr.material_size(slot)
        if start < HEADER_SIZE or end > payload:
            raise damaged(
                f"key slot {i}'s material (bytes {start}-{end}) is outside the header area "
                f"(bytes {HEADER_SIZE}-{payload})"
            )
        for j, other_start, other_end in areas:
            if start < other_end and other_start < end:
                raise damaged(f"key slots {j} and {i} overlap")
        areas.append((i, start, end))
    if payload > device_size:
        raise CorruptImage(
            f"{where}: the device is truncated: its LUKS header puts the payload at byte "
            f"{payload}, but the device holds only {device_size} bytes"
        )


def layout(key_bytes: int, stripes: int = STRIPES) -> tuple[list[int], int]:
    """cryptsetup's LUKS1 layout: key slot offsets and the payload offset, in sectors."""
    align = ALIGN_KEYSLOTS // SECTOR
    material = -(-key_bytes * stripes // SECTOR)
    per_slot = -(-material // align) * align
    offsets = [align + i * per_slot for i in range(NUM_KEY_SLOTS)]
    end = align + NUM_KEY_SLOTS * per_slot
    payload_align = ALIGN_PAYLOAD // SECTOR
    return offsets, -(-end // payload_align) * payload_align


def dump(hdr: LuksHeader) -> str:
    """A description of the header in the manner of `cryptsetup luksDump`."""

    def hexdump(raw: bytes) -> str:
        text = " ".join(f"{b:02x}" for b in raw)
        return "\n\t\t".join(text[i : i + 48].rstrip() for i in range(0, len(text), 48))

    lines = [
        f"LUKS header information for version {hdr.version}",
        "",
        f"Version:       \t{hdr.version}",
        f"Cipher name:   \t{hdr.cipher_name}",
        f"Cipher mode:   \t{hdr.cipher_mode}",
        f"Hash spec:     \t{hdr.hash_spec}",
        f"Payload offset:\t{hdr.payload_offset}",
        f"MK bits:       \t{hdr.key_bytes * 8}",
        f"MK digest:     \t{hexdump(hdr.mk_digest)}",
        f"MK salt:       \t{hexdump(hdr.mk_digest_salt)}",
        f"MK iterations: \t{hdr.mk_digest_iterations}",
        f"UUID:          \t{hdr.uuid}",
        "",
    ]
    for i, slot in enumerate(hdr.slots):
        if slot.enabled:
            lines += [
                f"Key Slot {i}: ENABLED",
                f"\tIterations:         \t{slot.iterations}",
                f"\tSalt:               \t{hexdump(slot.salt)}",
                f"\tKey material offset:\t{slot.key_offset}",
                f"\tAF stripes:         \t{slot.stripes}",
            ]
        else:
            lines.append(f"Key Slot {i}: DISABLED")
    return "\n".join(lines) + "\n"


# -- operations on a device ---------------------------------------------------------------


def device_size(edge: Edge) -> int:
    return edge.node.size


async def read_header(edge: Edge, where: str) -> LuksHeader:
    """The checked header of the device behind `edge`."""
    size = device_size(edge)
    head = await edge.read(0, min(size, HEADER_SIZE))
    return parse_header(head, size, where)
