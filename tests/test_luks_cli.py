"""`fusedisk luks format|add-key|remove-key|dump` on image files and on nodes of a spec."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from fusedisk.cli import main
from fusedisk.filters.luks import luks1_header as lh
from fusedisk.filters.luks import luks1_keyslot
from fusedisk.graph.graph import Graph
from fusedisk.graph.registry import drivers
from fusedisk.spec import load_spec
from tests.conftest import make_image

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
FAST = ["--pbkdf2-iterations", "1000"]


def luks(*args: str) -> int:
    return main(["luks", *map(str, args)])


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("one", "two", "three"):
        out[name] = tmp_path / f"{name}.key"
        out[name].write_bytes(f"passphrase {name}".encode())
    return out


def header(image: Path) -> lh.LuksHeader:
    raw = image.read_bytes()
    return lh.parse_header(raw[:4096], len(raw), "test")


def opens(image: Path, key: Path) -> int | None:
    """The key slot `key` opens, or None."""
    raw = image.read_bytes()
    hdr = lh.parse_header(raw[:4096], len(raw), "test")
    for i in hdr.active_slots():
        slot = hdr.slots[i]
        start = slot.key_offset * 512
        material = raw[start : start + hdr.material_size(slot)]
        if luks1_keyslot.open_key_slot(hdr, i, key.read_bytes(), material) is not None:
            return i
    return None


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_format_creates_an_image_and_dump_shows_it(tmp_path, keys, capsys):
    image = tmp_path / "new.luks"
    assert luks("format", image, "--size", "4M", "--key-file", keys["one"], *FAST) == 0
    assert image.stat().st_size == 2 * MiB + 4 * MiB
    assert "payload at byte 2097152" in capsys.readouterr().out
    assert luks("dump", image) == 0
    out = capsys.readouterr().out
    assert "Cipher name:   \taes" in out and "MK bits:       \t512" in out
    assert "Key Slot 0: ENABLED" in out and "Iterations:         \t1000" in out
    assert opens(image, keys["one"]) == 0


def test_format_options_choose_cipher_key_size_and_hash(tmp_path, keys):
    image = make_image(tmp_path / "d.img", 4 * MiB)
    luks("format", image, "--key-file", keys["one"], "--cipher", "aes-cbc-essiv:sha256",
         "--key-size", "256", "--hash", "sha1", *FAST)  # fmt: skip
    hdr = header(image)
    assert (hdr.cipher, hdr.key_bytes, hdr.hash_spec) == ("aes-cbc-essiv:sha256", 32, "sha1")
    assert opens(image, keys["one"]) == 0


def test_format_refuses_data_or_a_header_without_force(tmp_path, keys, capsys):
    image = make_image(tmp_path / "d.img", 4 * MiB, b"data")
    before = digest(image)
    assert luks("format", image, "--key-file", keys["one"], *FAST) == 1
    assert "not all zeroes" in capsys.readouterr().err
    assert digest(image) == before
    assert luks("format", image, "--key-file", keys["one"], "--force", *FAST) == 0
    before = digest(image)
    assert luks("format", image, "--key-file", keys["two"], *FAST) == 1
    assert "already holds a LUKS1 header" in capsys.readouterr().err
    assert digest(image) == before


def test_add_and_remove_keys(tmp_path, keys, capsys):
    image = tmp_path / "d.luks"
    luks("format", image, "--size", "1M", "--key-file", keys["one"], *FAST)
    assert luks("add-key", image, "--key-file", keys["one"], "--new-key-file", keys["two"],
                *FAST) == 0  # fmt: skip
    assert "key slot 1 added" in capsys.readouterr().out
    assert opens(image, keys["two"]) == 1
    # A wrong existing key adds nothing.
    before = digest(image)
    assert luks("add-key", image, "--key-file", keys["three"], "--new-key-file", keys["three"],
                *FAST) == 1  # fmt: skip
    assert "wrong key" in capsys.readouterr().err
    assert digest(image) == before
    # Into a chosen slot.
    assert luks("add-key", image, "--key-file", keys["two"], "--new-key-file", keys["three"],
                "--key-slot", "5", *FAST) == 0  # fmt: skip
    assert header(image).active_slots() == [0, 1, 5]
    # remove-key KEY removes the slot that key opens.
    assert luks("remove-key", image, "--key-file", keys["one"]) == 0
    assert header(image).active_slots() == [1, 5]
    assert opens(image, keys["one"]) is None
    # --key-slot N with the key of another slot (luksKillSlot).
    assert luks("remove-key", image, "--key-slot", "5", "--key-file", keys["two"]) == 0
    assert header(image).active_slots() == [1]
    # The last slot stays unless forced.
    assert luks("remove-key", image, "--key-file", keys["two"]) == 1
    assert "is the last one" in capsys.readouterr().err
    assert luks("remove-key", image, "--key-slot", "1", "--force") == 0
    assert header(image).active_slots() == []


def test_removed_key_material_is_overwritten(tmp_path, keys):
    image = tmp_path / "d.luks"
    luks("format", image, "--size", "1M", "--key-file", keys["one"], *FAST)
    luks("add-key", image, "--key-file", keys["one"], "--new-key-file", keys["two"], *FAST)
    slot = header(image).slots[1]
    start, size = slot.key_offset * 512, header(image).material_size(slot)
    old = image.read_bytes()[start : start + size]
    luks("remove-key", image, "--key-file", keys["two"])
    new = image.read_bytes()[start : start + size]
    assert new != old and new != bytes(size)
    hdr = header(image)
    assert hdr.slots[1].iterations == 0 and hdr.slots[1].salt == bytes(32)


def test_passphrase_env_and_missing_key_errors(tmp_path, keys, monkeypatch, capsys):
    image = tmp_path / "d.luks"
    monkeypatch.setenv("FD_PASS", "from the environment")
    assert luks("format", image, "--size", "1M", "--passphrase-env", "FD_PASS", *FAST) == 0
    (tmp_path / "env.key").write_bytes(b"from the environment")
    assert opens(image, tmp_path / "env.key") == 0
    # stdin is not a terminal under pytest: no prompt, a clear error
    assert luks("add-key", image, "--passphrase-env", "FD_PASS", *FAST) == 1
    assert "standard input is not a terminal" in capsys.readouterr().err
    assert luks("dump") == 1
    assert "give either an image file or --spec" in capsys.readouterr().err
    assert luks("format", image, "--key-file", keys["one"], "--pbkdf2-iterations", "10") == 1
    assert "at least 1000" in capsys.readouterr().err


def test_remove_key_refuses_a_key_of_the_same_slot_and_wrong_keys(tmp_path, keys, capsys):
    image = tmp_path / "d.luks"
    luks("format", image, "--size", "1M", "--key-file", keys["one"], *FAST)
    luks("add-key", image, "--key-file", keys["one"], "--new-key-file", keys["two"], *FAST)
    before = digest(image)
    assert luks("remove-key", image, "--key-slot", "1", "--key-file", keys["two"]) == 1
    assert "opens slot 1 itself" in capsys.readouterr().err
    assert luks("remove-key", image, "--key-file", keys["three"]) == 1
    assert "wrong key" in capsys.readouterr().err
    assert luks("remove-key", image, "--key-slot", "4", "--key-file", keys["one"]) == 1
    assert "key slot 4 is not in use" in capsys.readouterr().err
    assert digest(image) == before


@pytest.mark.skipif("qcow2" not in drivers(), reason="no qcow2 driver yet")
def test_spec_node_over_qcow2_is_managed_in_place(tmp_path, keys, capsys):
    from fusedisk.formats.qcow2.create import create_qcow2

    create_qcow2(tmp_path / "d0.qcow2", 8 * MiB)
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f"""
[nodes.crypt]
driver = "luks"
file = {{ driver = "qcow2", filename = "d0.qcow2" }}
key-file = "{keys["one"]}"
[disks.vm0]
node = "crypt"
"""
    )
    target = ["--spec", spec, "--node", "crypt"]
    assert luks("format", *target, *FAST) == 0  # the node's key-file is the default
    assert luks("add-key", *target, "--new-key-file", keys["two"], *FAST) == 0
    assert luks("dump", *target) == 0
    assert "Key Slot 1: ENABLED" in capsys.readouterr().out
    spec.write_text(spec.read_text().replace(str(keys["one"]), str(keys["two"])))

    async def opened() -> int:
        graph = await Graph.open(load_spec(spec))
        try:
            return int(graph.nodes["crypt"].driver_stats()["unlocked_key_slot"])
        finally:
            await graph.close()

    assert trio.run(opened) == 1
    assert luks("dump", "--spec", spec, "--node", "nope") == 1
    assert "no luks node named 'nope'" in capsys.readouterr().err
