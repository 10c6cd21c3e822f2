"""Sector ciphers as dm-crypt and QEMU apply them: whole requests of 512 or 4096-byte sectors.

A request of N sectors is encrypted with a fixed number of calls into
`cryptography`, never one per sector: one `Cipher(AES(key), XTS(tweak))` per
sector costs 4-9 µs of setup and caps near 60-130 MB/s (../../docs/drivers/luks.md).

aes-xts-<iv> (IEEE P1619), for a request starting at sector s:

    IV[i]     = ivgen(s + i)                      N × 16 bytes, numpy
    T[i, 0]   = AES-ECB(key2, IV[i])              one ECB pass over all N IVs
    T[i, j]   = T[i, 0] · α^j  in GF(2^128)       j = 0..31, all at once in numpy
    C         = AES-ECB(key1, P ⊕ T) ⊕ T          one AES pass over the whole request

The last AES pass is OpenSSL's own XTS over the whole chunk where it can be
(XtsCipher: ~3× faster than its ECB here); the tweak expansion is most of
what is left (docs/drivers/luks.md, "Speed").

aes-cbc-<iv>: decryption is one ECB pass (P[j] = D(C[j]) ⊕ C[j-1]); encryption
is chained inside a sector, so it runs 32 ECB passes per request, each over
the j-th block of every sector at once.

Sectors of 4096 bytes (LUKS2's `sector_size`): the tweak runs on over the
sector's 256 blocks, and the IV still counts 512-byte units (dm-crypt
without `iv_large_sectors`, as cryptsetup sets up LUKS2: 4096-byte sector k
of the segment has IV 8k + iv_tweak; measured against cryptsetup's own
re-encryption).  A 4096-byte
sector is worked as 8 runs of 32 blocks whose first tweaks are T·α^(32m),
m = 0..7 (one vectorised multiplication by α^32 each), so the machinery
above serves both sizes, with 8× fewer IVs and tweak encryptions per byte.

IV generators (dm-crypt's names): `plain` (sector number, 32 bits, little
endian), `plain64` (64 bits), `plain64be`, `null`, `essiv:<hash>` (the sector
number encrypted with AES keyed by hash(volume key)).  Sector numbers count
from 0 at the start of the area (the payload, or one key slot's material).

References: IEEE Std 1619-2007 (XTS); Linux drivers/md/dm-crypt.c (IV modes);
the LUKS1 on-disk format specification 1.2.3, section 2.4.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

SECTOR = 512
#: the sector sizes LUKS2 allows (dm-crypt's sector_size)
SECTOR_SIZES = (512, 1024, 2048, 4096)
BLOCK = 16
BLOCKS_PER_SECTOR = SECTOR // BLOCK
_U64 = np.dtype("<u8")


class CipherSpecError(ValueError):
    """A cipher specification fusedisk cannot use; the message says why."""


def _ecb_encryptor(key: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor()


def _ecb_decryptor(key: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.ECB()).decryptor()


# -- IV generators -------------------------------------------------------------


def _sector_numbers(first: int, count: int, step: int = 1) -> np.ndarray:
    """(count, 2) little-endian u64: the sector numbers in the low word, zero high word."""
    ivs = np.zeros((count, 2), dtype=_U64)
    ivs[:, 0] = np.arange(first, first + count * step, step, dtype=np.uint64)
    return ivs


class IvGen:
    """Makes the 16-byte IVs of `count` sectors from `first` on, `step` apart, as one buffer."""

    name = ""

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        raise NotImplementedError


class PlainIv(IvGen):
    name = "plain"

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        ivs = _sector_numbers(first, count, step)
        ivs[:, 0] &= np.uint64(0xFFFFFFFF)
        return ivs


class Plain64Iv(IvGen):
    name = "plain64"

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        return _sector_numbers(first, count, step)


class Plain64BeIv(IvGen):
    name = "plain64be"

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        ivs = np.zeros((count, 2), dtype=_U64)
        # The big-endian sector number sits in the last 8 bytes of the IV.
        ivs[:, 1] = np.arange(first, first + count * step, step, dtype=np.uint64).byteswap()
        return ivs


class NullIv(IvGen):
    name = "null"

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        return np.zeros((count, 2), dtype=_U64)


class EssivIv(IvGen):
    """IV = AES(hash(volume key), le64(sector)): the IVs cannot be predicted."""

    def __init__(self, hash_name: str, key: bytes) -> None:
        self.name = f"essiv:{hash_name}"
        salt = hashlib.new(hash_name, key).digest()
        if len(salt) not in (16, 24, 32):
            raise CipherSpecError(
                f"essiv:{hash_name} gives a {len(salt) * 8}-bit salt, not an AES key size"
            )
        self._salt = salt
        self._local = threading.local()

    def ivs(self, first: int, count: int, step: int = 1) -> np.ndarray:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = _ecb_encryptor(self._salt)
        plain = _sector_numbers(first, count, step)
        return np.frombuffer(ctx.update(plain.tobytes()), dtype=_U64).reshape(count, 2)


def _make_ivgen(spec: str, key: bytes) -> IvGen:
    name, _, option = spec.partition(":")
    simple: dict[str, Callable[[], IvGen]] = {
        "plain": PlainIv,
        "plain64": Plain64Iv,
        "plain64be": Plain64BeIv,
        "null": NullIv,
    }
    if name in simple and not option:
        return simple[name]()
    if name == "essiv":
        if option not in hashlib.algorithms_available:
            raise CipherSpecError(f"unknown ESSIV hash {option!r}")
        return EssivIv(option, key)
    known = ", ".join([*simple, "essiv:<hash>"])
    raise CipherSpecError(f"IV generator {spec!r} is not supported (supported: {known})")


# -- GF(2^128) tweak expansion --------------------------------------------------

#: sectors processed per pass: fewer passes cost fewer calls into numpy
CHUNK_SECTORS = 1024

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
    lo = np.empty((runs, n), dtype=_U64)
    hi = np.empty((runs, n), dtype=_U64)
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
    out = np.empty((n, runs, 2), dtype=_U64)
    out[:, :, 0] = lo.T
    out[:, :, 1] = hi.T
    return out.reshape(-1, 2)


# -- sector ciphers ---------------------------------------------------------------------

#: XTS sectors at least this large, in runs of at most this many, are done one OpenSSL
#: context each (XtsCipher._per_sector): measured, 4 KiB requests cost ~13 µs so, ~70 µs
#: vectorised; from ~64 KiB on the vectorised path is as cheap or cheaper
PER_SECTOR_MIN = 4096
PER_SECTOR_MAX_COUNT = 16

#: the largest result buffer a thread keeps for reuse
MAX_KEPT_OUTPUT = 4 << 20

Buffer = bytes | bytearray | memoryview


class _Workspace(threading.local):
    """Per-thread ECB contexts and work buffers (contexts are not thread-safe).

    The buffers are made once and reused: a fresh megabyte costs 256 page
    faults, which on these VMs cost more than the encryption itself.
    """

    def __init__(self) -> None:
        self.contexts: dict[str, CipherContext] = {}
        self.tweaks = np.empty((CHUNK_SECTORS, BLOCKS_PER_SECTOR, 2), dtype=_U64)
        self.work = np.empty((5, CHUNK_SECTORS, BLOCKS_PER_SECTOR - 1), dtype=_U64)
        self.masked = np.empty(CHUNK_SECTORS * SECTOR // 8, dtype=_U64)
        # update_into wants room for one block more than it writes.
        self.ecb_out = bytearray(CHUNK_SECTORS * SECTOR + BLOCK)
        self.ecb_view = np.frombuffer(self.ecb_out, dtype=_U64, count=CHUNK_SECTORS * SECTOR // 8)
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
        self._local = _Workspace()

    def _context(self, ws: _Workspace, name: str, key: bytes, encrypting: bool) -> CipherContext:
        ctx = ws.contexts.get(name)
        if ctx is None:
            ctx = ws.contexts[name] = (_ecb_encryptor if encrypting else _ecb_decryptor)(key)
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
        src = np.frombuffer(data, dtype=_U64)
        dst = np.frombuffer(out, dtype=_U64, count=n // 8)
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
        ws: _Workspace,
        sector: int,
        count: int,
        src: np.ndarray,
        dst: np.ndarray,
        encrypting: bool,
    ) -> None:
        raise NotImplementedError


def times_alpha_power(value: int, n: int) -> int:
    """value · α^n in GF(2^128), the 128-bit value as an integer (little endian), n ≤ 57."""
    shifted = value << n
    h = shifted >> 128  # the bits pushed out of the top, folded back by x^128 = x^7+x^2+x+1
    return (shifted & ((1 << 128) - 1)) ^ h ^ (h << 1) ^ (h << 2) ^ (h << 7)


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
            s = int.from_bytes(_ecb_encryptor(self._k2).update(bytes(BLOCK)), "little")
            starts = bytearray()
            for _ in range(CHUNK_SECTORS):
                starts += s.to_bytes(BLOCK, "little")
                s = times_alpha_power(s, BLOCKS_PER_SECTOR)
            self._stream_starts = np.frombuffer(bytes(starts), dtype=_U64).reshape(-1, 2)

    def _stream_context(self, ws: _Workspace, encrypting: bool) -> CipherContext:
        name = "xts-enc" if encrypting else "xts-dec"
        ctx = ws.contexts.get(name)
        if ctx is None:
            cipher = Cipher(algorithms.AES(self._key), modes.XTS(bytes(BLOCK)))
            ctx = ws.contexts[name] = cipher.encryptor() if encrypting else cipher.decryptor()
        return ctx

    def _per_sector(
        self, sector: int, count: int, src: np.ndarray, dst: np.ndarray, ws: _Workspace,
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
        ws: _Workspace,
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
        first = np.frombuffer(tweak_ecb.update(ivs.tobytes()), dtype=_U64).reshape(count, 2)
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
        ws: _Workspace,
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


def make_sector_cipher(
    cipher_name: str, cipher_mode: str, key: bytes, sector_size: int = SECTOR
) -> SectorCipher:
    """The sector cipher for a LUKS header's cipher name ('aes') and mode ('xts-plain64'),
    over sectors of `sector_size` bytes (LUKS1: always 512).

    Raises CipherSpecError naming what is not supported.
    """
    spec = f"{cipher_name}-{cipher_mode}"
    if cipher_name != "aes":
        raise CipherSpecError(f"cipher {spec!r} is not supported (only AES is)")
    chain, _, iv_spec = cipher_mode.partition("-")
    if not iv_spec:
        raise CipherSpecError(f"cipher mode {cipher_mode!r} names no IV generator")
    ivgen = _make_ivgen(iv_spec, key)
    if chain == "xts":
        return XtsCipher(spec, key, ivgen, sector_size)
    if chain == "cbc":
        return CbcCipher(spec, key, ivgen, sector_size)
    raise CipherSpecError(f"cipher {spec!r} is not supported (supported modes: xts, cbc)")


def split_cipher_spec(text: str) -> tuple[str, str]:
    """'aes-xts-plain64' -> ('aes', 'xts-plain64'), as cryptsetup splits --cipher."""
    name, _, mode = text.partition("-")
    if not name or not mode:
        raise CipherSpecError(f"expected a cipher such as 'aes-xts-plain64', got {text!r}")
    return name, mode
