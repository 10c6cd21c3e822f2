"""LUKS1 key slots: PBKDF2 calibration, opening and sealing a slot, unlocking a device.

A key slot opens when PBKDF2(hash, passphrase, slot salt, slot iterations)
decrypts its material into stripes that merge (AFmerge) into a key whose
PBKDF2 digest equals the header's master-key digest.  The pure functions
block (PBKDF2): `unlock` runs them on a worker thread.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import replace
from time import perf_counter
from typing import TYPE_CHECKING

import trio

from fusedisk.filters.luks.cipher import SECTOR, make_sector_cipher
from fusedisk.filters.luks.keyslot_crypto import WrongKey, af_merge, af_split, pbkdf2
from fusedisk.filters.luks.luks1_header import (
    DIGEST_SIZE,
    KEY_ENABLED,
    MIN_ITERATIONS,
    MKD_ITER_MS,
    SALT_SIZE,
    STRIPES,
    KeySlot,
    LuksHeader,
)

if TYPE_CHECKING:
    from fusedisk.graph.edge import Edge


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
