"""LUKS2 images shared with cryptsetup, cryptsetup as the referee.

This kernel has no device-mapper, so plaintext crosses over by cryptsetup's
offline re-encryption, which runs in user space (../shared/platform.md,
"LUKS2 without dm-crypt"): a plaintext file P is encrypted in place
(`reencrypt --encrypt --type luks2 --reduce-device-size 16M`) and fusedisk
must read P back through a real mount; fusedisk writes Q through the mount
and `reencrypt --decrypt` (on a loop device, the header moved to a file)
must give Q back.  Argon2 costs are the smallest cryptsetup takes.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli, needs

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180), needs("cryptsetup", "losetup")]

MiB = 1 << 20
#: the plaintext that survives `--reduce-device-size 16M` of a 24 MiB file
IMAGE = 24 * MiB
DATA = IMAGE - 16 * MiB
KDF = {
    "argon2id": ["--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"],
    "argon2i": ["--pbkdf", "argon2i", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"],
    "pbkdf2": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
}


def run(*cmd: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}{result.stderr}"
    return result


def luks2_spec(image: Path, key: Path, extra: str = "") -> str:
    return (
        f'[nodes.crypt]\ndriver = "luks"\nfile = {{ driver = "file", filename = "{image}" }}\n'
        f'key-file = "{key}"\n{extra}[disks.vm0]\nnode = "crypt"\n'
    )


def encrypt_in_place(tmp_path: Path, kdf: str, sector: int, seed: int = 1) -> tuple[Path, bytes]:
    """A cryptsetup LUKS2 image made from random plaintext; returns it and the plaintext."""
    plain = random.Random(seed).randbytes(IMAGE)
    image = tmp_path / "luks2.img"
    image.write_bytes(plain)
    run("cryptsetup", "reencrypt", "-q", "--encrypt", "--type", "luks2",
        "--reduce-device-size", "16M", "--sector-size", sector, *KDF[kdf],
        "--key-file", tmp_path / "key", image)  # fmt: skip
    return image, plain[:DATA]


def decrypt_with_cryptsetup(tmp_path: Path, image: Path) -> bytes:
    """cryptsetup's offline decryption of `image`; its plaintext (at byte 0 afterwards)."""
    header = tmp_path / "moved.hdr"
    loop = run("losetup", "-f", "--show", image).stdout.strip()
    try:
        run("cryptsetup", "reencrypt", "-q", "--decrypt", "--force-offline-reencrypt",
            "--header", header, "--key-file", tmp_path / "key", loop)  # fmt: skip
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    with open(image, "rb") as f:
        return f.read(DATA)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_bytes(b"luks2 passphrase")
    return path


@pytest.mark.parametrize(
    ("kdf", "sector"),
    [("argon2id", 512), ("argon2id", 4096), ("pbkdf2", 512), ("pbkdf2", 4096), ("argon2i", 4096)],
)
def test_plaintext_encrypted_by_cryptsetup_reads_back_through_the_mount(
    tmp_path, key, write_spec, mount, kdf, sector
):
    image, plain = encrypt_in_place(tmp_path, kdf, sector)
    m = mount(write_spec(luks2_spec(image, key)))
    disk = m.path("vm0.img")
    assert disk.stat().st_size == IMAGE - 8 * MiB  # payload at 8 MiB, dynamic size
    with open(disk, "rb") as f:
        assert f.read(DATA) == plain
    stats = m.path("vm0", "nodes", "crypt", "header").read_text()
    assert f"sector-size: {sector}" in stats and "version: 2" in stats


@pytest.mark.parametrize("sector", [512, 4096])
def test_data_written_through_the_mount_decrypts_in_cryptsetup(
    tmp_path, key, write_spec, mount, sector
):
    image, plain = encrypt_in_place(tmp_path, "argon2id", sector, seed=2)
    rng = random.Random(3)
    # unaligned writes too: the edge does read-modify-write around them
    writes = [(0, rng.randbytes(MiB)), (3 * MiB + 123, rng.randbytes(70001)),
              (DATA - 4096, rng.randbytes(4096)), (5 * MiB + 511, rng.randbytes(1))]  # fmt: skip
    expected = bytearray(plain)
    m = mount(write_spec(luks2_spec(image, key)))
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    try:
        for offset, data in writes:
            assert os.pwrite(fd, data, offset) == len(data)
            expected[offset : offset + len(data)] = data
        os.fsync(fd)
        assert os.pread(fd, DATA, 0) == bytes(expected)
    finally:
        os.close(fd)
    m.stop()
    assert decrypt_with_cryptsetup(tmp_path, image) == bytes(expected)


def test_a_detached_header_needs_header_file(tmp_path, key, write_spec, mount):
    """`luksFormat --header H` keeps the header apart: with header-file the data device
    opens and what fusedisk writes decrypts in cryptsetup with the same header; the
    data device alone holds no header and is refused."""
    data = tmp_path / "data.img"
    data.write_bytes(bytes(4 * MiB))
    header = tmp_path / "h.hdr"
    run("cryptsetup", "luksFormat", "-q", "--type", "luks2", *KDF["argon2id"],
        "--header", header, "--key-file", key, data)  # fmt: skip
    m = mount(write_spec(luks2_spec(data, key, extra=f'header-file = "{header}"\n')))
    disk = m.path("vm0.img")
    assert disk.stat().st_size == 4 * MiB
    q = random.Random(9).randbytes(4 * MiB)
    with open(disk, "r+b") as f:
        f.write(q)
    m.stop()
    loop = run("losetup", "-f", "--show", data).stdout.strip()
    try:
        run("cryptsetup", "reencrypt", "-q", "--decrypt", "--header", header,
            "--key-file", key, loop)  # fmt: skip
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    assert data.read_bytes() == q
    result = cli("check", write_spec(luks2_spec(data, key), name="plain.toml"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
