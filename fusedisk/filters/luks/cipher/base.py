"""What every sector cipher shares: sector geometry, per-thread workspaces, the base class.

A request of N sectors is encrypted with a fixed number of calls into
`cryptography`, never one per sector: one `Cipher(AES(key), XTS(tweak))` per
sector costs 4-9 µs of setup and caps near 60-130 MB/s (docs/drivers/luks.md).
A subclass (xts.py, cbc.py) works one chunk of up to CHUNK_SECTORS sectors
at a time in the buffers of its thread's Workspace.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

SECTOR = 512
#: the sector sizes LUKS2 allows (dm-crypt's sector_size)
SECTOR_SIZES = (512, 1024, 2048, 4096)
BLOCK = 16
BLOCKS_PER_SECTOR = SECTOR // BLOCK
U64 = np.dtype("<u8")

#: sectors processed per pass: fewer passes cost fewer calls into numpy
CHUNK_SECTORS = 1024

#: the largest result buffer a thread keeps for reuse
MAX_KEPT_OUTPUT = 4 << 20

Buffer = bytes | bytearray | memoryview


class CipherSpecError(ValueError):
    """A cipher specification fusedisk cannot use; the message says why."""


def ecb_encryptor(key: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor()


def ecb_decryptor(key: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.ECB()).decryptor()


class Workspace(threading.local):
    """Per-thread ECB contexts and work buffers (contexts are not thread-safe).

    The buffers are made once and reused: a fresh megabyte costs 256 page
    faults, which on these VMs cost more than the encryption itself.
    """

    def __init__(self) -> None:
        self.contexts: dict[str, CipherContext] = {}
        self.tweaks = np.empty((CHUNK_SECTORS, BLOCKS_PER_SECTOR, 2), dtype=U64)
        self.work = np.empty((5, CHUNK_SECTORS, BLOCKS_PER_SECTOR - 1), dtype=U64)
        self.masked = np.empty(CHUNK_SECTORS * SECTOR // 8, dtype=U64)
        # update_into wants room for one block more than it writes.
        self.ecb_out = bytearray(CHUNK_SECTORS * SECTOR + BLOCK)
        self.ecb_view = np.frombuffer(self.ecb_out, dtype=U64, count=CHUNK_SECTORS * SECTOR // 8)
        self._output = bytearray()

    def output(self, size: int) -> bytearray:
        """A buffer for a whole request's result: kept for the next request up to 4 MiB."""
        if size > MAX_KEPT_OUTPUT:
            return bytearray(size)
        if len(self._output) < size:
            self._output = bytearray(max(size, 1 << 20))
        return self._output


class SectorCipher:
    """Encrypts and decrypts whole runs of sectors of one area.

    `encrypt(sector, data)` / `decrypt(sector, data)`: `sector` is the IV
    sector of the first sector of `data`, counted in 512-byte units whatever
    `sector_size` is; `len(data)` is a multiple of `sector_size`; the result
    is a new buffer.
    Thread-safe: each thread gets its own contexts and buffers, so large
    requests may run on worker threads (cryptography and numpy release the GIL on large buffers).
    """

    def __init__(self, spec: str, key: bytes, sector_size: int = SECTOR) -> None:
        if sector_size not in SECTOR_SIZES:
            raise CipherSpecError(f"sector size {sector_size} is not one of {SECTOR_SIZES}")
        self.spec = spec
        self.key_size = len(key)
        self.sector_size = sector_size
        #: 512-byte runs per sector
        self.runs = sector_size // SECTOR
        self._local = Workspace()

    def _context(self, ws: Workspace, name: str, key: bytes, encrypting: bool) -> CipherContext:
        ctx = ws.contexts.get(name)
        if ctx is None:
            ctx = ws.contexts[name] = (ecb_encryptor if encrypting else ecb_decryptor)(key)
        return ctx

    def encrypt(self, sector: int, data: Buffer) -> bytes:
        return self._run(sector, data, True)

    def decrypt(self, sector: int, data: Buffer) -> bytes:
        return self._run(sector, data, False)

    def _run(self, sector: int, data: Buffer, encrypting: bool) -> bytes:
        n = len(data)
        if n == 0:
            return b""
        out = self._local.output(n)
        self.crypt_into(sector, data, memoryview(out)[:n], encrypting)
        # The one copy: the caller gets immutable bytes, the buffer is reused.
        return bytes(memoryview(out)[:n])

    def crypt_into(self, sector: int, data: Buffer, out: Buffer, encrypting: bool) -> None:
        """Encrypt (or decrypt) `data`, whose first sector is `sector`, into `out`.

        `out` is a writable buffer as long as `data`.  Sectors are independent,
        so a request cut at sector boundaries into pieces done by different
        threads into one `out` gives the same bytes as one call.
        """
        n, size = len(data), self.sector_size
        if n % size:
            raise ValueError(
                f"sector cipher: {n} bytes is not a whole number of sectors ({size} bytes)"
            )
        ws = self._local
        src = np.frombuffer(data, dtype=U64)
        dst = np.frombuffer(out, dtype=U64, count=n // 8)
        step = CHUNK_SECTORS * SECTOR // 8
        for start in range(0, n // 8, step):
            count = min(step, n // 8 - start) * 8 // size
            self._chunk(
                ws,
                sector + start * 8 // SECTOR,
                count,
                src[start : start + step],
                dst[start : start + step],
                encrypting,
            )

    def _chunk(
        self,
        ws: Workspace,
        sector: int,
        count: int,
        src: np.ndarray,
        dst: np.ndarray,
        encrypting: bool,
    ) -> None:
        raise NotImplementedError


def sector_pieces(
    size: int, most: int, smallest: int, sector: int = SECTOR
) -> list[tuple[int, int]]:
    """Cut `size` bytes at `sector` boundaries into at most `most` near-equal pieces.

    Each piece is at least `smallest` bytes (one piece if `size` is smaller):
    (start, end) byte ranges in order, covering `size` exactly.
    """
    sectors = size // sector
    count = max(1, min(most, size // max(smallest, sector), sectors))
    cuts = [sectors * i // count * sector for i in range(count)] + [size]
    return list(itertools.pairwise(cuts))
