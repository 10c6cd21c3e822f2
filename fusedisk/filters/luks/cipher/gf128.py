"""GF(2^128) arithmetic for XTS tweaks, over whole arrays of them at once (numpy).

A 128-bit value is two little-endian u64 words (lo, hi); multiplying by α
shifts it left one bit and folds the bit pushed out of the top back in as
x^128 = x^7 + x^2 + x + 1 (0x87), as IEEE P1619 defines it.
"""

from __future__ import annotations

import numpy as np

from fusedisk.filters.luks.cipher.base import BLOCKS_PER_SECTOR, CHUNK_SECTORS, U64

#: the shift counts j and 64 - j for j = 1..31, once per row of a pass: numpy
#: shifts two whole arrays 2-3× faster than it broadcasts a row over them
_J = np.ascontiguousarray(
    np.broadcast_to(np.arange(1, BLOCKS_PER_SECTOR, dtype=np.uint64), (CHUNK_SECTORS, 31))
)
_J.flags.writeable = False
_64_MINUS_J = np.uint64(64) - _J
_64_MINUS_J.flags.writeable = False


def expand_tweaks(first: np.ndarray, out: np.ndarray, work: np.ndarray) -> None:
    """out[i, j] = first[i] · α^j in GF(2^128), for j = 0..31.

    `first` is (N, 2), `out` (N, 32, 2), `work` (5, N, 31): u64, little
    endian, N ≤ CHUNK_SECTORS.  A 128-bit value is (lo, hi).  Shifting it
    left by j bits pushes out the top j bits h of hi; since x^128 = x^7 +
    x^2 + x + 1 they come back as the carry-less product h·0x87 = h ⊕ h<<1 ⊕
    h<<2 ⊕ h<<7, which fits the low word without a second reduction while
    j + 7 ≤ 64.  All 31 multiples are computed at once, over whole (N, 31)
    arrays (the ~14 passes over them are most of a request's cost).
    """
    n = len(first)
    j, k = _J[:n], _64_MINUS_J[:n]
    lo, hi, h, high, low = work
    out[:, 0] = first
    np.copyto(lo, first[:, 0:1])
    np.copyto(hi, first[:, 1:2])
    np.right_shift(hi, k, out=h)  # the bits pushed out of the top
    np.left_shift(hi, j, out=high)
    np.right_shift(lo, k, out=low)
    high |= low
    out[:, 1:, 1] = high
    np.left_shift(lo, j, out=low)
    low ^= h
    h <<= np.uint64(1)
    low ^= h
    h <<= np.uint64(1)
    low ^= h
    h <<= np.uint64(5)
    low ^= h
    out[:, 1:, 0] = low


def _times_alpha_64k(
    lo: np.ndarray, hi: np.ndarray, out_lo: np.ndarray, out_hi: np.ndarray, times: int
) -> None:
    """(out_lo, out_hi) = (lo, hi) · α^(64·times) in GF(2^128), `times` ≥ 1, elementwise.

    One step moves the low word up whole and folds the high word h back as
    h·0x87, a 71-bit carry-less product: its low 64 bits into the low word,
    its top 7 bits into the new high word (no second reduction is needed).
    """  # fmt: skip
    for _ in range(times):
        h = hi.copy()
        np.copyto(out_hi, lo)
        out_hi ^= h >> np.uint64(63)
        out_hi ^= h >> np.uint64(62)
        out_hi ^= h >> np.uint64(57)
        np.copyto(out_lo, h)
        out_lo ^= h << np.uint64(1)
        out_lo ^= h << np.uint64(2)
        out_lo ^= h << np.uint64(7)
        lo, hi = out_lo, out_hi


def run_starts(first: np.ndarray, runs: int) -> np.ndarray:
    """(N·runs, 2): for each sector's first tweak T, T·α^(32m) for m = 0..runs-1.

    A sector of `runs` × 512 bytes is worked as `runs` runs of 32 blocks.  The
    multiples are made by doubling (m = 1, then 2-3, then 4-7), each step
    one vectorised multiplication over all the rows made so far.
    """
    if runs == 1:
        return first
    n = len(first)
    lo = np.empty((runs, n), dtype=U64)
    hi = np.empty((runs, n), dtype=U64)
    lo[0], hi[0] = first[:, 0], first[:, 1]
    # m = 1: T·α^32 moves 32 bits up; the 32 bits pushed out of the top fold back as h·0x87.
    h = hi[0] >> np.uint64(32)
    hi[1] = (hi[0] << np.uint64(32)) | (lo[0] >> np.uint64(32))
    lo[1] = (lo[0] << np.uint64(32)) ^ h ^ (h << np.uint64(1)) ^ (h << np.uint64(2))
    lo[1] ^= h << np.uint64(7)
    done = 2
    while done < runs:
        # rows done..2·done-1 are rows 0..done-1 times α^(32·done) = α^(64·done/2)
        _times_alpha_64k(lo[:done], hi[:done], lo[done : 2 * done], hi[done : 2 * done], done // 2)
        done *= 2
    out = np.empty((n, runs, 2), dtype=U64)
    out[:, :, 0] = lo.T
    out[:, :, 1] = hi.T
    return out.reshape(-1, 2)


def times_alpha_power(value: int, n: int) -> int:
    """value · α^n in GF(2^128), the 128-bit value as an integer (little endian), n ≤ 57."""
    shifted = value << n
    h = shifted >> 128  # the bits pushed out of the top, folded back by x^128 = x^7+x^2+x+1
    return (shifted & ((1 << 128) - 1)) ^ h ^ (h << 1) ^ (h << 2) ^ (h << 7)
