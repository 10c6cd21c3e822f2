"""LUKS1 images shared with cryptsetup, QEMU's luks driver and nbdkit's luks filter.

Each direction is checked: images fusedisk formats and writes are read by the
other tools, images they make open in fusedisk, data written by one reads
right in the other, and key slots added or removed by one are honoured by the
other.  This kernel has no device-mapper, so cryptsetup is used for header
work only (luksFormat, luksDump, luksAddKey, luksKillSlot, --test-passphrase);
plaintext is checked with QEMU and nbdkit.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import trio

from fusedisk.cli import main
from fusedisk.errors import OpenError
from fusedisk.filters.luks import keyslot_crypto
from fusedisk.filters.luks import luks1_header as lh
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests.conftest import make_image, needs

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
FAST = ["--pbkdf-force-iterations", "1000"]


def run(*cmd: object, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if ok:
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}{result.stderr}"
    return result


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_for(image: Path, key: Path, **options: str) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in options.items())
    return (
        f'[nodes.crypt]\ndriver = "luks"\nfile = {{ driver = "file", filename = "{image}" }}\n'
        f'key-file = "{key}"\n{extra}[disks.vm0]\nnode = "crypt"\n'
    )


async def _fusedisk(image: Path, key: Path, writes: list[tuple[int, bytes]], options: dict):
    graph = await Graph.open(parse_spec(spec_for(image, key, **options), image.parent / "s.toml"))
    try:
        disk = graph.disks["vm0"]
        for offset, data in writes:
            await disk.write(offset, data)
        return await disk.read(0, disk.size)
    finally:
        await graph.close()


def fusedisk_io(image: Path, key: Path, writes=(), **options: str) -> bytes:
    """Write `writes` through a luks node over `image`, then return all its plaintext."""
    return trio.run(_fusedisk, image, key, list(writes), options)


def qemu_opts(image: Path, over_qcow2: bool = False) -> str:
    if over_qcow2:
        return f"driver=luks,key-secret=s0,file.driver=qcow2,file.file.filename={image}"
    return f"driver=luks,key-secret=s0,file.filename={image}"


def qemu_read_all(image: Path, key: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "--object", f"secret,id=s0,file={key}", "--image-opts",
        qemu_opts(image), "-O", "raw", out)  # fmt: skip
    return out.read_bytes()


def qemu_io(image: Path, key: Path, *commands: str) -> str:
    args = [c for command in commands for c in ("-c", command)]
    out = run("qemu-io", "--object", f"secret,id=s0,file={key}", "--image-opts",
              qemu_opts(image), *args).stdout  # fmt: skip
    assert "Pattern verification failed" not in out
    return out


def nbdkit_read_all(image: Path, key: Path, out: Path) -> bytes:
    run("nbdkit", "-U", "-", "--filter=luks", "file", image, f"passphrase=+{key}", "--run",
        f'qemu-img convert -f raw "$nbd" {out}')  # fmt: skip
    return out.read_bytes()


def passphrase_opens(image: Path, key: Path) -> bool:
    r = run("cryptsetup", "open", "--test-passphrase", "--key-file", key, image, ok=False)
    return r.returncode == 0


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_bytes(b"interop passphrase")
    return path


# -- fusedisk writes, the others read ----------------------------------------------------


@needs("cryptsetup", "qemu-img")
@pytest.mark.parametrize(
    ("cipher", "key_size"),
    [("aes-xts-plain64", 512), ("aes-xts-plain64", 256), ("aes-cbc-essiv:sha256", 256)],
)
def test_fusedisk_image_reads_the_same_in_cryptsetup_qemu_and_nbdkit(
    tmp_path, key, cipher, key_size
):
    image = make_image(tmp_path / "d.img", 8 * MiB)
    data = pattern(1, 6 * MiB)
    plain = fusedisk_io(image, key, [(0, data)], format="true", cipher=f'"{cipher}"',
                        **{"key-size": str(key_size), "pbkdf2-iterations": "1000"})  # fmt: skip
    assert plain == data

    dump = run("cryptsetup", "luksDump", image).stdout
    name, mode = cipher.split("-", 1)
    assert "Version:       \t1" in dump
    assert f"Cipher name:   \t{name}" in dump and f"Cipher mode:   \t{mode}" in dump
    assert f"MK bits:       \t{key_size}" in dump
    assert passphrase_opens(image, key)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"interop passphrasf")
    assert not passphrase_opens(image, wrong)

    assert qemu_read_all(image, key, tmp_path / "qemu.raw") == data
    if cipher.startswith("aes-xts") and shutil.which("nbdkit"):  # nbdkit has no ESSIV
        assert nbdkit_read_all(image, key, tmp_path / "nbdkit.raw") == data


# -- the others make the image, data flows both ways ------------------------------------------


def both_ways(image: Path, key: Path) -> None:
    raw = image.read_bytes()
    size = len(raw) - lh.parse_header(raw[:4096], len(raw), "test").payload_bytes
    qemu_io(image, key, "write -P 0x5a 0 1M", "write -P 0xa5 3M 512k")
    mine = pattern(2, 65536 + 1000)
    plain = fusedisk_io(image, key, [(MiB + 300, mine)])
    assert len(plain) == size
    assert plain[:MiB] == b"\x5a" * MiB and plain[3 * MiB : 3 * MiB + 512 * 1024] == b"\xa5" * (
        512 * 1024
    )
    assert plain[MiB + 300 : MiB + 300 + len(mine)] == mine
    qemu_io(image, key, "read -P 0x5a 0 1M", "read -P 0xa5 3M 512k")
    assert qemu_read_all(image, key, tmp_path_of(image) / "back.raw") == plain


def tmp_path_of(image: Path) -> Path:
    return image.parent


@needs("cryptsetup", "qemu-io", "qemu-img")
@pytest.mark.parametrize(
    "options",
    [
        ["--cipher", "aes-xts-plain64", "--key-size", "256"],
        ["--cipher", "aes-xts-plain64", "--key-size", "512", "--hash", "sha512"],
        ["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"],
        ["--cipher", "aes-cbc-plain64", "--key-size", "128", "--hash", "sha1"],
    ],
    ids=["xts-256", "xts-512-sha512", "cbc-essiv", "cbc-plain64-sha1"],
)
def test_cryptsetup_image_opens_in_fusedisk(tmp_path, key, options):
    image = make_image(tmp_path / "c.img", 8 * MiB)
    run("cryptsetup", "luksFormat", "-q", "--type", "luks1", *options, *FAST,
        "--key-file", key, image)  # fmt: skip
    both_ways(image, key)


@needs("qemu-img", "qemu-io")
@pytest.mark.parametrize(
    "options",
    ["", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1"],
    ids=["default", "cbc-essiv"],
)
def test_qemu_img_image_opens_in_fusedisk(tmp_path, key, options):
    image = tmp_path / "q.luks"
    opts = f"key-secret=s0,iter-time=10{',' + options if options else ''}"
    for attempt in range(30):
        # qemu-img times PBKDF2 by the thread's CPU time; on a loaded machine it can
        # read no progress and refuse ("Unable to get accurate CPU usage"): try again.
        time.sleep(0.05 * attempt)
        made = run("qemu-img", "create", "-q", "-f", "luks", "--object",
                   f"secret,id=s0,file={key}", "-o", opts, image, "4M", ok=False)  # fmt: skip
        if "accurate CPU usage" not in made.stderr:
            break
        image.unlink(missing_ok=True)
    assert made.returncode == 0, made.stderr
    both_ways(image, key)  # QEMU's own layout: payload at 4040 sectors for a 512-bit key


@needs("nbdkit", "cryptsetup", "qemu-img")
def test_nbdkit_writes_and_fusedisk_reads(tmp_path, key):
    image = make_image(tmp_path / "n.img", 4 * MiB)
    run("cryptsetup", "luksFormat", "-q", "--type", "luks1", *FAST, "--key-file", key, image)
    src = tmp_path / "src.raw"
    src.write_bytes(pattern(3, 2 * MiB))
    run("nbdkit", "-U", "-", "--filter=luks", "file", image, f"passphrase=+{key}", "--run",
        f'qemu-img convert -n -f raw -O raw {src} "$nbd"')  # fmt: skip
    assert fusedisk_io(image, key) == src.read_bytes()


# -- key slots ---------------------------------------------------------------------


@needs("cryptsetup")
def test_key_slots_added_and_removed_by_either_are_honoured_by_the_other(tmp_path, key):
    one, two, three = key, tmp_path / "two", tmp_path / "three"
    two.write_bytes(b"second key")
    three.write_bytes(b"third key")
    image = tmp_path / "k.luks"
    assert main(["luks", "format", str(image), "--size", "1M", "--key-file", str(one),
                 "--pbkdf2-iterations", "1000"]) == 0  # fmt: skip
    assert main(["luks", "add-key", str(image), "--key-file", str(one), "--new-key-file",
                 str(two), "--pbkdf2-iterations", "1000"]) == 0  # fmt: skip
    assert passphrase_opens(image, two)  # a fusedisk slot opens in cryptsetup

    run("cryptsetup", "luksAddKey", "-q", *FAST, "--key-file", one, image, three)
    assert "Key Slot 2: ENABLED" in run("cryptsetup", "luksDump", image).stdout
    fusedisk_io(image, three)  # a cryptsetup slot opens in fusedisk

    run("cryptsetup", "luksKillSlot", "-q", "--key-file", one, image, "1")
    with pytest.raises(keyslot_crypto.WrongKey):
        fusedisk_io(image, two)  # the slot cryptsetup killed is gone for fusedisk

    assert main(["luks", "remove-key", str(image), "--key-file", str(three)]) == 0
    assert not passphrase_opens(image, three)  # the slot fusedisk removed is gone for cryptsetup
    assert passphrase_opens(image, one)
    assert "Key Slot 2: DISABLED" in run("cryptsetup", "luksDump", image).stdout
    fusedisk_io(image, one)


# -- refusals ----------------------------------------------------------------------


@needs("cryptsetup")
def test_a_cryptsetup_luks2_header_is_opened_never_formatted_over(tmp_path, key):
    """Before LUKS2 support this was refused; format = true must still leave it alone."""
    image = make_image(tmp_path / "l2.img", 32 * MiB)
    run("cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", *FAST,
        "--key-file", key, image)  # fmt: skip
    before = digest(image)
    assert len(fusedisk_io(image, key, format="true")) == 16 * MiB  # payload at 16 MiB
    assert digest(image) == before


@needs("cryptsetup")
def test_a_truncated_cryptsetup_image_is_refused(tmp_path, key):
    image = make_image(tmp_path / "t.img", 4 * MiB)
    run("cryptsetup", "luksFormat", "-q", "--type", "luks1", *FAST, "--key-file", key, image)
    with open(image, "r+b") as f:
        f.truncate(1536 * 1024)
    before = digest(image)
    with pytest.raises(OpenError, match="the device is truncated"):
        fusedisk_io(image, key)
    assert digest(image) == before
