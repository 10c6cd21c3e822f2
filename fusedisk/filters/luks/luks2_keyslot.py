"""LUKS2 key slots: key derivation (Argon2id, Argon2i, PBKDF2), AF split, digests.

A key slot opens when KDF(passphrase, salt) decrypts its area (a run of
512-byte sectors, IVs from 0, the area's own cipher) into AF stripes that
merge, with the af hash, into a key whose PBKDF2 digest matches a digest
bound to that keyslot.  Both Argon2 variants come from `cryptography`
(hazmat.primitives.kdf.argon2, OpenSSL 3.2+), like PBKDF2 — no new
dependency.  Argon2 costs were range-checked by luks2_json (memory ≤ 4 GiB,
lanes ≤ 4), so one derivation allocates at most what cryptsetup would.

Pure functions (bytes in, bytes out); blocking: the caller runs them on a
worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import replace

from cryptography.hazmat.primitives.kdf.argon2 import Argon2i, Argon2id

from fusedisk.filters.luks import keyslot_crypto
from fusedisk.filters.luks.cipher import (
    CipherSpecError,
    SectorCipher,
    make_sector_cipher,
    split_cipher_spec,
)
from fusedisk.filters.luks.keyslot_crypto import HASHES, af_merge, af_split
from fusedisk.filters.luks.luks2_json import PBKDF2_HASHES, Digest, Kdf, Keyslot

assert tuple(HASHES) == PBKDF2_HASHES


class KeyslotError(ValueError):
    """The key slot names something fusedisk cannot compute (the message says what)."""


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """keyslot_crypto.pbkdf2, refusing a hash it does not know with a KeyslotError."""
    if hash_name not in HASHES:
        raise KeyslotError(f"PBKDF2: hash {hash_name!r} is not supported ({', '.join(HASHES)})")
    return keyslot_crypto.pbkdf2(hash_name, secret, salt, iterations, length)


def derive(kdf: Kdf, passphrase: bytes, length: int) -> bytes:
    """The key slot's area key from a passphrase."""
    if kdf.type == "pbkdf2":
        return pbkdf2(kdf.hash, passphrase, kdf.salt, kdf.iterations, length)
    argon = Argon2id if kdf.type == "argon2id" else Argon2i
    if kdf.type not in ("argon2id", "argon2i"):
        raise KeyslotError(f"key derivation {kdf.type!r} is not supported")
    return argon(
        salt=kdf.salt,
        length=length,
        iterations=kdf.time,
        lanes=kdf.cpus,
        memory_cost=kdf.memory,
    ).derive(passphrase)


def _check_af_hash(name: str) -> None:
    if name not in hashlib.algorithms_guaranteed:
        raise KeyslotError(f"AF hash {name!r} is not supported")


def area_cipher(ks: Keyslot, key: bytes) -> SectorCipher:
    try:
        name, mode = split_cipher_spec(ks.area_encryption)
        return make_sector_cipher(name, mode, key)
    except CipherSpecError as e:
        raise KeyslotError(f"area encryption: {e}") from None


def digest_matches(digest: Digest, key: bytes) -> bool:
    computed = pbkdf2(digest.hash, key, digest.salt, digest.iterations, len(digest.digest))
    return hmac.compare_digest(computed, digest.digest)


def open_keyslot(ks: Keyslot, digest: Digest, passphrase: bytes, material: bytes) -> bytes | None:
    """The volume key if `passphrase` opens `ks` (whose area bytes are `material`)."""
    _check_af_hash(ks.af_hash)
    try:
        area_key = derive(ks.kdf, passphrase, ks.area_key_size)
    except ValueError as e:  # a parameter cryptography refuses that the checks let by
        raise KeyslotError(f"key derivation: {e}") from None
    split = area_cipher(ks, area_key).decrypt(0, material[: ks.material_size])
    key = af_merge(bytes(split), ks.key_size, ks.af_stripes, ks.af_hash)
    return key if digest_matches(digest, key) else None


def seal_keyslot(ks: Keyslot, passphrase: bytes, volume_key: bytes) -> tuple[Keyslot, bytes]:
    """`ks` with a fresh salt, and its area material sealing `volume_key`."""
    _check_af_hash(ks.af_hash)
    ks = replace(ks, kdf=replace(ks.kdf, salt=os.urandom(32)))
    area_key = derive(ks.kdf, passphrase, ks.area_key_size)
    split = af_split(volume_key, ks.af_stripes, ks.af_hash).ljust(ks.material_size, b"\0")
    return ks, bytes(area_cipher(ks, area_key).encrypt(0, split))


def calibrate_pbkdf2(hash_name: str, length: int, iter_time_ms: int) -> int:
    """PBKDF2 iterations this machine runs in `iter_time_ms` (cryptsetup --iter-time)."""
    n = 1000
    while True:
        t0 = time.perf_counter()
        pbkdf2(hash_name, b"fusedisk benchmark", bytes(32), n, length)
        elapsed = time.perf_counter() - t0
        if elapsed >= 0.05 or n >= 1 << 28:
            return max(1000, min((1 << 31) - 1, int(n / max(elapsed, 1e-9) * iter_time_ms / 1000)))
        n *= 4


def calibrate_argon2(kind: str, memory: int, cpus: int, iter_time_ms: int) -> int:
    """Argon2 passes at `memory` KiB that take about `iter_time_ms` (at least 4, as cryptsetup)."""
    probe = Kdf(kind, bytes(32), time=1, memory=memory, cpus=cpus)
    t0 = time.perf_counter()
    derive(probe, b"fusedisk benchmark", 32)
    elapsed = time.perf_counter() - t0
    return max(4, min(1 << 20, int(iter_time_ms / 1000 / max(elapsed, 1e-6))))
