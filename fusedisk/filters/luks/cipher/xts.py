"""aes-xts-<iv> (IEEE P1619) over whole requests: numpy tweaks, one OpenSSL pass.

For a request starting at sector s:

    IV[i]     = ivgen(s + i)                      N × 16 bytes, numpy
    T[i, 0]   = AES-ECB(key2, IV[i])              one ECB pass over all N IVs
    T[i, j]   = T[i, 0] · α^j  in GF(2^128)       j = 0..31, all at once in numpy
    C         = AES-ECB(key1, P ⊕ T) ⊕ T          one AES pass over the whole request

The last AES pass is OpenSSL's own XTS over the whole chunk where it can be
(~3× faster than its ECB here); the tweak expansion is most of what is left
(docs/drivers/luks.md, "Speed").

Sectors of 4096 bytes (LUKS2's `sector_size`): the tweak runs on over the
sector's 256 blocks, and the IV still counts 512-byte units (dm-crypt
without `iv_large_sectors`, as cryptsetup sets up LUKS2: 4096-byte sector k
of the segment has IV 8k + iv_tweak; measured against cryptsetup's own
re-encryption).  A 4096-byte sector is worked as 8 runs of 32 blocks whose
first tweaks are T·α^(32m), m = 0..7 (gf128.run_starts), so the machinery
above serves both sizes, with 8× fewer IVs and tweak encryptions per byte.

References: IEEE Std 1619-2007 (XTS); the LUKS1 on-disk format
specification 1.2.3, section 2.4.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from fusedisk.filters.luks.cipher.base import (
    BLOCK,
    BLOCKS_PER_SECTOR,
    CHUNK_SECTORS,
    SECTOR,
    U64,
    CipherSpecError,
    SectorCipher,
    Workspace,
    ecb_encryptor,
)
from fusedisk.filters.luks.cipher.gf128 import expand_tweaks, run_starts, times_alpha_power
from fusedisk.filters.luks.cipher.ivgen import IvGen

#: XTS sectors at least this large, in runs of at most this many, are done one OpenSSL
#: context each (XtsCipher._per_sector): measured, 4 KiB requests cost ~13 µs so, ~70 µs
#: vectorised; from ~64 KiB on the vectorised path is as cheap or cheaper
PER_SECTOR_MIN = 4096
PER_SECTOR_MAX_COUNT = 16


class XtsCipher(SectorCipher):
    """XTS, with OpenSSL's own XTS doing the AES pass when it can (the "stream").

    One XTS call over a chunk of N sectors, with a fixed tweak whose
    encryption is S, masks block k of the chunk with S·α^k, while sector i's
    block j needs T[i]·α^j.  Masking the input and the output once more with
    the difference (T[i] ⊕ S·α^(32i))·α^j turns the one into the other:
    XTS(P ⊕ D) ⊕ D = E(P ⊕ T) ⊕ T.  OpenSSL restarts the tweak at every call,
    so one context serves every chunk, and its XTS is ~3× faster than its
    ECB here (AES-NI with VAES).  OpenSSL refuses XTS with two equal key
    halves and AES-192 XTS: those keys take the ECB pass instead.
    """

    def __init__(self, spec: str, key: bytes, ivgen: IvGen, sector_size: int = SECTOR) -> None:
        super().__init__(spec, key, sector_size)
        if len(key) not in (32, 48, 64):
            raise CipherSpecError(
                f"{spec} needs a 256, 384 or 512-bit key (two AES keys), got {len(key) * 8} bits"
            )
        half = len(key) // 2
        self._k1 = key[:half]
        self._k2 = key[half:]
        self._ivgen = ivgen
        self._key = key
        self.stream = len(key) != 48 and self._k1 != self._k2
        # (OpenSSL's XTS takes 256 and 512-bit keys only: AES(key) would refuse 384)
        self._aes = algorithms.AES(key) if self.stream else None
        if self.stream:
            # S·α^(32i) for every sector i of a chunk: S = E(key2, 0), the fixed tweak's mask
            s = int.from_bytes(ecb_encryptor(self._k2).update(bytes(BLOCK)), "little")
            starts = bytearray()
            for _ in range(CHUNK_SECTORS):
                starts += s.to_bytes(BLOCK, "little")
                s = times_alpha_power(s, BLOCKS_PER_SECTOR)
            self._stream_starts = np.frombuffer(bytes(starts), dtype=U64).reshape(-1, 2)

    def _stream_context(self, ws: Workspace, encrypting: bool) -> CipherContext:
        name = "xts-enc" if encrypting else "xts-dec"
        ctx = ws.contexts.get(name)
        if ctx is None:
            cipher = Cipher(algorithms.AES(self._key), modes.XTS(bytes(BLOCK)))
            ctx = ws.contexts[name] = cipher.encryptor() if encrypting else cipher.decryptor()
        return ctx

    def _per_sector(
        self, sector: int, count: int, src: np.ndarray, dst: np.ndarray, ws: Workspace,
        encrypting: bool,
    ) -> None:  # fmt: skip
        """One OpenSSL XTS context per sector: for a few 4096-byte sectors, its ~4 µs of
        set-up weigh less than the vectorised path's fixed cost (docs/drivers/luks.md)."""
        ivs = self._ivgen.ivs(sector, count, self.runs).tobytes()
        size, aes = self.sector_size, self._aes
        assert aes is not None  # only stream ciphers come here
        data, out = memoryview(src.view(np.uint8).data), memoryview(ws.ecb_out)
        for i in range(count):
            cipher = Cipher(aes, modes.XTS(ivs[i * BLOCK : (i + 1) * BLOCK]))
            ctx = cipher.encryptor() if encrypting else cipher.decryptor()
            ctx.update_into(data[i * size : (i + 1) * size], out[i * size :])
        np.copyto(dst, ws.ecb_view[: count * size // 8])

    def _chunk(
        self,
        ws: Workspace,
        sector: int,
        count: int,
        src: np.ndarray,
        dst: np.ndarray,
        encrypting: bool,
    ) -> None:
        if self.stream and self.sector_size >= PER_SECTOR_MIN and count <= PER_SECTOR_MAX_COUNT:
            self._per_sector(sector, count, src, dst, ws, encrypting)
            return
        ivs = self._ivgen.ivs(sector, count, self.runs)
        tweak_ecb = self._context(ws, "tweak", self._k2, True)
        first = np.frombuffer(tweak_ecb.update(ivs.tobytes()), dtype=U64).reshape(count, 2)
        first = run_starts(first, self.runs)
        count *= self.runs  # from here on, 512-byte runs of 32 blocks
        words = count * SECTOR // 8
        if self.stream:
            first = first ^ self._stream_starts[:count]
            aes = self._stream_context(ws, encrypting)
        else:
            aes = self._context(ws, "enc" if encrypting else "dec", self._k1, encrypting)
        tweaks = ws.tweaks[:count]
        expand_tweaks(first, tweaks, ws.work[:, :count])
        flat = tweaks.reshape(-1)
        masked = ws.masked[:words]
        np.bitwise_xor(src, flat, out=masked)
        aes.update_into(masked.view(np.uint8).data, ws.ecb_out)
        np.bitwise_xor(ws.ecb_view[:words], flat, out=dst)
