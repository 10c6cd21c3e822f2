"""LUKS throughput: the sector cipher alone, and the `luks` node over a file.

    python benchmarks/luks_throughput.py [--seconds 1] [--cipher aes-xts-plain64]

1. The sector cipher on 1 MiB requests (encrypt, decrypt), on the event loop's
   thread: what one request costs.
2. The luks node (through Graph/Disk, no FUSE) over a file in /dev/shm, with
   1 and 4 requests in flight, requests encrypted inline or on worker threads
   (the node's THREAD_MIN_BYTES set to 256 KiB): whether the hand-off pays.

Numbers are MB/s (10^6 bytes per second), best of three runs.  The machines
are noisy; compare figures from the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import trio

from fusedisk.filters import luks as luks_driver
from fusedisk.filters.sector_cipher import make_sector_cipher, split_cipher_spec
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec

MiB = 1 << 20


def cipher_speed(cipher: str, request: int, seconds: float) -> tuple[float, float]:
    name, mode = split_cipher_spec(cipher)
    sc = make_sector_cipher(name, mode, os.urandom(64 if mode.startswith("xts") else 32))
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
        enc, dec = cipher_speed(args.cipher, request, args.seconds)
        print(
            f"sector cipher {args.cipher}, {label} requests: "
            f"encrypt {enc:.0f} MB/s, decrypt {dec:.0f} MB/s"
        )

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        saved = luks_driver.THREAD_MIN_BYTES
        try:
            for label, threshold in (("inline", 1 << 62), ("threads", 256 << 10)):
                luks_driver.THREAD_MIN_BYTES = threshold
                for depth in (1, 4):
                    w, r = trio.run(node_speed, Path(tmp), args.cipher, MiB, depth, args.seconds)
                    print(
                        f"luks node, 1 MiB requests, {depth} in flight, {label:7}: "
                        f"write {w:.0f} MB/s, read {r:.0f} MB/s"
                    )
        finally:
            luks_driver.THREAD_MIN_BYTES = saved


if __name__ == "__main__":
    main()
