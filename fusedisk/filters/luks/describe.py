"""What `fusedisk info` shows of a LUKS header, in `qemu-img info --output=json`'s names.

The cipher, hash, UUID and key slots; never key material or digests.
"""

from __future__ import annotations

from typing import Any

from fusedisk.filters.luks import header
from fusedisk.hostio.files import image_size, read_head


def describe(path: str) -> dict[str, Any]:
    where = f"LUKS image '{path}'"
    size = image_size(path, where)
    hdr = header.parse_header(read_head(path, header.HEADER_SIZE, where), size, where)
    mode, _, ivgen = hdr.cipher_mode.partition("-")
    key_bits = hdr.key_bytes * 8 // (2 if mode == "xts" else 1)  # XTS splits its key in two
    slots = []
    for slot in hdr.slots:
        entry: dict[str, Any] = {"active": slot.enabled}
        if slot.enabled:
            entry["iters"] = slot.iterations
        entry["key-offset"] = slot.key_offset * header.SECTOR
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
