"""LUKS throughput: the sector cipher alone, and the `luks` node over a file.

    python benchmarks/luks_throughput.py [--seconds 1] [--cipher aes-xts-plain64]

1. The sector cipher on 1 MiB requests (encrypt, decrypt), on the event loop's
   thread: what one request costs; for XTS also where its time goes (the CPU
   time of each stage of a 1 MiB request, as in docs/drivers/luks.md).
2. The luks node (through Graph/Disk, no FUSE) over a file in /dev/shm, with
   1 and 4 requests in flight, requests encrypted inline, on worker threads
   (the node's THREAD_MIN_BYTES set to 256 KiB), or on worker threads in
   pieces (PIECE_MIN_BYTES 256 KiB too): whether each hand-off pays.

Numbers are MB/s (10^6 bytes per second), best of three runs.  The machines
are noisy; compare figures from the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import trio

from fusedisk.filters.luks import node as luks_driver
from fusedisk.filters.luks.cipher import SECTOR, make_sector_cipher, split_cipher_spec
from fusedisk.filters.luks.cipher.base import CHUNK_SECTORS
from fusedisk.filters.luks.cipher.gf128 import expand_tweaks
from fusedisk.filters.luks.cipher.xts import XtsCipher
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec

MiB = 1 << 20


def cipher_speed(
    cipher: str, request: int, seconds: float, sector_size: int = 512
) -> tuple[float, float]:
    name, mode = split_cipher_spec(cipher)
    key = os.urandom(64 if mode.startswith("xts") else 32)
    sc = make_sector_cipher(name, mode, key, sector_size)
    data = os.urandom(request)
    results = []
    for fn in (sc.encrypt, sc.decrypt):
        best = 0.0
        for _ in range(3):
            n = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                fn(n * (request // 512), data)
                n += 1
            best = max(best, n * request / (time.perf_counter() - t0) / 1e6)
        results.append(best)
    return results[0], results[1]


def cpu_us(fn: Callable[[], object], repeat: int = 200) -> float:
    """CPU time of one call, in µs (the thread's own time: steadier than the clock
    on a shared machine)."""
    fn()
    t0 = time.thread_time()
    for _ in range(repeat):
        fn()
    return (time.thread_time() - t0) / repeat * 1e6


def xts_stages() -> dict[str, float]:
    """CPU µs per 1 MiB of each stage of XtsCipher._chunk, in its order."""
    cipher = make_sector_cipher("aes", "xts-plain64", os.urandom(64))
    assert isinstance(cipher, XtsCipher)
    ws = cipher._local
    n = CHUNK_SECTORS
    per_mib = MiB // (n * SECTOR)
    src = np.frombuffer(os.urandom(n * SECTOR), dtype="<u8")
    dst = np.empty_like(src)
    ivs = cipher._ivgen.ivs(0, n)
    tweak_ecb = cipher._context(ws, "tweak", cipher._k2, True)
    first = np.frombuffer(tweak_ecb.update(ivs.tobytes()), dtype="<u8").reshape(n, 2)
    flat = ws.tweaks.reshape(-1)
    aes = cipher._stream_context(ws, True)
    stages: dict[str, Callable[[], object]] = {
        "IVs and their ECB pass": lambda: tweak_ecb.update(cipher._ivgen.ivs(0, n).tobytes()),
        "tweak expansion": lambda: expand_tweaks(first, ws.tweaks, ws.work),
        "XOR in": lambda: np.bitwise_xor(src, flat, out=ws.masked),
        "XTS (OpenSSL)": lambda: aes.update_into(ws.masked.view(np.uint8).data, ws.ecb_out),
        "XOR out": lambda: np.bitwise_xor(ws.ecb_view, flat, out=dst),
    }
    result = {name: cpu_us(fn) * per_mib for name, fn in stages.items()}
    data = os.urandom(MiB)
    kept = bytearray(data)  # bytes(bytes) would be the same object, not a copy
    result["copy into new bytes"] = cpu_us(lambda: bytes(kept))
    result["whole request (encrypt)"] = cpu_us(lambda: cipher.encrypt(0, data))
    return result


async def node_speed(
    folder: Path, cipher: str, request: int, depth: int, seconds: float
) -> tuple[float, float]:
    size = 256 * MiB
    image = folder / "bench.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size + 2 * MiB)
    (folder / "key").write_bytes(b"benchmark")
    spec = parse_spec(
        f"""
[nodes.crypt]
driver = "luks"
file = {{ driver = "file", filename = "bench.img" }}
key-file = "key"
format = true
pbkdf2-iterations = 1000
cipher = "{cipher}"
key-size = {512 if "xts" in cipher else 256}
[disks.d]
node = "crypt"
""",
        folder / "spec.toml",
    )
    graph = await Graph.open(spec)
    disk = graph.disks["d"]
    data = os.urandom(request)
    results = []
    done = 0

    async def worker(first: int, writing: bool, deadline: float) -> None:
        nonlocal done
        off = first * request
        while time.perf_counter() < deadline:
            if writing:
                await disk.write(off, data)
            else:
                await disk.read(off, request)
            done += request
            off = (off + depth * request) % (disk.size - request)

    try:
        for writing in (True, False):
            best = 0.0
            for _ in range(3):
                done = 0
                t0 = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for i in range(depth):
                        nursery.start_soon(worker, i, writing, t0 + seconds / 3)
                best = max(best, done / (time.perf_counter() - t0) / 1e6)
            results.append(best)
    finally:
        await graph.close()
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--cipher", default="aes-xts-plain64")
    args = parser.parse_args()

    for label, request in (("1 MiB", MiB), ("4 KiB", 4096)):
        for sector_size in (512, 4096):  # LUKS1 / LUKS2's usual segment sector sizes
            enc, dec = cipher_speed(args.cipher, request, args.seconds, sector_size)
            print(
                f"sector cipher {args.cipher}, {sector_size}-byte sectors, {label} requests: "
                f"encrypt {enc:.0f} MB/s, decrypt {dec:.0f} MB/s"
            )

    if args.cipher.startswith("aes-xts"):
        print("1 MiB XTS request, CPU time per stage:")
        for name, us in xts_stages().items():
            print(f"  {name:24} {us:6.0f} µs")

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    modes = (("inline", 1 << 62, 1 << 62), ("threads", 256 << 10, 1 << 62),
             ("pieces", 256 << 10, 256 << 10))  # fmt: skip
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        saved = luks_driver.THREAD_MIN_BYTES, luks_driver.PIECE_MIN_BYTES
        try:
            for label, threshold, piece in modes:
                luks_driver.THREAD_MIN_BYTES, luks_driver.PIECE_MIN_BYTES = threshold, piece
                for depth in (1, 4):
                    w, r = trio.run(node_speed, Path(tmp), args.cipher, MiB, depth, args.seconds)
                    print(
                        f"luks node, 1 MiB requests, {depth} in flight, {label:7}: "
                        f"write {w:.0f} MB/s, read {r:.0f} MB/s"
                    )
        finally:
            luks_driver.THREAD_MIN_BYTES, luks_driver.PIECE_MIN_BYTES = saved


if __name__ == "__main__":
    main()
