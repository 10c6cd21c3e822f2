"""Writing LUKS1: format a device, add a key slot, remove one.

Each write is ordered so that a crash leaves a header cryptsetup opens:
new key material is written and flushed before the header points at it,
and a removed slot is disabled in the header before its material is wiped.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from fusedisk.errors import CorruptImage, OpenError
from fusedisk.filters.luks.cipher import (
    SECTOR,
    CipherSpecError,
    make_sector_cipher,
    split_cipher_spec,
)
from fusedisk.filters.luks.keyslot_crypto import HASHES
from fusedisk.filters.luks.luks1_header import (
    ALIGN_PAYLOAD,
    HEADER_SIZE,
    KEY_DISABLED,
    MIN_ITERATIONS,
    NUM_KEY_SLOTS,
    SALT_SIZE,
    STRIPES,
    KeySlot,
    LuksHeader,
    device_size,
    layout,
    probe,
)
from fusedisk.filters.luks.luks1_keyslot import calibrate, master_key_digest, seal_key_slot

if TYPE_CHECKING:
    from fusedisk.graph.edge import Edge


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
