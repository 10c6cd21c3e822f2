"""Driver `luks`: LUKS1 or LUKS2 encryption of everything below it.

The child (`file`) holds a LUKS header, key slots and, after them, the
encrypted payload; this node presents the payload's plaintext.  The version
comes from the header: LUKS1 (luks1_*.py) has 512-byte sectors and a payload
to the device's end; LUKS2 (luks2_*.py) has one data segment with its own
offset, size (fixed or "dynamic"), sector size (512-4096) and IV tweak.  IVs
count 512-byte units from the segment's start (plus the tweak) whatever the
sector size, as cryptsetup (dm-crypt), QEMU and nbdkit expect, so an image is
shared with them.  The node's request_alignment is the sector size, so the edge turns
smaller requests into read-modify-write.

The node changes data, so it derives from Node (which refuses by default)
and implements every request itself.  A snapshot passes below it
(graph_op PASS): the overlays then store ciphertext.

The on-disk formats live in luks1_*.py and luks2_*.py (keyslot_crypto.py: what
both share), the sector ciphers in cipher/, key sources in keys.py; this file
is the glue: open, requests.
Neither the passphrase nor the master key is kept in options, shown,
logged or put in a message; only the sector cipher holds the key.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import trio

from fusedisk.errors import NotSupported, OpenError
from fusedisk.filters.luks import luks1_header as lh
from fusedisk.filters.luks import luks2_volume as l2
from fusedisk.filters.luks.cipher import (
    SECTOR,
    Buffer,
    CipherSpecError,
    SectorCipher,
    make_sector_cipher,
    sector_pieces,
    split_cipher_spec,
)
from fusedisk.filters.luks.describe import describe
from fusedisk.filters.luks.keys import ask_passphrase, file_reader, read_key_env, read_key_file
from fusedisk.filters.luks.keyslot_crypto import HASHES
from fusedisk.filters.luks.luks1_keyslot import unlock
from fusedisk.filters.luks.luks1_manage import check_blank, format_device
from fusedisk.graph.driver_slots import PROBE_CERTAIN
from fusedisk.graph.edge import Edge
from fusedisk.graph.extents import Extent, Status, merge_extents
from fusedisk.graph.node import ChildSlot, Control, GraphOp, Node, Role
from fusedisk.graph.options import Option, option_table
from fusedisk.hostio.workers import WorkerPool

#: Requests at least this large are encrypted in the node's worker pool
#: (fusedisk/hostio/workers.py: batched, no thread start per request), beside the
#: event loop, which meanwhile serves other requests.  Measured on the shared
#: 2-core VMs (docs/drivers/luks.md): 1 MiB requests through the mount gained
#: ~15% on average at 4 in flight and were even at 1; in-process, one request
#: at a time, the hand-off made 16-256 KiB requests slower than inline.
THREAD_MIN_BYTES = 512 << 10
#: ... and, alone in the pool, cut at sector boundaries into pieces of at
#: least this size, one per worker, done at once.  Measured through the mount
#: on the shared 2-core VMs (docs/benchmarks.md, session 3), 1 MiB requests in
#: two 512 KiB pieces were slower than whole (the other core is seldom idle:
#: the FUSE loop, fio and the kernel's copies use it), so only requests of
#: 2 MiB and more are cut.
PIECE_MIN_BYTES = 1 << 20
#: write_zeroes encrypts zeroes in pieces of this size
ZERO_CHUNK = 1 << 20
_ZEROES = bytes(ZERO_CHUNK)

CIPHERS = ("aes-xts-plain64", "aes-cbc-essiv:sha256", "aes-cbc-plain64", "aes-cbc-plain")


class LuksNode(Node):
    driver = "luks"
    summary = "LUKS1 and LUKS2 encryption (aes-xts-plain64), compatible with cryptsetup and QEMU"
    option_specs = option_table(
        Option(
            "key-file",
            "path",
            None,
            "file whose bytes are the passphrase, as cryptsetup --key-file reads it",
        ),
        Option(
            "passphrase-env",
            "str",
            None,
            "environment variable holding the passphrase (taken out of the daemon's "
            "environment once read)",
        ),
        Option(
            "header-file",
            "path",
            None,
            "a detached LUKS2 header (cryptsetup --header): the child then holds the data only",
        ),
        Option(
            "format",
            "bool",
            False,
            "create a LUKS1 header if the child holds none and its first MiB is all zeroes",
        ),
        Option("cipher", "str", "aes-xts-plain64", "cipher when formatting", choices=CIPHERS),
        Option(
            "key-size",
            "int",
            512,
            "master key size in bits when formatting (xts: 256 or 512)",
            choices=(128, 192, 256, 384, 512),
        ),
        Option("hash", "str", "sha256", "PBKDF2 hash when formatting", choices=tuple(HASHES)),
        Option(
            "iter-time",
            "int",
            2000,
            "when formatting: PBKDF2 time of the key slot, in ms (cryptsetup --iter-time)",
            minimum=1,
        ),
        Option(
            "pbkdf2-iterations",
            "int",
            None,
            "when formatting: force this PBKDF2 iteration count (for tests)",
            minimum=lh.MIN_ITERATIONS,
        ),
        Option(
            "discard",
            "str",
            "ignore",
            "pass discards to the child (unmap; discarded sectors then read as garbage) "
            "or drop them (ignore), like dm-crypt's allow_discards",
            choices=("ignore", "unmap"),
        ),
    )
    child_slots = (ChildSlot("file", Role.FILE),)
    graph_op = GraphOp.PASS

    @classmethod
    def probe(cls, head: bytes) -> int:
        return PROBE_CERTAIN if lh.probe(head) is not None else 0

    @classmethod
    def info(cls, target: str) -> dict[str, Any]:
        return describe(target)

    _cipher: SectorCipher | None = None
    _payload = 0
    _sector = SECTOR
    _iv_tweak = 0
    _luks2: l2.Luks2Volume | None = None
    _slot = -1
    _formatted = False
    _threaded = 0
    _split = 0
    _in_pool = 0
    header: lh.LuksHeader

    @property
    def file(self) -> Edge:
        return self.children["file"]

    @property
    def where(self) -> str:
        return f"node '{self.name}'"

    # -- opening ------------------------------------------------------------------

    async def _passphrase(self, confirm: bool = False) -> bytes:
        key_file = self.options.get("key-file")
        env = self.options.get("passphrase-env")
        if key_file and env:
            raise OpenError(f"{self.where}: give either 'key-file' or 'passphrase-env', not both")
        if key_file:
            return read_key_file(str(key_file), f"{self.where}: option 'key-file'")
        if env:
            return read_key_env(str(env), f"{self.where}: option 'passphrase-env'")
        return await trio.to_thread.run_sync(
            ask_passphrase, f"Passphrase for LUKS node '{self.name}': ", self.where, confirm
        )

    async def _format(self) -> None:
        await check_blank(self.file, self.where)
        if self.read_only:
            raise OpenError(f"{self.where}: option 'format': cannot format a read-only node")
        passphrase = await self._passphrase(confirm=True)
        await format_device(
            self.file,
            self.where,
            passphrase,
            cipher=self.options["cipher"],
            key_bytes=self.options["key-size"] // 8,
            hash_name=self.options["hash"],
            iter_time_ms=self.options["iter-time"],
            iterations=self.options["pbkdf2-iterations"],
        )
        self._formatted = True

    async def open(self) -> None:
        await super().open()
        child = self.file.node
        head = await self.file.read(0, min(child.size, lh.HEADER_SIZE))
        header_file = self.options.get("header-file")
        if header_file is None and lh.probe(head) is None and self.options["format"]:
            await self._format()
            head = await self.file.read(0, lh.HEADER_SIZE)
        elif header_file is None and lh.probe(head) is None:
            raise OpenError(
                f"{self.where}: '{child.name}' holds no LUKS header (it does not start with "
                "the LUKS magic); to create one, set format = true or run `fusedisk luks format`"
            )
        if header_file is not None or lh.probe(head) == 2:
            await self._open_luks2(header_file)
        else:
            await self._open_luks1(head)
        self._pool = WorkerPool(f"luks:{self.name}", max_workers=os.cpu_count() or 1)
        self._update_size()
        self.request_alignment = self._sector

    async def _open_luks1(self, head: bytes) -> None:
        self.header = lh.parse_header(head, self.file.node.size, self.where)
        passphrase = await self._passphrase()
        self._slot, master_key = await unlock(self.file, self.header, passphrase, self.where)
        self._cipher = make_sector_cipher(
            self.header.cipher_name, self.header.cipher_mode, master_key
        )
        del master_key, passphrase
        self._payload = self.header.payload_bytes

    async def _open_luks2(self, header_file: str | None) -> None:
        if header_file is not None:
            read, header_size = file_reader(str(header_file), f"{self.where}: option 'header-file'")
        else:
            read, header_size = self.file.read, self.file.node.size
        volume = await l2.load(
            read, header_size, self.file.node.size, self.where, detached=header_file is not None
        )
        seg = volume.segment
        key_bytes = max((k.key_size for k in volume.meta.keyslots.values()), default=64)
        try:  # the cipher is checked before any key derivation, with a stand-in key
            cipher_name, cipher_mode = split_cipher_spec(seg.encryption)
            make_sector_cipher(cipher_name, cipher_mode, bytes(key_bytes), seg.sector_size)
        except CipherSpecError as e:
            raise OpenError(f"{self.where}: LUKS2 segment: {e}") from None
        passphrase = await self._passphrase()
        self._slot, master_key = await l2.unlock(read, volume, passphrase, self.where)
        self._cipher = make_sector_cipher(cipher_name, cipher_mode, master_key, seg.sector_size)
        del master_key, passphrase
        self._luks2 = volume
        self._payload = seg.offset
        self._sector = seg.sector_size
        self._iv_tweak = seg.iv_tweak

    def _update_size(self) -> None:
        if self._luks2 is not None:
            self.size = self._luks2.data_size(self.file.node.size)
        else:
            self.size = (self.file.node.size - self._payload) // SECTOR * SECTOR

    async def close(self) -> None:
        self._cipher = None
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close()

    # -- requests ---------------------------------------------------------------------

    async def _crypt(self, encrypting: bool, offset: int, data: Buffer) -> bytes:
        cipher = self._cipher
        if cipher is None:
            raise NotSupported(f"{self.where} is closed")
        sector = offset // SECTOR + self._iv_tweak  # IVs count 512-byte units (cipher/xts.py)
        if len(data) < THREAD_MIN_BYTES:
            return cipher.encrypt(sector, data) if encrypting else cipher.decrypt(sector, data)
        self._threaded += 1
        self._in_pool += 1
        try:
            # Alone, a request takes every worker; with others in the pool the
            # workers are busy anyway and pieces would only add hand-offs.
            if self._in_pool == 1:
                pieces = sector_pieces(
                    len(data), self._pool.max_workers, PIECE_MIN_BYTES, self._sector
                )
                if len(pieces) > 1:
                    return await self._crypt_pieces(cipher, encrypting, sector, data, pieces)
            run = cipher.encrypt if encrypting else cipher.decrypt
            return await self._pool.run(run, sector, data)
        finally:
            self._in_pool -= 1

    async def _crypt_pieces(
        self,
        cipher: SectorCipher,
        encrypting: bool,
        sector: int,
        data: Buffer,
        pieces: list[tuple[int, int]],
    ) -> bytes:
        """One request's pieces on as many workers at once, into one buffer (no join)."""
        out = np.empty(len(data), dtype=np.uint8)
        src, dst = memoryview(data), out.data

        async def piece(start: int, end: int) -> None:
            first, part = sector + start // SECTOR, slice(start, end)
            await self._pool.run(cipher.crypt_into, first, src[part], dst[part], encrypting)

        async with trio.open_nursery() as nursery:
            for start, end in pieces[1:]:
                nursery.start_soon(piece, start, end)
            await piece(*pieces[0])
        self._split += 1
        return out.tobytes()

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.file.read(self._payload + offset, length)
        return await self._crypt(False, offset, data)

    async def write(self, offset: int, data: bytes) -> None:
        encrypted = await self._crypt(True, offset, data)
        await self.file.write(self._payload + offset, encrypted)

    async def flush(self) -> None:
        await self.file.flush()

    async def discard(self, offset: int, length: int) -> None:
        if self.options["discard"] == "unmap":
            await self.file.discard(self._payload + offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        # Zero ciphertext would read back as garbage: encrypt real zeroes.
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            encrypted = await self._crypt(True, offset, _ZEROES[:n])
            await self.file.write(self._payload + offset, encrypted)
            offset += n

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        # Encrypted zeroes are not zeroes, nor are zeroes' decryption: all is data.
        # Whether a range is defined here or below (a backing file) passes through.
        extents = await self.file.block_status(self._payload + offset, length)
        return merge_extents(
            [
                Extent(
                    e.offset - self._payload, e.length, Status.DATA | (e.status & Status.ALLOCATED)
                )
                for e in extents
            ]
        )

    async def truncate(self, size: int) -> None:
        if self._luks2 is not None and self._luks2.segment.size is not None:
            raise NotSupported(
                f"{self.where}: the LUKS2 data segment has a fixed size; it cannot be resized"
            )
        if size % self._sector:
            raise NotSupported(f"{self.where}: the size must be a multiple of {self._sector} bytes")
        await self.file.truncate(self._payload + size)
        self._update_size()

    # -- introspection -------------------------------------------------------------------

    def _dump(self) -> str:
        if self._luks2 is not None:
            return "".join(f"{k}: {v}\n" for k, v in self._luks2.info().items())
        return lh.dump(self.header)

    def controls(self) -> dict[str, Control]:
        return {
            "header": Control(
                read=self._dump,
                help="the LUKS header, as cryptsetup luksDump shows it (no secrets)",
            )
        }

    def driver_stats(self) -> dict[str, Any]:
        if self._luks2 is not None:
            return {
                **self._luks2.info(),
                "unlocked_key_slot": self._slot,
                "threaded_requests": self._threaded,
                "split_requests": self._split,
            }
        hdr = self.header
        return {
            "cipher": hdr.cipher,
            "key_bits": hdr.key_bytes * 8,
            "hash": hdr.hash_spec,
            "payload_offset": self._payload,
            "uuid": hdr.uuid,
            "unlocked_key_slot": self._slot,
            "active_key_slots": hdr.active_slots(),
            "formatted_at_open": self._formatted,
            "threaded_requests": self._threaded,
            "split_requests": self._split,
        }
