"""The key-slot cryptography both LUKS versions share: PBKDF2 over the hashes LUKS
names, the anti-forensic splitter, and the error of a key no slot accepts.

A key slot holds the volume key split by AFsplit into `stripes` blocks, all
but one random, joined by a hash-based diffusion, so that losing any one
block (an overwritten sector) loses the key; AFmerge undoes it.  LUKS1 and
LUKS2 split the same way; LUKS2 adds Argon2 beside PBKDF2 (luks2_keyslot).

References: "LUKS1 On-Disk Format Specification" 1.2.3 (C. Fruhwirth);
cryptsetup lib/luks1/af.c.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from fusedisk.errors import OpenError

#: hashes LUKS headers name, as cryptography algorithms (PBKDF2) and hashlib names (AF)
HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class WrongKey(OpenError):
    """No key slot accepts the key that was given."""


def pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=HASHES[hash_name](), length=length, salt=salt, iterations=iterations)
    return kdf.derive(password)


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
