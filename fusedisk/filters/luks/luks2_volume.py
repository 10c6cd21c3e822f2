"""A LUKS2 volume: its header copy in use, checked metadata, its data segment, unlocking.

The `luks` node and `fusedisk luks` load a volume (load), then unlock it
with a passphrase (unlock).  Everything that fusedisk cannot honour is
refused here, before any key derivation, with the node named: re-encryption
in progress, unknown requirements, integrity segments, several segments, a
detached header not given.  Tokens are never run: a token that needs a
cryptsetup plugin (systemd-tpm2, fido2, clevis...) is named in the error if
no key slot opens with the passphrase given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from fusedisk.errors import CorruptImage, OpenError
from fusedisk.filters.luks import luks2_checks as lc
from fusedisk.filters.luks import luks2_json as lj
from fusedisk.filters.luks.keyslot_crypto import WrongKey
from fusedisk.filters.luks.luks2_header import Luks2Headers, Reader, read_headers
from fusedisk.filters.luks.luks2_keyslot import KeyslotError, open_keyslot


@dataclass
class Luks2Volume:
    headers: Luks2Headers
    meta: lj.Metadata
    segment: lj.Segment
    #: the header sits in a file of its own (option header-file)
    detached: bool

    @property
    def hdr_size(self) -> int:
        return self.headers.current.binary.hdr_size

    def digest_for(self, keyslot: int) -> lj.Digest | None:
        for d in self.meta.digests.values():
            if keyslot in d.keyslots and self.segment.id in d.segments:
                return d
        return None

    def active_keyslots(self) -> list[int]:
        return sorted(i for i, k in self.meta.keyslots.items() if k.type == "luks2")

    def data_size(self, data_device_size: int) -> int:
        """Bytes of plaintext: the fixed size, or to the data device's end."""
        seg = self.segment
        if seg.size is not None:
            return seg.size
        room = max(0, data_device_size - seg.offset)
        return room // seg.sector_size * seg.sector_size

    def info(self) -> dict[str, Any]:
        b = self.headers.current.binary
        seg = self.segment
        return {
            "version": 2,
            "uuid": b.uuid,
            "label": b.label,
            "subsystem": b.subsystem,
            "seqid": b.seqid,
            "header-size": b.hdr_size,
            "header-copy": self.headers.current.which,
            "other-copy-problem": self.headers.other_problem,
            "cipher": seg.encryption,
            "sector-size": seg.sector_size,
            "payload-offset": seg.offset,
            "payload-size": "dynamic" if seg.size is None else seg.size,
            "iv-tweak": seg.iv_tweak,
            "key-bits": (self.meta.keyslots[k].key_size * 8 if (k := self._first()) >= 0 else 0),
            "keyslots": {
                str(i): {"kdf": ks.kdf.type, "priority": ks.priority}
                for i, ks in self.meta.keyslots.items()
            },
            "tokens": [t["type"] for t in self.meta.tokens.values()],
        }

    def _first(self) -> int:
        active = self.active_keyslots()
        return active[0] if active else -1


async def load(read: Reader, header_size: int, data_size: int | None, where: str,
               detached: bool = False) -> Luks2Volume:  # fmt: skip
    """Read and check a LUKS2 header (`header_size`: bytes of the device holding it;
    `data_size`: the data device's, when the header is attached)."""
    headers = await read_headers(read, header_size, where)
    copy = headers.current
    try:
        meta = lj.parse_metadata(copy.json_text, copy.binary.hdr_size)
    except lj.MetadataError as e:
        raise CorruptImage(f"{where}: damaged LUKS2 header ({copy.which} copy): {e}") from None
    reason = lc.refusals(meta)
    if reason is not None:
        raise OpenError(f"{where}: cannot open this LUKS2 volume: {reason}")
    segment = next(iter(meta.segments.values()))
    try:
        lc.check_layout(meta, copy.binary.hdr_size, header_size)
    except lj.MetadataError as e:
        raise CorruptImage(f"{where}: damaged LUKS2 header ({copy.which} copy): {e}") from None
    if segment.offset == 0 and not detached:
        raise OpenError(
            f"{where}: this LUKS2 header is detached (its data segment starts at byte 0 of "
            "another device); give the header with option 'header-file'"
        )
    fixed_end = None if segment.size is None else segment.offset + segment.size
    if data_size is not None and fixed_end is not None and fixed_end > data_size:
        raise CorruptImage(
            f"{where}: the device is truncated: the LUKS2 data segment ends at byte "
            f"{fixed_end}, the device holds {data_size} bytes"
        )
    return Luks2Volume(headers, meta, segment, detached)


