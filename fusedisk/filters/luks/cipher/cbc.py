"""aes-cbc-<iv>, the mode of older LUKS1 images, over whole requests.

Decryption is one ECB pass (P[j] = D(C[j]) ⊕ C[j-1]); encryption is
chained inside a sector, so it runs one ECB pass per block of a sector (32
for 512 bytes), each over the j-th block of every sector at once.
"""

from __future__ import annotations

import numpy as np

from fusedisk.filters.luks.cipher.base import (
    BLOCK,
    SECTOR,
    CipherSpecError,
    SectorCipher,
    Workspace,
)
from fusedisk.filters.luks.cipher.ivgen import IvGen


class CbcCipher(SectorCipher):
    def __init__(self, spec: str, key: bytes, ivgen: IvGen, sector_size: int = SECTOR) -> None:
        super().__init__(spec, key, sector_size)
        if len(key) not in (16, 24, 32):
            raise CipherSpecError(
                f"{spec} needs a 128, 192 or 256-bit AES key, got {len(key) * 8} bits"
            )
        self._key = key
        self._ivgen = ivgen

    def _chunk(
        self,
        ws: Workspace,
        sector: int,
        count: int,
        src: np.ndarray,
        dst: np.ndarray,
        encrypting: bool,
    ) -> None:
        ivs = self._ivgen.ivs(sector, count, self.runs)
        blocks = self.sector_size // BLOCK
        plain_or_cipher = src.reshape(count, blocks, 2)
        out = dst.reshape(count, blocks, 2)
        if encrypting:
            # Chained within a sector: block j of every sector in one ECB call.
            ecb = self._context(ws, "enc", self._key, True)
            masked = ws.masked[: count * 2].reshape(count, 2)
            result = ws.ecb_view[: count * 2].reshape(count, 2)
            chained = ivs
            for j in range(blocks):
                np.bitwise_xor(plain_or_cipher[:, j], chained, out=masked)
                ecb.update_into(masked.view(np.uint8).data, ws.ecb_out)
                out[:, j] = result
                chained = out[:, j]
        else:
            ecb = self._context(ws, "dec", self._key, False)
            ecb.update_into(src.view(np.uint8).data, ws.ecb_out)
            decrypted = ws.ecb_view[: count * self.sector_size // 8].reshape(out.shape)
            np.bitwise_xor(decrypted[:, 0], ivs, out=out[:, 0])
            np.bitwise_xor(decrypted[:, 1:], plain_or_cipher[:, :-1], out=out[:, 1:])
