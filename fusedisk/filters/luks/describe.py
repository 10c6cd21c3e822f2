"""What `fusedisk info` shows of a LUKS header, in `qemu-img info --output=json`'s names.

The cipher, hash, UUID and key slots; never key material or digests.  LUKS2
(which QEMU does not show) adds cryptsetup luksDump's fields:
luks2_volume.image_info.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from fusedisk.filters.luks import luks1_header, luks2_volume
from fusedisk.filters.luks.cipher import SECTOR
from fusedisk.hostio.files import image_size, read_head


def _luks2(path: str, size: int, where: str) -> dict[str, Any]:
    async def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    async def load() -> luks2_volume.Luks2Volume:
        return await luks2_volume.load(read, size, size, where)

    return luks2_volume.image_info(trio.run(load), size)


def describe(path: str) -> dict[str, Any]:
    where = f"LUKS image '{path}'"
    size = image_size(path, where)
    head = read_head(path, luks1_header.HEADER_SIZE, where)
    if luks1_header.probe(head) == 2:
        return _luks2(path, size, where)
    hdr = luks1_header.parse_header(head, size, where)
    mode, _, ivgen = hdr.cipher_mode.partition("-")
    key_bits = hdr.key_bytes * 8 // (2 if mode == "xts" else 1)  # XTS splits its key in two
    slots = []
    for slot in hdr.slots:
        entry: dict[str, Any] = {"active": slot.enabled}
        if slot.enabled:
            entry["iters"] = slot.iterations
        entry["key-offset"] = slot.key_offset * SECTOR
        if slot.enabled:
            entry["stripes"] = slot.stripes
        slots.append(entry)
    return {
        "virtual-size": size - hdr.payload_bytes,
        "encrypted": True,
        "format-specific": {
            "type": "luks",
            "data": {
                "cipher-alg": f"{hdr.cipher_name}-{key_bits}",
                "cipher-mode": mode,
                "ivgen-alg": ivgen or "plain",
                "hash-alg": hdr.hash_spec,
                "uuid": hdr.uuid,
                "payload-offset": hdr.payload_bytes,
                "master-key-iters": hdr.mk_digest_iterations,
                "slots": slots,
            },
        },
    }
