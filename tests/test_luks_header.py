"""The LUKS1 on-disk format: header fields, checks, layout, AF splitter, key slots."""

from __future__ import annotations

import hashlib
import itertools
import struct

import pytest

from fusedisk.errors import CorruptImage, OpenError
from fusedisk.filters.luks import keyslot_crypto, luks1_keyslot, luks1_manage
from fusedisk.filters.luks import luks1_header as lh

MiB = 1 << 20


def fresh(key_bytes: int = 64, cipher: str = "aes-xts-plain64", hash_name: str = "sha256"):
    hdr, mk = luks1_manage.new_header(cipher, key_bytes, hash_name, 1000)
    slot, material = luks1_keyslot.seal_key_slot(hdr, 0, b"pass", mk, 1000)
    hdr.slots[0] = slot
    return hdr, mk, material


def test_header_is_592_bytes_and_round_trips():
    hdr, _, _ = fresh()
    raw = hdr.pack()
    assert len(raw) == lh.HEADER_SIZE == 592
    assert raw[:6] == b"LUKS\xba\xbe" and raw[6:8] == b"\x00\x01"
    back = lh.parse_header(raw, 4 * MiB, "test")
    assert back == hdr


@pytest.mark.parametrize(("key_bytes", "payload"), [(32, 4096), (64, 4096), (16, 2048)])
def test_layout_is_cryptsetups(key_bytes, payload):
    offsets, payload_offset = lh.layout(key_bytes)
    assert offsets[0] == 8  # 4096 bytes
    material = -(-key_bytes * lh.STRIPES // 512)
    assert all(b - a >= material and b % 8 == 0 for a, b in itertools.pairwise(offsets))
    assert payload_offset == payload


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_bytes", [16, 32, 64])
def test_af_split_and_merge_are_inverse(hash_name, key_bytes):
    key = bytes(range(key_bytes))
    split = keyslot_crypto.af_split(key, 4000, hash_name)
    assert len(split) == key_bytes * 4000
    assert keyslot_crypto.af_merge(split, key_bytes, 4000, hash_name) == key
    # Losing any one stripe loses the key.
    damaged = bytearray(split)
    damaged[key_bytes * 1234] ^= 1
    assert keyslot_crypto.af_merge(bytes(damaged), key_bytes, 4000, hash_name) != key


def test_diffuse_hashes_each_digest_sized_piece_with_its_index():
    block = bytes(range(50))  # sha256: pieces of 32 and 18 bytes
    expected = (
        hashlib.sha256(b"\0\0\0\0" + block[:32]).digest()
        + hashlib.sha256(b"\0\0\0\1" + block[32:]).digest()[:18]
    )
    assert keyslot_crypto.diffuse(block, "sha256") == expected


def test_a_key_slot_opens_with_its_passphrase_only():
    hdr, mk, material = fresh()
    assert luks1_keyslot.open_key_slot(hdr, 0, b"pass", material) == mk
    assert luks1_keyslot.open_key_slot(hdr, 0, b"Pass", material) is None
    assert len(material) == hdr.material_size(hdr.slots[0]) == 500 * 512


@pytest.mark.parametrize("cipher", ["aes-cbc-essiv:sha256", "aes-cbc-plain64"])
def test_key_slots_work_with_cbc_ciphers(cipher):
    hdr, mk, material = fresh(32, cipher, "sha1")
    assert luks1_keyslot.open_key_slot(hdr, 0, b"pass", material) == mk


def test_calibration_gives_at_least_cryptsetups_minimum():
    slot, digest = luks1_keyslot.calibrate("sha256", 32, 1)
    assert slot >= lh.MIN_ITERATIONS and digest >= lh.MIN_ITERATIONS


def raw_header(**changes) -> bytearray:
    hdr, _, _ = fresh()
    raw = bytearray(hdr.pack())
    for offset, value in changes.values():
        raw[offset : offset + len(value)] = value
    return raw


SLOT0 = 208  # the first key slot descriptor


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"magic": (0, b"LUKX")}, CorruptImage, "no LUKS header"),
        ({"version": (6, b"\0\2")}, OpenError, "a LUKS2 header is read by luks2_volume"),
        ({"version": (6, b"\0\7")}, CorruptImage, "unknown version 7"),
        ({"cipher": (8, b"x" * 32)}, CorruptImage, "field 'cipher-name' is not terminated"),
        ({"cipher": (8, b"twofish\0")}, OpenError, "only AES"),
        ({"hash": (72, b"md5\0\0\0\0")}, OpenError, "hash 'md5' is not supported"),
        ({"payload": (104, struct.pack(">I", 0))}, OpenError, "detached LUKS header"),
        ({"payload": (104, struct.pack(">I", 100))}, CorruptImage, "outside the header area"),
        ({"keybytes": (108, struct.pack(">I", 999))}, CorruptImage, "key size of 999"),
        ({"mkiter": (164, struct.pack(">I", 0))}, CorruptImage, "0 iterations"),
        ({"state": (SLOT0, b"\x12\x34\x56\x78")}, CorruptImage, "unknown state 0x12345678"),
        ({"slotiter": (SLOT0 + 4, struct.pack(">I", 0))}, CorruptImage, "key slot 0 has 0 iter"),
        ({"stripes": (SLOT0 + 44, struct.pack(">I", 0))}, CorruptImage, "0 stripes"),
        ({"offset": (SLOT0 + 40, struct.pack(">I", 1))}, CorruptImage, "outside the header"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_damaged_headers_are_refused_with_a_reason(change, error, message):
    raw = raw_header(**change)
    with pytest.raises(error, match=message) as info:
        lh.parse_header(bytes(raw), 4 * MiB, "node 'crypt'")
    assert str(info.value).startswith("node 'crypt': ")


def test_overlapping_key_slots_are_refused():
    hdr, mk, _ = fresh()
    hdr.slots[1], _ = luks1_keyslot.seal_key_slot(hdr, 1, b"two", mk, 1000)
    hdr.slots[1].key_offset = hdr.slots[0].key_offset + 8
    with pytest.raises(CorruptImage, match="key slots 0 and 1 overlap"):
        lh.parse_header(hdr.pack(), 4 * MiB, "x")


def test_a_truncated_device_is_named():
    hdr, _, _ = fresh()
    with pytest.raises(CorruptImage, match=r"the device is truncated: .* at byte 2097152, but"):
        lh.parse_header(hdr.pack(), MiB, "x")
    with pytest.raises(CorruptImage, match="truncated: 100 bytes cannot hold"):
        lh.parse_header(hdr.pack()[:100], 100, "x")


def test_dump_shows_the_header_without_secrets():
    hdr, mk, _ = fresh()
    text = lh.dump(hdr)
    assert "Cipher mode:   \txts-plain64" in text
    assert "Key Slot 0: ENABLED" in text and "Key Slot 7: DISABLED" in text
    assert f"UUID:          \t{hdr.uuid}" in text
    assert mk.hex() not in text.replace(" ", "")
