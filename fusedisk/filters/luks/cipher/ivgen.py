"""IV generators (dm-crypt's names), each making the IVs of a whole run of sectors at once.

`plain` (sector number, 32 bits, little endian), `plain64` (64 bits),
`plain64be`, `null`, `essiv:<hash>` (the sector number encrypted with AES
keyed by hash(volume key)).  Sector numbers count from 0 at the start of the
area (the payload, or one key slot's material), in 512-byte units whatever
the sector size (`step` apart for larger sectors).

References: Linux drivers/md/dm-crypt.c (IV modes).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import numpy as np

from fusedisk.filters.luks.cipher.base import U64, CipherSpecError, ecb_encryptor


def _sector_numbers(first: int, count: int, step: int = 1) -> np.ndarray:
    """(count, 2) little-endian u64: the sector numbers in the low word, zero high word."""
    ivs = np.zeros((count, 2), dtype=U64)
    ivs[:, 0] = np.arange(first, first + count * step, step, dtype=np.uint64)
    return ivs


class IvGen:
    """Makes the 16-byte IVs of `count` sectors from `first` on, `step` apart, as one buffer."""

    name = ""

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        raise NotImplementedError


class PlainIv(IvGen):
    name = "plain"

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        ivs = _sector_numbers(first, count, step)
        ivs[:, 0] &= np.uint64(0xFFFFFFFF)
        return ivs


class Plain64Iv(IvGen):
    name = "plain64"

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        return _sector_numbers(first, count, step)


class Plain64BeIv(IvGen):
    name = "plain64be"

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        ivs = np.zeros((count, 2), dtype=U64)
        # The big-endian sector number sits in the last 8 bytes of the IV.
        ivs[:, 1] = np.arange(first, first + count * step, step, dtype=np.uint64).byteswap()
        return ivs


class NullIv(IvGen):
    name = "null"

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        return np.zeros((count, 2), dtype=U64)


class EssivIv(IvGen):
    """IV = AES(hash(volume key), le64(sector)): the IVs cannot be predicted."""

    def __init__(self, hash_name: str, key: bytes) -> None:
        self.name = f"essiv:{hash_name}"
        salt = hashlib.new(hash_name, key).digest()
        if len(salt) not in (16, 24, 32):
            raise CipherSpecError(
                f"essiv:{hash_name} gives a {len(salt) * 8}-bit salt, not an AES key size"
            )
        self._salt = salt
        self._local = threading.local()

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = ecb_encryptor(self._salt)
        plain = _sector_numbers(first, count, step)
        return np.frombuffer(ctx.update(plain.tobytes()), dtype=U64).reshape(count, 2)


def make_ivgen(spec: str, key: bytes) -> IvGen:
    name, _, option = spec.partition(":")
    simple: dict[str, Callable[[], IvGen]] = {
        "plain": PlainIv,
        "plain64": Plain64Iv,
        "plain64be": Plain64BeIv,
        "null": NullIv,
    }
    if name in simple and not option:
        return simple[name]()
    if name == "essiv":
        if option not in hashlib.algorithms_available:
            raise CipherSpecError(f"unknown ESSIV hash {option!r}")
        return EssivIv(option, key)
    known = ", ".join([*simple, "essiv:<hash>"])
    raise CipherSpecError(f"IV generator {spec!r} is not supported (supported: {known})")
