"""Writing LUKS2 headers: format, add a key slot, remove one.

The layout is cryptsetup's default: 16 KiB header copies (12 KiB of JSON),
key slot areas from byte 32768 to the data segment at 16 MiB, each area the
AF material rounded up to 4 KiB.  JSON is written as cryptsetup writes it
(numbers that may pass 2^53 as strings), so cryptsetup reads what we write.

Crash safety: new key material goes into an unused area and is flushed
before any header copy names it; then both copies are rewritten with seqid
+ 1 (luks2_header.write_copies: secondary, flush, primary, flush).  A removed
slot leaves the metadata first, and only then is its area overwritten.  At
any crash point one valid copy holds either the old or the new key set.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from fusedisk.errors import OpenError
from fusedisk.filters.luks import luks2_json as lj
from fusedisk.filters.luks.cipher import CipherSpecError, make_sector_cipher, split_cipher_spec
from fusedisk.filters.luks.luks2_header import MAGIC_PRIMARY, VERSION, BinaryHeader, write_copies
from fusedisk.filters.luks.luks2_keyslot import (
    calibrate_argon2,
    calibrate_pbkdf2,
    pbkdf2,
    seal_keyslot,
)
from fusedisk.filters.luks.luks2_volume import Luks2Volume

HDR_SIZE = 16 << 10
PAYLOAD_OFFSET = 16 << 20
AREA_ALIGN = 4096
STRIPES = 4000
DIGEST_ITER_MS = 125
#: cryptsetup's default Argon2 memory (1 GiB), lowered to half the RAM like it does
DEFAULT_ARGON2_MEMORY_KIB = 1 << 20

Write = Callable[[int, bytes], Awaitable[None]]


@dataclass(frozen=True)
class KdfChoice:
    """How to derive a new key slot's key (fusedisk luks --pbkdf ...)."""

    type: str = "argon2id"  # or "argon2i", "pbkdf2"
    iter_time_ms: int = 2000
    iterations: int | None = None  # forced: PBKDF2 iterations or Argon2 passes
    memory_kib: int = DEFAULT_ARGON2_MEMORY_KIB
    parallel: int = 0  # 0: min(4, CPUs)
    hash: str = "sha256"  # PBKDF2's

    def kdf_json(self, key_bytes: int) -> dict[str, Any]:
        """The `kdf` object of a new key slot (costs calibrated here: blocking)."""
        salt = base64.b64encode(os.urandom(32)).decode()
        if self.type == "pbkdf2":
            n = self.iterations or calibrate_pbkdf2(self.hash, key_bytes, self.iter_time_ms)
            return {"type": "pbkdf2", "hash": self.hash, "iterations": n, "salt": salt}
        memory = min(self.memory_kib, _half_ram_kib(), lj.ARGON2_MAX_MEMORY_KIB)
        cpus = self.parallel or min(lj.ARGON2_MAX_PARALLEL, os.cpu_count() or 1)
        memory = max(memory, lj.ARGON2_MIN_MEMORY_KIB, 8 * cpus)
        passes = self.iterations or calibrate_argon2(self.type, memory, cpus, self.iter_time_ms)
        return {"type": self.type, "time": passes, "memory": memory, "cpus": cpus, "salt": salt}


def _half_ram_kib() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2048
    except (ValueError, OSError):
        return DEFAULT_ARGON2_MEMORY_KIB


