#!/usr/bin/env python3
"""fio through a fusedisk mount, beside qemu-storage-daemon's FUSE export of the same
image and the host file itself, in one run on one machine.

    .venv/bin/python benchmarks/fio_compare.py [--size 512M] [--runtime 5] [--dir DIR]
        [--format raw] [--jobs seq-read,rand-read-qd16,...] [--cold] [--json OUT]

The device-bound case (caches dropped before each job; both servers with O_DIRECT too):

    .venv/bin/python benchmarks/fio_compare.py --size 4G --cold \
        --jobs rand-read-4k-qd1,rand-read-4k-qd16 --targets "host file,\
    qemu-storage-daemon,fusedisk,qemu-storage-daemon cache.direct,fusedisk cache.direct"

Prints a table of MB/s and IOPS per job and target, and the ratio
fusedisk / qemu-storage-daemon (and the same for the cache.direct pair).  `--cold`
drops the host page cache before each job, so reads come from the device (use an
image of a few GiB).  `--json` results feed benchmarks/charts.py.  Run as root on
an otherwise idle machine; results belong in docs/benchmarks.md with the machine
they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusedisk.filters.luks.luks2_header import check_copy  # noqa: E402
from fusedisk.graph.options import parse_size  # noqa: E402
from tests.mounting import Mount  # noqa: E402

JOBS: dict[str, dict[str, str]] = {
    "seq-read-1M": {"rw": "read", "bs": "1M", "iodepth": "1"},
    "seq-write-1M": {"rw": "write", "bs": "1M", "iodepth": "1"},
    "seq-read-1M-qd4": {"rw": "read", "bs": "1M", "iodepth": "4"},
    "seq-write-1M-qd4": {"rw": "write", "bs": "1M", "iodepth": "4"},
    "rand-read-4k-qd1": {"rw": "randread", "bs": "4k", "iodepth": "1"},
    "rand-read-4k-qd16": {"rw": "randread", "bs": "4k", "iodepth": "16"},
    "rand-write-4k-qd1": {"rw": "randwrite", "bs": "4k", "iodepth": "1"},
    "rand-write-4k-qd16": {"rw": "randwrite", "bs": "4k", "iodepth": "16"},
}


def serving_process(path: Path) -> int | None:
    """The pid of the FUSE daemon serving `path`: it holds /dev/fuse and names the mount."""
    folder = str(path.parent if path.name.endswith(".img") else path)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if folder not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            if any(os.readlink(fd) == "/dev/fuse" for fd in (entry / "fd").iterdir()):
                return int(entry.name)
        except OSError:
            continue
    return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time the process has used (0 without a daemon)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(
    path: Path,
    job: dict[str, str],
    runtime: int,
    size: int,
    target: list[str] | None = None,
    daemon: int | None = None,
) -> dict[str, float]:
    """One fio job on `path` (or on `target`'s fio options, e.g. an NBD URI, served by
    the process `daemon`): MB/s, IOPS and the daemon's CPU per request."""
    target = target or [f"--filename={path}", "--ioengine=libaio", "--direct=1"]
    cmd = [
        "fio", "--name=bench", *target,
        f"--rw={job['rw']}", f"--bs={job['bs']}", f"--iodepth={job['iodepth']}",
        f"--size={size}", f"--runtime={runtime}", "--ramp_time=1", "--time_based",
        "--output-format=json", "--randrepeat=0", "--norandommap",
    ]  # fmt: skip
    daemon = serving_process(path) if daemon is None else daemon
    cpu_before = cpu_seconds(daemon)
    # a lost request must not hang the benchmark: fio ends by itself at runtime + ramp
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=runtime + 60)
    out = done.stdout
    cpu = cpu_seconds(daemon) - cpu_before
    result = json.loads(out[out.index("{") :])["jobs"][0]
    side = result["read"] if "read" in job["rw"] else result["write"]
    # the CPU time covers fio's ramp second too: count its requests at the measured rate
    ios = max(side["iops"] * (runtime + 1), 1)
    return {"MB/s": side["bw_bytes"] / 1e6, "IOPS": side["iops"], "cpu_us": cpu / ios * 1e6}