def _order(volume: Luks2Volume) -> list[lj.Keyslot]:
    """Key slots to try: high priority first, then normal; 'ignore' (0) never."""
    slots = [volume.meta.keyslots[i] for i in volume.active_keyslots()]
    return sorted((k for k in slots if k.priority > 0), key=lambda k: -k.priority)


async def unlock(
    read: Reader, volume: Luks2Volume, passphrase: bytes, where: str
) -> tuple[int, bytes]:
    """(key slot, volume key); the key derivations run on a worker thread, one at a time."""
    tried = 0
    for ks in _order(volume):
        digest = volume.digest_for(ks.id)
        if digest is None:
            continue
        material = await read(ks.area_offset, ks.material_size)
        try:
            key = await trio.to_thread.run_sync(open_keyslot, ks, digest, passphrase, material)
        except KeyslotError as e:
            raise OpenError(f"{where}: keyslot {ks.id}: {e}") from None
        except MemoryError:
            raise OpenError(
                f"{where}: keyslot {ks.id}: not enough memory for its Argon2 cost of "
                f"{ks.kdf.memory} KiB"
            ) from None
        tried += 1
        if key is not None:
            return ks.id, key
    plugins = lc.plugin_tokens(volume.meta)
    hint = ""
    if plugins:
        hint = (
            f"; {', '.join(plugins)} needs a cryptsetup token plugin, which fusedisk does not "
            "run: give a passphrase of a key slot instead"
        )
    if not tried:
        raise WrongKey(f"{where}: the LUKS2 header has no usable key slot{hint}")
    raise WrongKey(f"{where}: wrong key: no key slot accepts it ({tried} tried){hint}")


def image_info(volume: Luks2Volume, data_size: int) -> dict[str, Any]:
    """`fusedisk info`'s part for a LUKS2 image, in `qemu-img info`'s terms where they
    exist (QEMU shows no LUKS2; the extra fields are cryptsetup luksDump's)."""
    seg = volume.segment
    name, _, mode = seg.encryption.partition("-")
    chain, _, ivgen = mode.partition("-")
    slots = []
    for i, ks in sorted(volume.meta.keyslots.items()):
        entry: dict[str, Any] = {"id": i, "type": ks.type}
        if ks.type == "luks2":
            entry.update(
                kdf=ks.kdf.type,
                priority=ks.priority,
                **{"area-offset": ks.area_offset, "area-size": ks.area_size},
            )
            if ks.kdf.type == "pbkdf2":
                entry.update(hash=ks.kdf.hash, iters=ks.kdf.iterations)
            else:
                entry.update(time=ks.kdf.time, memory=ks.kdf.memory, cpus=ks.kdf.cpus)
        slots.append(entry)
    key_bits = next((k.key_size * 8 for k in volume.meta.keyslots.values() if k.key_size), 0)
    b = volume.headers.current.binary
    return {
        "virtual-size": volume.data_size(data_size),
        "encrypted": True,
        "format-specific": {
            "type": "luks",
            "data": {
                "version": 2,
                "cipher-alg": f"{name}-{key_bits // (2 if chain == 'xts' else 1)}",
                "cipher-mode": chain,
                "ivgen-alg": ivgen or "plain",
                "uuid": b.uuid,
                "label": b.label,
                "seqid": b.seqid,
                "header-size": b.hdr_size,
                "header-copy": volume.headers.current.which,
                "payload-offset": seg.offset,
                "payload-size": "dynamic" if seg.size is None else seg.size,
                "sector-size": seg.sector_size,
                "iv-tweak": seg.iv_tweak,
                "slots": slots,
                "tokens": [t["type"] for t in volume.meta.tokens.values()],
            },
        },
    }
