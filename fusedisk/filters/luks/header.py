"""The LUKS1 on-disk format: header, key slots, anti-forensic splitter, PBKDF2.

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

This module is pure format logic (bytes in, bytes out) plus a few async
operations over an Edge (read the header, unlock, format, add and remove a
key slot) that the `luks` node and `fusedisk luks` share.  Secrets never go
into a message: errors name the node or image (`where`) and what is wrong.

References: "LUKS1 On-Disk Format Specification" 1.2.3 (C. Fruhwirth);
cryptsetup lib/luks1/{keymanage.c,af.c}; QEMU crypto/block-luks.c.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import uuid
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import TYPE_CHECKING

import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from fusedisk.errors import CorruptImage, OpenError
from fusedisk.filters.luks.cipher import (
    SECTOR,
    CipherSpecError,
    make_sector_cipher,
    split_cipher_spec,
)

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
MAX_KEY_FILE = 8 << 20  # cryptsetup's default limit on --key-file

_HEAD = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
HEADER_SIZE = _HEAD.size + NUM_KEY_SLOTS * _SLOT.size  # 592

#: hashes LUKS1 headers name, as cryptography algorithms (PBKDF2) and hashlib names (AF)
HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

LUKS2_MESSAGE = "a LUKS2 header is read by luks2_volume, not by the LUKS1 parser"


class WrongKey(OpenError):
    """No key slot accepts the key that was given."""


# -- the header ---------------------------------------------------------------------


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


# -- PBKDF2 and the anti-forensic splitter --------------------------------------------


def pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=HASHES[hash_name](), length=length, salt=salt, iterations=iterations)
    return kdf.derive(password)


def pbkdf2_speed(hash_name: str, key_bytes: int) -> float:
    """PBKDF2 iterations per second for a `key_bytes` output, measured over ≥ 50 ms."""
    iterations = 1000
    while True:
        t0 = perf_counter()
        pbkdf2(hash_name, b"fusedisk benchmark", bytes(SALT_SIZE), iterations, key_bytes)
        elapsed = perf_counter() - t0
        if elapsed >= 0.05 or iterations >= 1 << 30:
            return iterations / max(elapsed, 1e-9)
        iterations *= 2 if elapsed < 0.005 else max(2, int(0.06 / max(elapsed, 1e-9)))


def calibrate(hash_name: str, key_bytes: int, iter_time_ms: int) -> tuple[int, int]:
    """(key slot iterations, master-key digest iterations) for `iter_time_ms`, like
    cryptsetup's --iter-time: as many iterations as this machine runs in that time."""
    speed = pbkdf2_speed(hash_name, key_bytes)
    slot = max(MIN_ITERATIONS, int(speed * iter_time_ms / 1000))
    digest = max(MIN_ITERATIONS, int(speed * MKD_ITER_MS / 1000))
    return slot, digest


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def diffuse(block: bytes, hash_name: str) -> bytes:
    """The AF diffusion: each digest-sized piece i becomes H(be32(i) || piece), truncated."""
    size = hashlib.new(hash_name).digest_size
    out = []
    for i in range(0, len(block), size):
        piece = block[i : i + size]
        out.append(hashlib.new(hash_name, (i // size).to_bytes(4, "big") + piece).digest())
        out[-1] = out[-1][: len(piece)]
    return b"".join(out)


def af_split(key: bytes, stripes: int, hash_name: str) -> bytes:
    """Spread `key` over `stripes` blocks: all but the last random, so that losing
    any one block (an overwritten sector) loses the key."""
    n = len(key)
    randoms = os.urandom(n * (stripes - 1))
    d = bytes(n)
    for i in range(stripes - 1):
        d = diffuse(_xor(d, randoms[i * n : (i + 1) * n]), hash_name)
    return randoms + _xor(d, key)


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """The inverse of af_split."""
    n = key_bytes
    d = bytes(n)
    for i in range(stripes - 1):
        d = diffuse(_xor(d, material[i * n : (i + 1) * n]), hash_name)
    return _xor(d, material[(stripes - 1) * n : stripes * n])


def master_key_digest(hdr: LuksHeader, master_key: bytes) -> bytes:
    return pbkdf2(
        hdr.hash_spec, master_key, hdr.mk_digest_salt, hdr.mk_digest_iterations, DIGEST_SIZE
    )


def open_key_slot(hdr: LuksHeader, index: int, passphrase: bytes, material: bytes) -> bytes | None:
    """The master key if `passphrase` opens slot `index` (whose material is given)."""
    slot = hdr.slots[index]
    derived = pbkdf2(hdr.hash_spec, passphrase, slot.salt, slot.iterations, hdr.key_bytes)
    cipher = make_sector_cipher(hdr.cipher_name, hdr.cipher_mode, derived)
    split = cipher.decrypt(0, material[: hdr.material_size(slot)])
    key = af_merge(bytes(split), hdr.key_bytes, slot.stripes, hdr.hash_spec)
    if hmac.compare_digest(master_key_digest(hdr, key), hdr.mk_digest):
        return key
    return None


def seal_key_slot(
    hdr: LuksHeader, index: int, passphrase: bytes, master_key: bytes, iterations: int
) -> tuple[KeySlot, bytes]:
    """A new enabled descriptor for slot `index` and its encrypted key material."""
    old = hdr.slots[index]
    slot = replace(
        old, state=KEY_ENABLED, iterations=iterations, salt=os.urandom(SALT_SIZE), stripes=STRIPES
    )
    derived = pbkdf2(hdr.hash_spec, passphrase, slot.salt, iterations, hdr.key_bytes)
    cipher = make_sector_cipher(hdr.cipher_name, hdr.cipher_mode, derived)
    split = af_split(master_key, slot.stripes, hdr.hash_spec)
    padded = split.ljust(hdr.material_size(slot), b"\0")
    return slot, bytes(cipher.encrypt(0, padded))


def new_header(
    cipher: str, key_bytes: int, hash_name: str, digest_iterations: int
) -> tuple[LuksHeader, bytes]:
    """A header with no active key slot, and the new random master key."""
    cipher_name, cipher_mode = split_cipher_spec(cipher)
    if hash_name not in HASHES:
        raise OpenError(
            f"LUKS hash {hash_name!r} is not supported (supported: {', '.join(HASHES)})"
        )
    master_key = os.urandom(key_bytes)
    try:
        make_sector_cipher(cipher_name, cipher_mode, master_key)
    except CipherSpecError as e:
        raise OpenError(str(e)) from None
    offsets, payload = layout(key_bytes)
    hdr = LuksHeader(
        cipher_name=cipher_name,
        cipher_mode=cipher_mode,
        hash_spec=hash_name,
        payload_offset=payload,
        key_bytes=key_bytes,
        mk_digest=b"",
        mk_digest_salt=os.urandom(SALT_SIZE),
        mk_digest_iterations=digest_iterations,
        uuid=str(uuid.uuid4()),
        slots=[KeySlot(key_offset=off) for off in offsets],
    )
    hdr.mk_digest = master_key_digest(hdr, master_key)
    return hdr, master_key


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


def _is_zero(data: bytes) -> bool:
    return data == bytes(len(data))


async def check_blank(edge: Edge, where: str) -> None:
    """Refuse to format a device that holds a LUKS header or data in its first MiB."""
    size = device_size(edge)
    head = await edge.read(0, min(size, ALIGN_PAYLOAD))
    version = probe(head)
    if version is not None:
        raise OpenError(
            f"{where}: refusing to format: the device already holds a LUKS{version} header"
        )
    if not _is_zero(head):
        raise OpenError(
            f"{where}: refusing to format: the first MiB of the device is not all zeroes, "
            "so it may hold data"
        )


async def unlock(edge: Edge, hdr: LuksHeader, passphrase: bytes, where: str) -> tuple[int, bytes]:
    """(slot, master key): try every active slot, PBKDF2 on a worker thread."""
    active = hdr.active_slots()
    if not active:
        raise WrongKey(f"{where}: the LUKS header has no active key slot")
    for index in active:
        slot = hdr.slots[index]
        material = await edge.read(slot.key_offset * SECTOR, hdr.material_size(slot))
        key = await trio.to_thread.run_sync(open_key_slot, hdr, index, passphrase, material)
        if key is not None:
            return index, key
    raise WrongKey(
        f"{where}: wrong key: no key slot accepts it ({len(active)} active slot(s) tried)"
    )


async def write_header(edge: Edge, hdr: LuksHeader) -> None:
    await edge.write(0, hdr.pack())
    await edge.flush()


async def format_device(
    edge: Edge,
    where: str,
    passphrase: bytes,
    *,
    cipher: str = "aes-xts-plain64",
    key_bytes: int = 64,
    hash_name: str = "sha256",
    iter_time_ms: int = 2000,
    iterations: int | None = None,
) -> LuksHeader:
    """Write a new LUKS1 header with `passphrase` in key slot 0.

    The caller has decided that the device may be overwritten (check_blank).
    `iterations` forces the key slot's PBKDF2 count; otherwise it is
    calibrated to `iter_time_ms`.
    """
    if not passphrase:
        raise OpenError(f"{where}: the passphrase is empty")
    if iterations is None:
        slot_iterations, digest_iterations = await trio.to_thread.run_sync(
            calibrate, hash_name, key_bytes, iter_time_ms
        )
    else:
        slot_iterations, digest_iterations = iterations, MIN_ITERATIONS
    hdr, master_key = new_header(cipher, key_bytes, hash_name, digest_iterations)
    if hdr.payload_bytes > device_size(edge):
        raise OpenError(
            f"{where}: the device is too small for a LUKS1 header: it needs at least "
            f"{hdr.payload_bytes} bytes, it has {device_size(edge)}"
        )
    slot, material = await trio.to_thread.run_sync(
        seal_key_slot, hdr, 0, passphrase, master_key, slot_iterations
    )
    hdr.slots[0] = slot
    area = bytearray(hdr.payload_bytes)
    area[slot.key_offset * SECTOR : slot.key_offset * SECTOR + len(material)] = material
    area[:HEADER_SIZE] = hdr.pack()
    await edge.write(0, bytes(area))
    await edge.flush()
    return hdr


async def add_key(
    edge: Edge,
    hdr: LuksHeader,
    master_key: bytes,
    passphrase: bytes,
    where: str,
    *,
    slot_index: int | None = None,
    iter_time_ms: int = 2000,
    iterations: int | None = None,
) -> int:
    """Seal `master_key` with `passphrase` in a free key slot; returns the slot number.

    The material is written and flushed before the header points at it, so a
    crash leaves either the old header or a complete new slot.
    """
    if not passphrase:
        raise OpenError(f"{where}: the new passphrase is empty")
    if slot_index is None:
        free = [i for i, s in enumerate(hdr.slots) if not s.enabled]
        if not free:
            raise OpenError(f"{where}: all {NUM_KEY_SLOTS} key slots are in use")
        slot_index = free[0]
    elif not 0 <= slot_index < NUM_KEY_SLOTS:
        raise OpenError(f"{where}: key slot {slot_index} does not exist (0-{NUM_KEY_SLOTS - 1})")
    elif hdr.slots[slot_index].enabled:
        raise OpenError(f"{where}: key slot {slot_index} is in use")
    target = hdr.slots[slot_index]
    end = target.key_offset * SECTOR + hdr.material_size(replace(target, stripes=STRIPES))
    if target.key_offset * SECTOR < HEADER_SIZE or end > hdr.payload_bytes:
        raise CorruptImage(
            f"{where}: damaged LUKS header: key slot {slot_index}'s area lies outside the header"
        )
    if iterations is None:
        slot_iterations, _ = await trio.to_thread.run_sync(
            calibrate, hdr.hash_spec, hdr.key_bytes, iter_time_ms
        )
    else:
        slot_iterations = iterations
    slot, material = await trio.to_thread.run_sync(
        seal_key_slot, hdr, slot_index, passphrase, master_key, slot_iterations
    )
    await edge.write(slot.key_offset * SECTOR, material)
    await edge.flush()
    hdr.slots[slot_index] = slot
    await write_header(edge, hdr)
    return slot_index


async def remove_key(edge: Edge, hdr: LuksHeader, slot_index: int, where: str) -> None:
    """Disable a key slot in the header, then overwrite its material with random bytes."""
    if not 0 <= slot_index < NUM_KEY_SLOTS:
        raise OpenError(f"{where}: key slot {slot_index} does not exist (0-{NUM_KEY_SLOTS - 1})")
    slot = hdr.slots[slot_index]
    if not slot.enabled:
        raise OpenError(f"{where}: key slot {slot_index} is not in use")
    hdr.slots[slot_index] = replace(
        slot, state=KEY_DISABLED, iterations=0, salt=bytes(SALT_SIZE), stripes=STRIPES
    )
    await write_header(edge, hdr)
    size = hdr.material_size(slot)
    await edge.write(slot.key_offset * SECTOR, os.urandom(size))
    await edge.flush()