def drop_caches() -> None:
    """Write back and drop the host page cache (root): the next reads reach the device."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


KEY = "benchmark-passphrase"


def make_image(path: Path, size: int, fmt: str) -> None:
    """A fully written image, so reads measure data, not holes."""
    if fmt in ("luks", "luks2"):
        key = path.with_name("key")
        key.write_text(KEY)
        # fusedisk's own format (cryptsetup's layout): qemu-img's iter-time calibration
        # fails now and then on busy VMs ("Unable to get accurate CPU usage").  luks2:
        # cryptsetup's defaults (4096-byte sectors), a cheap key slot.
        cheap = ["--pbkdf2-iterations", "1000"]
        if fmt == "luks2":
            cheap = ["--version", "2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
        subprocess.run(
            [sys.executable, "-m", "fusedisk", "luks", "format", str(path), "--size", str(size),
             "--key-file", str(key), *cheap],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        # Fill the payload with noise (what ciphertext looks like), so neither a luks
        # disk nor the same file read unencrypted reads holes.
        payload = path.stat().st_size - size
        subprocess.run(
            ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"seek={payload}",
             "oflag=seek_bytes", "conv=notrunc", f"count={size >> 20}", "status=none"],
            check=True,
        )  # fmt: skip
        return
    raw = path.with_suffix(".raw")
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={raw}", "bs=1M", f"count={size >> 20}", "status=none"],
        check=True,
    )
    if fmt == "raw":
        raw.rename(path)
    else:
        subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(path)], check=True)
        raw.unlink()


@contextmanager
def host_file(image: Path, fmt: str, work: Path) -> Iterator[Path]:
    if fmt != "raw":
        raise SystemExit("the host-file target only makes sense for raw images")
    yield image


@contextmanager
def mounted_spec(work: Path, text: str, args: tuple[str, ...] = ()) -> Iterator[Path]:
    """Mount a spec's text with fusedisk; yields the path of its disk vm0."""
    spec = work / "bench.toml"
    spec.write_text(text)
    mount = Mount(spec, work / "mnt", args).start()
    try:
        yield mount.path("vm0.img")
    finally:
        mount.stop()


@contextmanager
def fusedisk_mount(
    image: Path,
    fmt: str,
    work: Path,
    args: tuple[str, ...] = (),
    direct: bool = False,
    aio: str | None = None,
) -> Iterator[Path]:
    cache = ", cache.direct = true" if direct else ""
    engine = f', aio = "{aio}"' if aio else ""  # default: io_uring where available
    child = f'file = {{ driver = "file", filename = "{image}"{cache}{engine} }}'
    driver = fmt
    if fmt in ("luks", "luks2"):
        child += f'\nkey-file = "{work / "key"}"'
        driver = "luks"  # the version comes from the header
    with mounted_spec(
        work, f'[nodes.d0]\ndriver = "{driver}"\n{child}\n[disks.vm0]\nnode = "d0"\n', args
    ) as path:
        yield path


def fusedisk_pyfuse3(image: Path, fmt: str, work: Path) -> AbstractContextManager[Path]:
    return fusedisk_mount(image, fmt, work, ("--transport", "pyfuse3"))


def fusedisk_direct(image: Path, fmt: str, work: Path) -> AbstractContextManager[Path]:
    return fusedisk_mount(image, fmt, work, direct=True)


def fusedisk_threads(image: Path, fmt: str, work: Path) -> AbstractContextManager[Path]:
    return fusedisk_mount(image, fmt, work, aio="threads")


def fusedisk_direct_threads(image: Path, fmt: str, work: Path) -> AbstractContextManager[Path]:
    return fusedisk_mount(image, fmt, work, direct=True, aio="threads")


def fusedisk_unencrypted(image: Path, fmt: str, work: Path) -> AbstractContextManager[Path]:
    """The payload of the same image file through a `raw` node: a `luks` disk without
    its cipher.  LUKS1 keeps the payload offset, in sectors, at byte 104 (big endian);
    LUKS2 in its JSON's data segment."""
    with open(image, "rb") as f:
        head = f.read(16 << 10)
    offset = int.from_bytes(head[104:108], "big") * 512 if head[:4] == b"LUKS" else 0
    if head[:8] == b"LUKS\xba\xbe\x00\x02":
        meta = json.loads(check_copy(head, 0, "primary").json_text)
        offset = int(next(iter(meta["segments"].values()))["offset"])
    child = f'file = {{ driver = "file", filename = "{image}" }}'
    return mounted_spec(
        work, f'[nodes.d0]\ndriver = "raw"\n{child}\noffset = {offset}\n[disks.vm0]\nnode = "d0"\n'
    )


def qsd_direct(image: Path, fmt: str, work: Path) -> AbstractContextManager[Path]:
    return qsd_export(image, fmt, work, direct=True)


@contextmanager
def qsd_export(image: Path, fmt: str, work: Path, direct: bool = False) -> Iterator[Path]:
    target = work / "qsd-export"
    target.touch()
    secret = ["--object", f"secret,id=s0,file={work / 'key'}"] if fmt == "luks" else []
    key = ",key-secret=s0" if fmt == "luks" else ""
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon", *secret,
            "--blockdev", f"driver=file,node-name=f,filename={image}"
            + (",cache.direct=on" if direct else ""),
            "--blockdev", f"driver={fmt},node-name=d,file=f{key}",
            "--export", f"type=fuse,id=e,node-name=d,mountpoint={target},writable=on",
        ],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(target):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"qemu-storage-daemon did not mount: {proc.stderr.read()!r}")
            time.sleep(0.05)
        yield target
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if os.path.ismount(target):
            subprocess.run(["fusermount3", "-uz", str(target)])


