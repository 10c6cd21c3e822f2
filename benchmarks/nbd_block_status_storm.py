#!/usr/bin/env python3
"""A 4 KiB read of one disk while NBD block-status requests storm another.

    .venv/bin/python benchmarks/nbd_block_status_storm.py [--requests 64] [--reads 200]

`fusedisk mount --nbd` of a fragmented 1 GiB qcow2 (4 KiB of data every 64 KiB,
4 KiB clusters: the costliest walk) and a raw disk.  Two raw NBD clients send
whole-disk NBD_CMD_BLOCK_STATUS requests on the qcow2 while this process times
4 KiB O_DIRECT reads of the raw disk through the FUSE mount, first with no
storm, then during it.  The figure goes in docs/security.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusedisk.export.nbd import protocol as p  # noqa: E402
from tests.conftest import make_image  # noqa: E402
from tests.mounting import Mount  # noqa: E402
from tests.test_nbd_block_status import (  # noqa: E402
    SIZE,
    SPEC,
    StatusClient,
    fragmented_qcow2,
    timed_direct_reads,
)


def summary(name: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    at = lambda q: ms[min(len(ms) - 1, int(len(ms) * q))]  # noqa: E731
    return (f"{name:>14}: median {at(0.5):7.2f} ms  p90 {at(0.9):7.2f}  "
            f"p99 {at(0.99):7.2f}  max {ms[-1]:7.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64, help="block-status requests (two clients)")
    ap.add_argument("--reads", type=int, default=200, help="4 KiB reads timed, each phase")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fragmented_qcow2(folder)
        make_image(folder / "other.img", 256 << 20, b"other")
        (folder / "spec.toml").write_text(SPEC)
        sock = folder / "nbd.sock"
        m = Mount(folder / "spec.toml", folder / "mnt", ("--nbd", f"unix:{sock}")).start()
        try:
            disk = m.path("vm1.img")
            quiet = timed_direct_reads(disk, range(args.reads))
            storm = [StatusClient(sock, timeout=600) for _ in range(2)]
            for client in storm:
                client.go_structured("vm0")
                for cookie in range(args.requests // 2):
                    client.request(p.CMD_BLOCK_STATUS, 0, SIZE, cookie=cookie)
            done = threading.Event()

            def drain(client: StatusClient, count: int) -> None:
                for _ in range(count):
                    client.chunk()
                done.set()

            threads = [threading.Thread(target=drain, args=(c, args.requests // 2)) for c in storm]
            for t in threads:
                t.start()
            during = timed_direct_reads(disk, range(args.reads))
            still = not done.is_set()
            for t in threads:
                t.join()
            for client in storm:
                client.close()
        finally:
            m.stop()
    print(summary("no storm", quiet))
    print(summary("during storm", during) + ("" if still else "  (the storm ended first)"))


if __name__ == "__main__":
    main()
