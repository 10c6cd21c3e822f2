"""Helpers for the qcow2 tests: QEMU's tools as referees, and graphs opened without FUSE."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fusedisk.graph.disk import Disk
from fusedisk.graph.graph import Graph
from fusedisk.graph.node import Node
from fusedisk.spec import parse_spec

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io are needed",
)

MiB = 1 << 20
KiB = 1 << 10


def qemu_img(*args: str | Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode in ok, f"qemu-img {args}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def qemu_io(image: str | Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, str(image)], capture_output=True, text=True)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def create(image: Path, size: int | str | None, *options: str, backing: str | None = None,
           backing_fmt: str = "qcow2") -> Path:  # fmt: skip
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join(options)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    args.append(image)
    if size is not None:
        args.append(str(size))
    qemu_img(*args)
    return image


def raw_of(image: Path, *extra: str) -> bytes:
    """The guest bytes as `qemu-img convert -O raw` reads them."""
    out = image.with_name(image.name + ".converted.raw")
    qemu_img("convert", *extra, "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


def check(image: Path) -> tuple[int, dict[str, Any]]:
    """`qemu-img check` exit status (0 clean, 2 corrupt, 3 leaks) and its JSON report."""
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {"output": proc.stdout + proc.stderr}
    return proc.returncode, report


def assert_clean(image: Path) -> None:
    rc, report = check(image)
    assert rc == 0, f"qemu-img check {image}: exit {rc}: {report}"
    assert not report.get("leaks") and not report.get("corruptions"), report


def file_state(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


def header_field(image: Path, offset: int, fmt: str) -> int:
    with open(image, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


def patch(image: Path, offset: int, fmt: str, value: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def pattern(seed: int, n: int) -> bytes:
    """Distinct, cheap, reproducible bytes."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    reps = -(-n // len(block))
    return (block * reps)[:n]


SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "{image}"
{extra}

[disks.vm0]
node = "d0"
{disk_extra}
"""


@asynccontextmanager
async def opened(
    image: Path, read_only: bool = False, extra: str = "", disk_extra: str = "",
    spec_text: str | None = None, options: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[Graph, Disk, Node]]:  # fmt: skip
    """A graph over one qcow2 image (the spec beside it); closed (and flushed) on exit."""
    if read_only:
        extra = "read-only = true\n" + extra
    text = spec_text or SPEC.format(image=image.name, extra=extra, disk_extra=disk_extra)
    spec = parse_spec(text, image.parent / "spec.toml")
    if options:
        spec.nodes["d0"].options.update(options)
    graph = await Graph.open(spec)
    try:
        disk = next(iter(graph.disks.values()))
        yield graph, disk, disk.top
    finally:
        await graph.close()


def run_fusedisk(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the fusedisk CLI in this process (its start-up would dominate a subprocess)."""
    import contextlib
    import io

    from fusedisk.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = int(e.code or 0)
    return subprocess.CompletedProcess(list(map(str, args)), rc, out.getvalue(), err.getvalue())