TARGETS: dict[str, Callable[[Path, str, Path], AbstractContextManager[Path]]] = {
    "host file": host_file,
    "qemu-storage-daemon": qsd_export,
    "fusedisk": fusedisk_mount,
    "fusedisk-pyfuse3": fusedisk_pyfuse3,
    # both servers with O_DIRECT on the image (QEMU's cache.direct=on, cache=none)
    "qemu-storage-daemon cache.direct": qsd_direct,
    "fusedisk cache.direct": fusedisk_direct,
    # the worker pool instead of the default io_uring (file option aio)
    "fusedisk threads": fusedisk_threads,
    "fusedisk cache.direct threads": fusedisk_direct_threads,
    # --format luks: the same image file as a raw node (the header and ciphertext as data)
    "fusedisk unencrypted": fusedisk_unencrypted,
}
DEFAULT_TARGETS = ("host file", "qemu-storage-daemon", "fusedisk", "fusedisk-pyfuse3")


def print_table(
    results: dict[str, dict[str, dict[str, float]]],
    jobs: list[str],
    numerator: str,
    denominator: str,
    ratio_label: str,
) -> None:
    """A markdown table of every target's MB/s (sequential) or IOPS, and one ratio."""
    targets = list(results)
    print("| job | " + " | ".join(targets) + f" | {ratio_label} |")
    print("|" + "---|" * (len(targets) + 2))
    for job in jobs:
        unit = "MB/s" if job.startswith("seq") else "IOPS"
        cells = [f"{results[t][job][unit]:,.0f} {unit}" for t in targets]
        ratio = ""
        if numerator in results and denominator in results:
            ratio = f"{results[numerator][job][unit] / results[denominator][job][unit]:.2f}"
        print(f"| {job} | " + " | ".join(cells) + f" | {ratio} |")
    print("\nDaemon CPU per request (µs, user + system, fio's ramp included):\n")
    print("| job | " + " | ".join(targets) + " |")
    print("|" + "---|" * (len(targets) + 1))
    for job in jobs:
        cells = [f"{results[t][job].get('cpu_us', 0):.1f}" if results[t][job].get("cpu_us")
                 else "–" for t in targets]  # fmt: skip
        print(f"| {job} | " + " | ".join(cells) + " |")


def machine() -> str:
    cpu = "unknown cpu"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout
    return (
        f"{os.cpu_count()} × {cpu}, {mem:.0f} GiB RAM, kernel {platform.release()}, "
        f"Python {platform.python_version()}, {qemu.splitlines()[0]}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512M")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per job")
    parser.add_argument(
        "--format", default="raw", help="image format: raw, qcow2, luks or luks2 (fusedisk only)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="qcow2: start from an empty image (allocating writes)"
    )
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument(
        "--targets", default=",".join(DEFAULT_TARGETS), help=f"from: {', '.join(TARGETS)}"
    )
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here (benchmarks/charts.py)")
    parser.add_argument(
        "--cold", action="store_true", help="drop the host page cache before each job"
    )
    args = parser.parse_args()
    if not shutil.which("fio"):
        raise SystemExit("fio is not installed")
    size = parse_size(args.size)
    jobs = args.jobs.split(",")
    targets = [t for t in args.targets.split(",") if args.format == "raw" or t != "host file"]

    work = Path(args.dir or tempfile.mkdtemp(prefix="fusedisk-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / f"bench.{args.format}"
    results: dict[str, dict[str, dict[str, float]]] = {}
    # Read-only jobs leave the image as it was: make it once (4 GiB takes a while).
    reads_only = all("read" in JOBS[job]["rw"] for job in jobs) and not args.fresh
    try:
        for target in targets:
            if image.exists() and not reads_only:
                image.unlink()
            if args.fresh:
                subprocess.run(["qemu-img", "create", "-q", "-f", args.format, str(image),
                                str(size)], check=True)  # fmt: skip
            elif not image.exists():
                make_image(image, size, args.format)
            results[target] = {}
            with TARGETS[target](image, args.format, work) as path:
                for job in jobs:
                    if args.cold:
                        drop_caches()
                    results[target][job] = run_fio(path, JOBS[job], args.runtime, size)
                    print(f"{target:>20} {job:<20} {results[target][job]}", file=sys.stderr)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nMachine: {machine()}")
    print(f"Image: {args.format}, {args.size}; fio libaio direct=1, {args.runtime} s per job\n")
    print_table(results, jobs, "fusedisk", "qemu-storage-daemon", "fusedisk / qsd")
    if "fusedisk unencrypted" in results and "fusedisk" in results:
        print()
        pair = {t: results[t] for t in ("fusedisk", "fusedisk unencrypted")}
        print_table(pair, jobs, "fusedisk", "fusedisk unencrypted", f"{args.format} / unencrypted")
    direct = ("fusedisk cache.direct", "qemu-storage-daemon cache.direct")
    if all(t in results for t in direct):
        print()
        print_table({t: results[t] for t in direct}, jobs, *direct, "cache.direct: fusedisk / qsd")
    if args.json:
        cache = "cold" if args.cold else "warm"
        doc = {"machine": machine(), "format": args.format, "cache": cache, "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
