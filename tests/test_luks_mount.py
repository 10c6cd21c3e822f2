"""A luks disk through a real mount: what QEMU, nbdkit, cryptsetup, losetup and ext4 see."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from fusedisk.graph.registry import drivers
from tests.conftest import make_image, needs, run
from tests.mounting import MountError

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]

MiB = 1 << 20


def luks_spec(child: str, **options: str) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in options.items())
    return f"""
[nodes.crypt]
driver = "luks"
file = {child}
key-file = "key"
format = true
pbkdf2-iterations = 1000
{extra}
[disks.vm0]
node = "crypt"
"""


RAW_CHILD = '{ driver = "file", filename = "d0.img" }'
QCOW2_CHILD = '{ driver = "qcow2", file = { driver = "file", filename = "d0.qcow2" } }'


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_bytes(b"mount passphrase")
    return path


@needs("qemu-img", "cryptsetup")
def test_data_written_through_the_mount_reads_the_same_in_qemu_and_nbdkit(
    tmp_path, key, write_spec, mount
):
    image = make_image(tmp_path / "d0.img", 10 * MiB)
    m = mount(write_spec(luks_spec(RAW_CHILD)))
    assert m.path("vm0.img").stat().st_size == 8 * MiB
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    try:
        rng = random.Random(7)
        written = [(0, MiB), (3 * MiB + 123, 70001), (8 * MiB - 4096, 4096)]
        written = [(offset, rng.randbytes(length)) for offset, length in written]
        for offset, data in written:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
        # What was never written reads as the decryption of zeroes: compare it all.
        expected = os.pread(fd, 8 * MiB, 0)
        for offset, data in written:
            assert expected[offset : offset + len(data)] == data
    finally:
        os.close(fd)
    header = m.path("vm0", "nodes", "crypt", "header").read_text()
    assert "Key Slot 0: ENABLED" in header
    options = m.path("vm0", "nodes", "crypt", "options")
    shown = " ".join(p.read_text() for p in options.iterdir())
    assert "mount passphrase" not in shown and "mount passphrase" not in m.log
    m.stop()

    dump = run("cryptsetup", "luksDump", image)
    assert "Cipher mode:   \txts-plain64" in dump
    run("cryptsetup", "open", "--test-passphrase", "--key-file", key, image)
    out = tmp_path / "qemu.raw"
    run("qemu-img", "convert", "--object", f"secret,id=s0,file={key}", "--image-opts",
        f"driver=luks,key-secret=s0,file.filename={image}", "-O", "raw", out)  # fmt: skip
    assert out.read_bytes() == expected
    if shutil.which("nbdkit"):
        out = tmp_path / "nbdkit.raw"
        run("nbdkit", "-U", "-", "--filter=luks", "file", image, f"passphrase=+{key}", "--run",
            f'qemu-img convert -f raw "$nbd" {out}')  # fmt: skip
        assert out.read_bytes() == expected


def test_a_wrong_key_refuses_to_mount(tmp_path, key, write_spec, mount):
    image = make_image(tmp_path / "d0.img", 4 * MiB)
    m = mount(write_spec(luks_spec(RAW_CHILD)))
    m.stop()
    before = image.read_bytes()
    key.write_bytes(b"not the passphrase")
    with pytest.raises(MountError, match="wrong key: no key slot accepts it"):
        mount(write_spec(luks_spec(RAW_CHILD)), name="mnt2")
    assert image.read_bytes() == before


@needs("losetup", "mkfs.ext4", "fsck.ext4", "mount", "qemu-img")
@pytest.mark.parametrize("chain", ["raw", "qcow2"])
def test_ext4_on_a_loop_device_of_a_luks_disk_is_clean(tmp_path, key, write_spec, mount, chain):
    """The seed chain: luks over a qcow2 over a file, and luks over a raw file."""
    if chain == "qcow2":
        if "qcow2" not in drivers():
            pytest.skip("no qcow2 driver yet")
        run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "d0.qcow2", "66M")
        image, child = tmp_path / "d0.qcow2", QCOW2_CHILD
    else:
        image, child = make_image(tmp_path / "d0.img", 66 * MiB), RAW_CHILD
    m = mount(write_spec(luks_spec(child)))
    loop = run("losetup", "--find", "--show", m.path("vm0.img")).strip()
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    payload = os.urandom(3 * MiB + 17)
    try:
        run("mkfs.ext4", "-q", "-F", loop)
        run("mount", loop, fsdir)
        try:
            for i in range(5):
                (fsdir / f"file{i}").write_bytes(payload[i:])
            os.sync()
        finally:
            run("umount", fsdir)
        run("fsck.ext4", "-f", "-n", loop)
    finally:
        subprocess.run(["losetup", "-d", loop])
    m.stop()
    # QEMU decrypts the same image into a clean file system holding the same files.
    plain = tmp_path / "plain.raw"
    file_opts = "file.driver=qcow2,file.file.filename" if chain == "qcow2" else "file.filename"
    run("qemu-img", "convert", "--object", f"secret,id=s0,file={key}", "--image-opts",
        f"driver=luks,key-secret=s0,{file_opts}={image}", "-O", "raw", plain)  # fmt: skip
    run("fsck.ext4", "-f", "-n", plain)
    if chain == "qcow2":
        run("qemu-img", "check", image)
    run("mount", "-o", "ro,loop", plain, fsdir)
    try:
        assert (fsdir / "file3").read_bytes() == payload[3:]
    finally:
        run("umount", fsdir)


@needs("fusermount3")
def test_the_passphrase_is_asked_on_the_terminal_at_mount(tmp_path, key, write_spec):
    """No key option: `fusedisk mount -f` on a terminal asks, without echo, and mounts."""
    import pty
    import select
    import sys
    import time

    make_image(tmp_path / "d0.img", 4 * MiB)
    subprocess.run([sys.executable, "-m", "fusedisk", "luks", "format", tmp_path / "d0.img",
                    "--key-file", key, "--pbkdf2-iterations", "1000"], check=True)  # fmt: skip
    spec = write_spec(
        '[nodes.crypt]\ndriver = "luks"\nfile = { driver = "file", filename = "d0.img" }\n'
        '[disks.vm0]\nnode = "crypt"\n'
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid, fd = pty.fork()
    if pid == 0:  # the child: fusedisk on a terminal
        os.execv(sys.executable, [sys.executable, "-m", "fusedisk", "mount", "-f", str(spec),
                                  str(mnt)])  # fmt: skip
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"Passphrase for LUKS node 'crypt': " not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 1024)
        os.write(fd, key.read_bytes() + b"\n")
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline, seen
            if select.select([fd], [], [], 0.1)[0]:
                seen += os.read(fd, 1024)
        assert (mnt / "vm0.img").stat().st_size == 2 * MiB
        assert key.read_bytes() not in seen  # not echoed
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        deadline = time.monotonic() + 20
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            time.sleep(0.05)
        os.close(fd)
