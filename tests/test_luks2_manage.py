"""`fusedisk luks` on LUKS2, cryptsetup as the referee: format, add-key, remove-key, dump,
and crash safety of the header updates (every write cut short leaves the old or the new
key set, as cryptsetup sees it)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from fusedisk.filters.luks import luks2_manage as lm
from fusedisk.filters.luks import luks2_volume as l2
from fusedisk.filters.luks.keys import file_reader
from tests.conftest import cli, needs
from tests.test_luks2_interop import DATA, decrypt_with_cryptsetup, luks2_spec

pytestmark = [pytest.mark.timeout(180), needs("cryptsetup")]

MiB = 1 << 20
ARGON_FAST = ["--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"]
CS_FAST = ["--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"]


def opens_in_cryptsetup(image: Path, key: Path) -> bool:
    result = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(key), str(image)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode in (0, 2), result.stderr  # 2: no key slot takes the key
    return result.returncode == 0


def ok(*args: object) -> str:
    result = cli(*args, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def keys(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        path = tmp_path / f"key{i}"
        path.write_bytes(f"passphrase {i}".encode())
        paths.append(path)
    return paths


def format_v2(tmp_path: Path, key: Path, *extra: str) -> Path:
    image = tmp_path / "f2.img"
    ok("luks", "format", "--version", "2", "--size", "8M", "--key-file", key, *ARGON_FAST,
       *extra, image)  # fmt: skip
    return image


@pytest.mark.parametrize(
    "extra", [(), ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "512")]
)
def test_formatted_images_pass_cryptsetup_and_decrypt_there(tmp_path, keys, extra):
    image = format_v2(tmp_path, keys[0], *extra)
    dump = subprocess.run(["cryptsetup", "luksDump", image], capture_output=True, text=True)
    assert dump.returncode == 0 and "Version:       \t2" in dump.stdout, dump.stderr
    assert opens_in_cryptsetup(image, keys[0]) and not opens_in_cryptsetup(image, keys[1])
    if shutil.which("losetup") is None:
        return
    # data written by fusedisk decrypts in cryptsetup (payload at 16 MiB, 8 MiB of it)
    q = random.Random(5).randbytes(DATA)
    spec = tmp_path / "s.toml"
    key_file = tmp_path / "key"
    key_file.write_bytes(keys[0].read_bytes())
    spec.write_text(luks2_spec(image, key_file))
    ok("check", spec)  # opens and unlocks
    trio.run(_write_plaintext, image, key_file, q)
    assert decrypt_with_cryptsetup(tmp_path, image) == q


async def _write_plaintext(image: Path, key: Path, data: bytes) -> None:
    from fusedisk.graph.graph import Graph
    from fusedisk.spec import parse_spec

    graph = await Graph.open(parse_spec(luks2_spec(image, key), image.parent / "w.toml"))
    try:
        await graph.disks["vm0"].write(0, data)
        await graph.disks["vm0"].flush()
    finally:
        await graph.close()


def test_keys_added_by_either_tool_open_in_the_other(tmp_path, keys):
    image = format_v2(tmp_path, keys[0])
    ok("luks", "add-key", "--key-file", keys[0], "--new-key-file", keys[1],
       "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", image)  # fmt: skip
    assert opens_in_cryptsetup(image, keys[1])
    subprocess.run(
        ["cryptsetup", "luksAddKey", "-q", "--key-file", keys[0], *CS_FAST, image, keys[2]],
        check=True, capture_output=True,
    )  # fmt: skip
    spec = tmp_path / "s.toml"
    spec.write_text(luks2_spec(image, keys[2]))
    ok("check", spec)
    dump = ok("luks", "dump", image)
    assert "keyslots: {'0'" in dump and "'2'" in dump and "seqid:" in dump
    ok("luks", "remove-key", "--key-file", keys[1], image)
    assert not opens_in_cryptsetup(image, keys[1]) and opens_in_cryptsetup(image, keys[2])
    result = cli("luks", "remove-key", "--key-file", keys[1], image)
    assert result.returncode != 0 and "wrong key" in result.stderr


class Cut(Exception):
    pass


def _cut_writer(path: Path, after: int):
    """Writes to `path` that stop (a crash) after `after` of them."""
    done = 0

    async def write(offset: int, data: bytes) -> None:
        nonlocal done
        if done >= after:
            raise Cut
        with open(path, "r+b") as f:
            os.pwrite(f.fileno(), data, offset)
            os.fsync(f.fileno())
        done += 1

    return write


async def _update(image: Path, old: bytes, new: bytes | None, after: int) -> None:
    read, size = file_reader(str(image), "test")
    volume = await l2.load(read, size, size, "test")
    _, key = await l2.unlock(read, volume, old, "test")
    write = _cut_writer(image, after)
    try:
        if new is None:
            await lm.remove_key(write, volume, 1, "test")
        else:
            kdf = lm.KdfChoice(type="pbkdf2", iterations=1000)
            await lm.add_key(write, volume, key, new, "test", kdf=kdf)
    except Cut:
        pass


@pytest.mark.parametrize("after", [0, 1, 2])
def test_a_crash_during_add_key_leaves_the_old_or_the_new_key_set(tmp_path, keys, after):
    """add-key writes: the key material, the secondary copy, the primary copy.  Cut after
    each, cryptsetup sees one whole key set (the secondary wins once written: newer)."""
    image = format_v2(tmp_path, keys[0])
    trio.run(_update, image, keys[0].read_bytes(), keys[1].read_bytes(), after)
    assert opens_in_cryptsetup(image, keys[0])
    assert opens_in_cryptsetup(image, keys[1]) == (after >= 2)


@pytest.mark.parametrize("after", [0, 1, 2])
def test_a_crash_during_remove_key_leaves_the_old_or_the_new_key_set(tmp_path, keys, after):
    """remove-key writes: the secondary copy, the primary copy, then wipes the area."""
    image = format_v2(tmp_path, keys[0])
    trio.run(_update, image, keys[0].read_bytes(), keys[1].read_bytes(), 3)  # slot 1
    trio.run(_update, image, keys[0].read_bytes(), None, after)
    assert opens_in_cryptsetup(image, keys[0])
    assert opens_in_cryptsetup(image, keys[1]) == (after == 0)


def test_info_shows_the_luks2_fields(tmp_path, keys):
    image = format_v2(tmp_path, keys[0], "--sector-size", "512", "--label", "vm0")
    info = json.loads(ok("info", "--json", image))
    data = info["format-specific"]["data"]
    assert info["format"] == "luks" and info["encrypted"] and info["virtual-size"] == 8 * MiB
    assert data["version"] == 2 and data["sector-size"] == 512 and data["label"] == "vm0"
    assert data["cipher-alg"] == "aes-256" and data["cipher-mode"] == "xts"
    assert data["slots"][0]["kdf"] == "argon2id" and data["slots"][0]["memory"] == 32
    assert "salt" not in json.dumps(info)  # nothing secret-adjacent either


def test_sigkill_during_add_key_leaves_the_old_or_the_new_key_set(tmp_path, keys):
    """A real `fusedisk luks add-key` killed at spread moments: cryptsetup then opens the
    image with the old key always, with the new one only if the update got that far."""
    image = format_v2(tmp_path, keys[0])
    outcomes = set()
    for delay in (0.2, 0.5, 0.8, 1.1, 1.4, 2.0):
        proc = subprocess.Popen(
            [sys.executable, "-m", "fusedisk", "luks", "add-key", "--key-file", keys[0],
             "--new-key-file", keys[1], "--key-slot", "5", "--pbkdf", "pbkdf2",
             "--pbkdf-force-iterations", "1000", image],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=30)
        assert opens_in_cryptsetup(image, keys[0])
        added = opens_in_cryptsetup(image, keys[1])
        outcomes.add(added)
        if added:  # undo, for the next round
            ok("luks", "remove-key", "--key-slot", "5", "--force", image)
    assert opens_in_cryptsetup(image, keys[0])


def test_a_damaged_primary_is_repaired_by_the_next_header_write(tmp_path, keys):
    from tests import luks2_craft as craft

    image = format_v2(tmp_path, keys[0])
    craft.damage(image, 4096 + 50)  # the primary's JSON
    ok("luks", "add-key", "--key-file", keys[0], "--new-key-file", keys[1],
       "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", image)  # fmt: skip
    primary, meta1 = craft.read_copy(image, "primary")  # raises if still damaged
    secondary, meta2 = craft.read_copy(image, "secondary")
    assert primary.seqid == secondary.seqid and meta1 == meta2 and "1" in meta1["keyslots"]
    assert opens_in_cryptsetup(image, keys[1])
