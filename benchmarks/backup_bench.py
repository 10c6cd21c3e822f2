#!/usr/bin/env python3
"""What copy-before-write costs guest writes: fio through a mount, alone and while a
full `fusedisk backup` of the same disk runs.

    .venv/bin/python benchmarks/backup_bench.py [--size 1G] [--runtime 4] [--dir DIR]
        [--jobs rand-write-4k-qd1,rand-write-4k-qd16,seq-write-1M] [--json OUT]

The disk is a fully written qcow2 (so the backup copies every cluster).  For each
job: fio alone, then fio started right after a full backup (`--no-wait`), which
copies the old data of each 64 KiB granule a write touches first (the hook) while
its copy loop reads the rest.  Reported: IOPS and MB/s of both runs, the backup's
duration and the bytes the hook copied ahead of guest writes.  Results belong in
docs/benchmarks.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fio_compare import JOBS, machine, make_image, mounted_spec, run_fio  # noqa: E402
from fusedisk.graph.options import parse_size  # noqa: E402


def backup_job(disk_dir: Path) -> dict:
    return json.loads((disk_dir / "job").read_text())


def measure(disk: Path, work: Path, job: str, runtime: int, size: int, n: int) -> dict:
    alone = run_fio(disk, JOBS[job], runtime, size)
    dest = work / f"backup-{n}.qcow2"
    subprocess.run([sys.executable, "-m", "fusedisk", "backup", str(disk.with_suffix("")),
                    str(dest), "--no-wait"], check=True, capture_output=True)  # fmt: skip
    during = run_fio(disk, JOBS[job], runtime, size)
    while backup_job(disk.with_suffix(""))["state"] == "running":
        time.sleep(0.1)
    state = backup_job(disk.with_suffix(""))
    dest.unlink(missing_ok=True)
    return {
        "job": job,
        "alone IOPS": round(alone["IOPS"]),
        "during IOPS": round(during["IOPS"]),
        "alone MB/s": round(alone["MB/s"], 1),
        "during MB/s": round(during["MB/s"], 1),
        "backup s": state["elapsed"],
        "hook MiB": round(state.get("copied_before_write_bytes", 0) / 2**20, 1),
        "backup": state["state"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--jobs", default="rand-write-4k-qd1,rand-write-4k-qd16,seq-write-1M")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    size = parse_size(args.size)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "d.qcow2"
        make_image(image, size, "qcow2")
        spec = f'[nodes.d0]\ndriver = "qcow2"\nfilename = "{image}"\n\n[disks.vm0]\nnode = "d0"\n'
        with mounted_spec(work, spec) as disk:
            for n, job in enumerate(args.jobs.split(",")):
                rows.append(measure(disk, work, job, args.runtime, size, n))
                print(rows[-1], flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