def _area_size(key_bytes: int) -> int:
    return -(-key_bytes * STRIPES // AREA_ALIGN) * AREA_ALIGN


def _free_area(meta: dict[str, Any], size: int, hdr_size: int) -> int:
    """The first offset of `size` free bytes in the key slot areas (OpenError if none)."""
    start = 2 * hdr_size
    end = start + int(meta["config"]["keyslots_size"])
    used = sorted(
        (int(k["area"]["offset"]), int(k["area"]["offset"]) + int(k["area"]["size"]))
        for k in meta["keyslots"].values()
        if "area" in k
    )
    at = start
    for lo, hi in used:
        if at + size <= lo:
            break
        at = max(at, -(-hi // AREA_ALIGN) * AREA_ALIGN)
    if at + size > end:
        raise OpenError("no room is left in the LUKS2 key slot areas")
    return at


def _keyslot_json(key_bytes: int, offset: int, cipher: str, kdf: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "luks2",
        "key_size": key_bytes,
        "af": {"type": "luks1", "stripes": STRIPES, "hash": "sha256"},
        "area": {
            "type": "raw",
            "offset": str(offset),
            "size": str(_area_size(key_bytes)),
            "encryption": cipher,
            "key_size": key_bytes,
        },
        "kdf": kdf,
    }


def encode(meta: dict[str, Any], hdr_size: int) -> bytes:
    text = json.dumps(meta, separators=(",", ":")).encode()
    if len(text) >= hdr_size - 4096:
        raise OpenError(f"the LUKS2 metadata ({len(text)} bytes) no longer fits its area")
    return text


async def _seal(
    write: Write, meta: dict[str, Any], hdr_size: int, slot: int, passphrase: bytes,
    volume_key: bytes, kdf: KdfChoice, cipher: str,
) -> None:  # fmt: skip
    """Put a sealed key slot `slot` into `meta` (and its flushed material on the device)."""
    key_bytes = len(volume_key)
    offset = _free_area(meta, _area_size(key_bytes), hdr_size)
    kdf_json = await trio.to_thread.run_sync(kdf.kdf_json, key_bytes)
    entry = _keyslot_json(key_bytes, offset, cipher, kdf_json)
    parsed = lj.parse_metadata(
        encode({**meta, "keyslots": {str(slot): entry}}, hdr_size), hdr_size
    ).keyslots[slot]
    sealed, material = await trio.to_thread.run_sync(seal_keyslot, parsed, passphrase, volume_key)
    entry["kdf"]["salt"] = base64.b64encode(sealed.kdf.salt).decode()
    await write(offset, material)
    meta["keyslots"][str(slot)] = entry
    for digest in meta["digests"].values():
        if str(slot) not in digest["keyslots"]:
            digest["keyslots"].append(str(slot))


def new_metadata(
    cipher: str, key_bytes: int, sector_size: int, volume_key: bytes
) -> dict[str, Any]:
    """The JSON of a new volume without key slots (digest of `volume_key` included)."""
    salt = os.urandom(32)
    speed = calibrate_pbkdf2("sha256", 32, DIGEST_ITER_MS)
    digest = pbkdf2("sha256", volume_key, salt, speed, 32)
    return {
        "keyslots": {},
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": str(PAYLOAD_OFFSET),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": cipher,
                "sector_size": sector_size,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": [],
                "segments": ["0"],
                "hash": "sha256",
                "iterations": speed,
                "salt": base64.b64encode(salt).decode(),
                "digest": base64.b64encode(digest).decode(),
            }
        },
        "config": {
            "json_size": str(HDR_SIZE - 4096),
            "keyslots_size": str(PAYLOAD_OFFSET - 2 * HDR_SIZE),
        },
    }


async def format_volume(
    write: Write, device_size: int, where: str, passphrase: bytes, *,
    cipher: str = "aes-xts-plain64", key_bytes: int = 64, sector_size: int = 4096,
    kdf: KdfChoice = KdfChoice(), label: str = "",
) -> dict[str, Any]:  # fmt: skip
    """Write a new LUKS2 header with `passphrase` in key slot 0; returns its metadata."""
    if not passphrase:
        raise OpenError(f"{where}: the passphrase is empty")
    if device_size < PAYLOAD_OFFSET + sector_size:
        raise OpenError(
            f"{where}: the device is too small for a LUKS2 header: it needs more than "
            f"{PAYLOAD_OFFSET} bytes, it has {device_size}"
        )
    volume_key = os.urandom(key_bytes)
    try:
        make_sector_cipher(*split_cipher_spec(cipher), volume_key, sector_size)
    except CipherSpecError as e:
        raise OpenError(f"{where}: {e}") from None
    meta = await trio.to_thread.run_sync(new_metadata, cipher, key_bytes, sector_size, volume_key)
    await _seal(write, meta, HDR_SIZE, 0, passphrase, volume_key, kdf, cipher)
    binary = BinaryHeader(
        magic=MAGIC_PRIMARY, version=VERSION, hdr_size=HDR_SIZE, seqid=0, label=label,
        csum_alg="sha256", salt=os.urandom(64), uuid=str(uuid.uuid4()), subsystem="",
        hdr_offset=0,
    )  # fmt: skip
    await write_copies(write, binary, encode(meta, HDR_SIZE))
    return meta


def _raw(volume: Luks2Volume) -> dict[str, Any]:
    return json.loads(volume.headers.current.json_text)


async def add_key(
    write: Write, volume: Luks2Volume, volume_key: bytes, passphrase: bytes, where: str,
    slot: int | None = None, kdf: KdfChoice = KdfChoice(),
) -> int:  # fmt: skip
    """Seal `volume_key` with `passphrase` in a free key slot; returns its number."""
    if not passphrase:
        raise OpenError(f"{where}: the new passphrase is empty")
    meta = _raw(volume)
    used = {int(k) for k in meta["keyslots"]}
    if slot is None:
        free = [i for i in range(lj.MAX_OBJECTS) if i not in used]
        if not free:
            raise OpenError(f"{where}: all {lj.MAX_OBJECTS} key slots are in use")
        slot = free[0]
    elif not 0 <= slot < lj.MAX_OBJECTS:
        raise OpenError(f"{where}: key slot {slot} does not exist (0-{lj.MAX_OBJECTS - 1})")
    elif slot in used:
        raise OpenError(f"{where}: key slot {slot} is in use")
    hdr_size = volume.hdr_size
    try:
        await _seal(write, meta, hdr_size, slot, passphrase, volume_key, kdf, _area_cipher(volume))
    except OpenError as e:
        raise OpenError(f"{where}: {e}") from None
    await write_copies(write, volume.headers.current.binary, encode(meta, hdr_size))
    return slot


def _area_cipher(volume: Luks2Volume) -> str:
    for ks in volume.meta.keyslots.values():
        if ks.type == "luks2":
            return ks.area_encryption
    return volume.segment.encryption


async def remove_key(write: Write, volume: Luks2Volume, slot: int, where: str) -> None:
    """Take key slot `slot` out of the metadata (both copies), then wipe its area."""
    meta = _raw(volume)
    entry = meta["keyslots"].pop(str(slot), None)
    if entry is None:
        raise OpenError(f"{where}: key slot {slot} is not in use")
    for holder in (*meta["digests"].values(), *meta["tokens"].values()):
        if str(slot) in holder.get("keyslots", []):
            holder["keyslots"].remove(str(slot))
    await write_copies(write, volume.headers.current.binary, encode(meta, volume.hdr_size))
    area = entry.get("area", {})
    await write(int(area["offset"]), os.urandom(int(area["size"])))
