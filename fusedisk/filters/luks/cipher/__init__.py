"""Sector ciphers as dm-crypt and QEMU apply them: whole requests of 512 to 4096-byte sectors.

The public face: `make_sector_cipher` picks the cipher for a LUKS header's
cipher name and mode, `split_cipher_spec` splits cryptsetup's --cipher, and
the names callers use (SectorCipher, CipherSpecError, SECTOR...) come from
here.  The work is done in:

- base.py   sector geometry, per-thread workspaces, the SectorCipher base
- ivgen.py  IV generators (plain, plain64, plain64be, null, essiv)
- gf128.py  GF(2^128) tweak arithmetic over whole arrays (numpy)
- xts.py    aes-xts: numpy tweaks, one OpenSSL pass per chunk (or per sector)
- cbc.py    aes-cbc
"""

from __future__ import annotations

from fusedisk.filters.luks.cipher.base import (
    SECTOR,
    SECTOR_SIZES,
    Buffer,
    CipherSpecError,
    SectorCipher,
    sector_pieces,
)
from fusedisk.filters.luks.cipher.cbc import CbcCipher
from fusedisk.filters.luks.cipher.ivgen import make_ivgen
from fusedisk.filters.luks.cipher.xts import XtsCipher

__all__ = [
    "SECTOR",
    "SECTOR_SIZES",
    "Buffer",
    "CipherSpecError",
    "SectorCipher",
    "make_sector_cipher",
    "sector_pieces",
    "split_cipher_spec",
]


def make_sector_cipher(
    cipher_name: str, cipher_mode: str, key: bytes, sector_size: int = SECTOR
) -> SectorCipher:
    """The sector cipher for a LUKS header's cipher name ('aes') and mode ('xts-plain64'),
    over sectors of `sector_size` bytes (LUKS1: always 512).

    Raises CipherSpecError naming what is not supported.
    """
    spec = f"{cipher_name}-{cipher_mode}"
    if cipher_name != "aes":
        raise CipherSpecError(f"cipher {spec!r} is not supported (only AES is)")
    chain, _, iv_spec = cipher_mode.partition("-")
    if not iv_spec:
        raise CipherSpecError(f"cipher mode {cipher_mode!r} names no IV generator")
    ivgen = make_ivgen(iv_spec, key)
    if chain == "xts":
        return XtsCipher(spec, key, ivgen, sector_size)
    if chain == "cbc":
        return CbcCipher(spec, key, ivgen, sector_size)
    raise CipherSpecError(f"cipher {spec!r} is not supported (supported modes: xts, cbc)")


def split_cipher_spec(text: str) -> tuple[str, str]:
    """'aes-xts-plain64' -> ('aes', 'xts-plain64'), as cryptsetup splits --cipher."""
    name, _, mode = text.partition("-")
    if not name or not mode:
        raise CipherSpecError(f"expected a cipher such as 'aes-xts-plain64', got {text!r}")
    return name, mode
