"""The sector cipher: whole requests, byte-identical to one cryptography call per sector."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedisk.filters.luks.cipher import (
    CipherSpecError,
    make_sector_cipher,
    sector_pieces,
    split_cipher_spec,
)
from fusedisk.filters.luks.cipher.base import CHUNK_SECTORS
from fusedisk.filters.luks.cipher.gf128 import expand_tweaks, times_alpha_power
from fusedisk.filters.luks.cipher.xts import XtsCipher

SECTOR = 512
CHUNK = CHUNK_SECTORS
# Sector counts around the boundaries: one sector, a pass of the cipher, 1 MiB, more.
COUNTS = [1, 2, 7, CHUNK - 1, CHUNK, CHUNK + 1, 2048, 2 * CHUNK + 3]
FIRST_SECTORS = [0, 1, 4095, 2**32 - 2, 2**32 + 7, 2**48 + 3, 2**64 - 4000]


def le64_iv(sector: int) -> bytes:
    return sector.to_bytes(16, "little")


def per_sector(mode_factory, key: bytes, first: int, data: bytes, encrypting: bool, iv) -> bytes:
    """The reference: one Cipher per 512-byte sector, as a naive implementation does."""
    out = []
    for i in range(len(data) // SECTOR):
        c = Cipher(algorithms.AES(key), mode_factory(iv(first + i)))
        ctx = c.encryptor() if encrypting else c.decryptor()
        out.append(ctx.update(data[i * SECTOR : (i + 1) * SECTOR]) + ctx.finalize())
    return b"".join(out)


def seeded(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("key_bytes", [32, 64])
@pytest.mark.parametrize("count", COUNTS)
def test_xts_matches_per_sector_xts(key_bytes, count):
    key = seeded(count, key_bytes)
    data = seeded(count + 1, count * SECTOR)
    first = FIRST_SECTORS[count % len(FIRST_SECTORS)]
    if first + count > 2**64:
        first = 2**64 - count
    sc = make_sector_cipher("aes", "xts-plain64", key)
    encrypted = sc.encrypt(first, data)
    assert encrypted == per_sector(modes.XTS, key, first, data, True, le64_iv)
    assert sc.decrypt(first, encrypted) == data
    assert sc.decrypt(first, data) == per_sector(modes.XTS, key, first, data, False, le64_iv)


@settings(max_examples=40, deadline=None)
@given(
    count=st.sampled_from(COUNTS),
    first=st.sampled_from(FIRST_SECTORS) | st.integers(0, 2**40),
    seed=st.integers(0, 2**32),
)
def test_xts_round_trips_and_matches_the_reference(count, first, seed):
    first = min(first, 2**64 - count)
    key = seeded(seed, 64)
    data = seeded(seed + 1, count * SECTOR)
    sc = make_sector_cipher("aes", "xts-plain64", key)
    encrypted = sc.encrypt(first, data)
    assert sc.decrypt(first, encrypted) == data
    # Spot-check one sector against the reference: sectors are independent.
    i = seed % count
    assert encrypted[i * SECTOR : (i + 1) * SECTOR] == per_sector(
        modes.XTS, key, first + i, data[i * SECTOR : (i + 1) * SECTOR], True, le64_iv
    )


def test_tweak_expansion_is_multiplication_by_alpha():
    def times_alpha(t: int) -> int:
        t <<= 1
        return (t ^ 0x87) & (2**128 - 1) if t >> 128 else t

    rng = random.Random(5)
    values = [0, 1, 2**127, 2**128 - 1] + [rng.getrandbits(128) for _ in range(20)]
    first = np.array([[v & (2**64 - 1), v >> 64] for v in values], dtype="<u8")
    out = np.empty((len(values), 32, 2), dtype="<u8")
    work = np.empty((5, len(values), 31), dtype="<u8")
    expand_tweaks(first, out, work)
    for i, v in enumerate(values):
        t = v
        for j in range(32):
            assert int(out[i, j, 0]) | int(out[i, j, 1]) << 64 == t, (i, j)
            t = times_alpha(t)


def essiv(key: bytes):
    salt = hashlib.sha256(key).digest()
    ecb = Cipher(algorithms.AES(salt), modes.ECB()).encryptor()
    return lambda sector: ecb.update(sector.to_bytes(16, "little"))


@pytest.mark.parametrize(
    ("mode", "iv_of"),
    [
        ("cbc-essiv:sha256", essiv),
        ("cbc-plain64", lambda key: le64_iv),
        ("cbc-plain", lambda key: lambda s: (s & 0xFFFFFFFF).to_bytes(16, "little")),
        ("cbc-plain64be", lambda key: lambda s: bytes(8) + s.to_bytes(8, "big")),
        ("cbc-null", lambda key: lambda s: bytes(16)),
    ],
)
@pytest.mark.parametrize("count", [1, 5, CHUNK + 1])
def test_cbc_modes_match_per_sector_cbc(mode, iv_of, count):
    key = seeded(count, 32)
    data = seeded(count + 2, count * SECTOR)
    first = 2**32 - 2  # crosses the 32-bit wrap of `plain`
    sc = make_sector_cipher("aes", mode, key)
    encrypted = sc.encrypt(first, data)
    assert encrypted == per_sector(modes.CBC, key, first, data, True, iv_of(key))
    assert sc.decrypt(first, encrypted) == data


def test_xts_with_essiv_hashes_the_whole_key():
    key = seeded(9, 64)
    data = seeded(10, 3 * SECTOR)
    sc = make_sector_cipher("aes", "xts-essiv:sha256", key)
    assert sc.encrypt(77, data) == per_sector(modes.XTS, key, 77, data, True, essiv(key))


def test_results_are_new_immutable_buffers():
    sc = make_sector_cipher("aes", "xts-plain64", bytes(range(64)))
    a = sc.encrypt(0, bytes(1024))
    b = sc.encrypt(0, b"\x01" * 1024)
    assert isinstance(a, bytes) and a != b
    assert a == sc.encrypt(0, bytes(1024))
    assert sc.encrypt(0, b"") == b""


def test_threads_share_one_cipher_safely():
    sc = make_sector_cipher("aes", "xts-plain64", seeded(1, 64))
    inputs = [seeded(i, (i % 5 + 1) * 64 * SECTOR) for i in range(16)]
    expected = [sc.encrypt(i * 1000, d) for i, d in enumerate(inputs)]
    errors: list[str] = []

    def work() -> None:
        for _ in range(5):
            for i, d in enumerate(inputs):
                if sc.encrypt(i * 1000, d) != expected[i]:
                    errors.append(f"input {i}")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize(
    ("name", "mode", "key_bytes", "message"),
    [
        ("serpent", "xts-plain64", 64, "only AES"),
        ("aes", "xts", 64, "names no IV generator"),
        ("aes", "ecb-plain64", 32, "supported modes"),
        ("aes", "xts-lmk", 64, "IV generator 'lmk' is not supported"),
        ("aes", "cbc-essiv:nohash", 32, "unknown ESSIV hash"),
        ("aes", "cbc-essiv:sha512", 32, "not an AES key size"),
        ("aes", "xts-plain64", 16, "needs a 256, 384 or 512-bit key"),
        ("aes", "cbc-plain64", 64, "needs a 128, 192 or 256-bit AES key"),
    ],
)
def test_unsupported_ciphers_are_named(name, mode, key_bytes, message):
    with pytest.raises(CipherSpecError, match=message):
        make_sector_cipher(name, mode, bytes(key_bytes))


@pytest.mark.parametrize(
    ("mode", "key_bytes"),
    [("xts-plain64", 64), ("xts-plain64", 32), ("cbc-essiv:sha256", 32), ("cbc-plain", 16)],
)
@pytest.mark.parametrize(("count", "most"), [(2, 2), (3, 2), (CHUNK + 3, 2), (2047, 4), (9, 8)])
def test_pieces_done_on_threads_at_once_equal_one_pass(mode, key_bytes, count, most):
    """The luks node cuts large requests into pieces for its workers: same bytes."""
    sc = make_sector_cipher("aes", mode, seeded(count, key_bytes))
    data = seeded(count + 1, count * SECTOR)
    first = 2**32 - 5  # `plain` wraps inside the request
    pieces = sector_pieces(len(data), most, SECTOR)
    assert len(pieces) == min(most, count)
    for encrypting, expected in ((True, sc.encrypt(first, data)), (False, sc.decrypt(first, data))):
        out = bytearray(len(data))
        src, dst = memoryview(data), memoryview(out)
        threads = [
            threading.Thread(
                target=sc.crypt_into,
                args=(first + start // SECTOR, src[start:end], dst[start:end], encrypting),
            )
            for start, end in pieces
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert bytes(out) == expected


@pytest.mark.parametrize("size", [512, 3 * 512, 256 << 10, (1 << 20) + 512, 7 << 20])
@pytest.mark.parametrize("most", [1, 2, 3, 16])
def test_sector_pieces_cover_the_request_in_whole_sectors(size, most):
    smallest = 256 << 10
    pieces = sector_pieces(size, most, smallest)
    assert pieces[0][0] == 0 and pieces[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    assert all(start % SECTOR == 0 and end > start for start, end in pieces)
    assert 1 <= len(pieces) <= most
    assert len(pieces) == 1 or all(end - start >= smallest for start, end in pieces)


def test_alpha_powers_are_repeated_multiplication():
    v = random.Random(3).getrandbits(128)
    w = v
    for _ in range(32):
        w = times_alpha_power(w, 1)
    assert times_alpha_power(v, 32) == w
    assert times_alpha_power(1 << 127, 1) == 0x87


@pytest.mark.parametrize("count", [1, CHUNK + 1])
def test_xts_stream_and_the_ecb_pass_give_the_same_bytes(count):
    key = seeded(11, 64)
    data = seeded(12, count * SECTOR)
    stream = make_sector_cipher("aes", "xts-plain64", key)
    ecb = make_sector_cipher("aes", "xts-plain64", key)
    assert isinstance(stream, XtsCipher) and isinstance(ecb, XtsCipher) and stream.stream
    ecb.stream = False
    assert stream.encrypt(99, data) == ecb.encrypt(99, data)
    assert stream.decrypt(99, data) == ecb.decrypt(99, data)


def test_xts_key_with_equal_halves_takes_the_ecb_pass():
    """OpenSSL refuses to encrypt XTS with two equal key halves; such a key still works."""
    key = seeded(13, 32) * 2
    data = seeded(14, 5 * SECTOR)
    sc = make_sector_cipher("aes", "xts-plain64", key)
    assert isinstance(sc, XtsCipher) and not sc.stream
    assert sc.decrypt(7, data) == per_sector(modes.XTS, key, 7, data, False, le64_iv)
    assert sc.decrypt(7, sc.encrypt(7, data)) == data


def test_partial_sectors_are_refused():
    sc = make_sector_cipher("aes", "xts-plain64", os.urandom(64))
    with pytest.raises(ValueError, match="whole number of sectors"):
        sc.encrypt(0, bytes(100))


def test_cipher_spec_splits_like_cryptsetup():
    assert split_cipher_spec("aes-xts-plain64") == ("aes", "xts-plain64")
    assert split_cipher_spec("aes-cbc-essiv:sha256") == ("aes", "cbc-essiv:sha256")
    with pytest.raises(CipherSpecError):
        split_cipher_spec("aes")


@pytest.mark.parametrize("count", [1, 16, 17, 300])  # ≤ 16: one OpenSSL context per sector
@pytest.mark.parametrize("key_bytes", [32, 64])
@pytest.mark.parametrize("first", [0, 5, (1 << 40) + 3])
def test_xts_4096_byte_sectors_match_one_xts_per_sector(key_bytes: int, first: int, count: int):
    """LUKS2 sector_size 4096: the IV counts 512-byte units (sector i: first + 8i, as
    cryptsetup does) and the tweak runs over all 256 blocks; checked against one plain
    XTS context per sector (OpenSSL)."""
    key, data = os.urandom(key_bytes), os.urandom(4096 * count)
    sc = make_sector_cipher("aes", "xts-plain64", key, 4096)
    out = sc.encrypt(first, data)
    ref = b"".join(
        Cipher(algorithms.AES(key), modes.XTS((first + 8 * i).to_bytes(16, "little")))
        .encryptor()
        .update(data[i * 4096 : (i + 1) * 4096])
        for i in range(count)
    )
    assert out == ref
    assert sc.decrypt(first, out) == data
    with pytest.raises(ValueError, match="whole number of sectors"):
        sc.encrypt(0, bytes(512))


def test_cbc_4096_byte_sectors_chain_over_the_whole_sector():
    key, data = os.urandom(32), os.urandom(4096 * 3)
    sc = make_sector_cipher("aes", "cbc-plain64", key, 4096)
    out = sc.encrypt(9, data)
    ref = b"".join(
        Cipher(algorithms.AES(key), modes.CBC((9 + 8 * i).to_bytes(16, "little")))
        .encryptor()
        .update(data[i * 4096 : (i + 1) * 4096])
        for i in range(3)
    )
    assert out == ref and sc.decrypt(9, out) == data


@pytest.mark.parametrize("count", [1, 40])
def test_xts_4096_with_a_384_bit_key_takes_the_vectorised_path(count: int):
    """OpenSSL has no AES-192 XTS; before, building the per-sector path's AES object
    raised ValueError at the cipher's creation (found by the crafted-header battery)."""
    key, data = os.urandom(48), os.urandom(4096 * count)
    sc = make_sector_cipher("aes", "xts-plain64", key, 4096)
    out = sc.encrypt(16, data)
    assert out != data and sc.decrypt(16, out) == data
