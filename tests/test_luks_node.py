"""The `luks` node through Graph and Disk: formatting, data, keys, errors, snapshots."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from fusedisk.errors import CorruptImage, OpenError, ReadOnly
from fusedisk.filters.luks import keyslot_crypto
from fusedisk.filters.luks import node as luks_driver
from fusedisk.graph.extents import Status
from fusedisk.graph.graph import Graph
from fusedisk.graph.registry import drivers
from fusedisk.spec import parse_spec
from tests.conftest import make_image

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
PASSPHRASE = b"correct horse battery"
PAYLOAD = 2 * MiB  # fusedisk's and cryptsetup's payload offset


def luks_spec(child: str = 'file = { driver = "file", filename = "d0.img" }', **options) -> str:
    opts = {"key-file": '"key"', "pbkdf2-iterations": "1000", **options}
    lines = "\n".join(f"{k} = {v}" for k, v in opts.items() if v is not None)
    return f'[nodes.crypt]\ndriver = "luks"\n{child}\n{lines}\n[disks.vm0]\nnode = "crypt"\n'


async def open_graph(tmp_path: Path, text: str) -> Graph:
    return await Graph.open(parse_spec(text, tmp_path / "spec.toml"))


@pytest.fixture
def blank(tmp_path: Path) -> Path:
    (tmp_path / "key").write_bytes(PASSPHRASE)
    return make_image(tmp_path / "d0.img", 8 * MiB)


async def formatted(tmp_path: Path) -> Path:
    """d0.img with a LUKS1 header (format = true on first open), then closed."""
    graph = await open_graph(tmp_path, luks_spec(format="true"))
    await graph.close()
    return tmp_path / "d0.img"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def test_format_on_a_blank_child_then_data_round_trips(tmp_path, blank):
    graph = await open_graph(tmp_path, luks_spec(format="true"))
    try:
        disk = graph.disks["vm0"]
        node = graph.nodes["crypt"]
        assert disk.size == 8 * MiB - PAYLOAD
        assert node.request_alignment == 512
        stats = node.driver_stats()
        assert stats["cipher"] == "aes-xts-plain64" and stats["key_bits"] == 512
        assert stats["formatted_at_open"] and stats["active_key_slots"] == [0]
        data = pattern(1, MiB + 4096)
        await disk.write(12345, data)  # unaligned: the edge pads to 512
        await disk.write(disk.size - 3, b"end")
        assert await disk.read(12345, len(data)) == data
        uuid = node.header.uuid
    finally:
        await graph.close()
    raw = blank.read_bytes()
    assert raw[:6] == b"LUKS\xba\xbe"
    assert data[:4096] not in raw  # only ciphertext reaches the child

    graph = await open_graph(tmp_path, luks_spec(format="true"))  # no-op: a header exists
    try:
        disk = graph.disks["vm0"]
        assert graph.nodes["crypt"].header.uuid == uuid
        assert not graph.nodes["crypt"].driver_stats()["formatted_at_open"]
        assert await disk.read(12345, len(data)) == data
        assert await disk.read(disk.size - 3, 3) == b"end"
    finally:
        await graph.close()


async def read_in_small_requests(tmp_path: Path, length: int, **options) -> bytes:
    """The disk's first `length` bytes, read by a fresh graph in requests done inline."""
    graph = await open_graph(tmp_path, luks_spec(**options))
    try:
        disk = graph.disks["vm0"]
        return b"".join(
            [await disk.read(o, min(64 << 10, length - o)) for o in range(0, length, 64 << 10)]
        )
    finally:
        await graph.close()


@pytest.mark.parametrize("cipher", ["aes-xts-plain64", "aes-cbc-essiv:sha256"])
@pytest.mark.parametrize("pieces", [False, True])
async def test_large_requests_on_worker_threads_give_the_same_bytes(
    tmp_path, blank, monkeypatch, cipher, pieces
):
    size = "256" if "cbc" in cipher else "512"
    graph = await open_graph(
        tmp_path, luks_spec(format="true", cipher=f'"{cipher}"', **{"key-size": size})
    )
    await graph.close()
    data = pattern(2, 3 * MiB)
    graph = await open_graph(tmp_path, luks_spec())
    try:
        await graph.disks["vm0"].write(0, data)
    finally:
        await graph.close()
    monkeypatch.setattr(luks_driver, "THREAD_MIN_BYTES", 4096)
    if pieces:  # three workers, pieces of any size: an odd sector count splits unevenly
        monkeypatch.setattr(luks_driver, "PIECE_MIN_BYTES", 512)
        monkeypatch.setattr(os, "cpu_count", lambda: 3)
    else:
        monkeypatch.setattr(luks_driver, "PIECE_MIN_BYTES", 1 << 40)
    graph = await open_graph(tmp_path, luks_spec())
    odd = data[: MiB + 5 * 512]  # 2053 sectors
    try:
        disk = graph.disks["vm0"]
        assert await disk.read(0, len(data)) == data
        await disk.write(3 * 512, odd)
        stats = graph.nodes["crypt"].driver_stats()
        assert stats["threaded_requests"] >= 2
        assert (stats["split_requests"] >= 2) == pieces
    finally:
        await graph.close()
    monkeypatch.undo()
    expected = data[: 3 * 512] + odd + data[3 * 512 + len(odd) :]
    assert await read_in_small_requests(tmp_path, len(data)) == expected


async def test_write_zeroes_writes_encrypted_zeroes(tmp_path, blank):
    await formatted(tmp_path)
    graph = await open_graph(tmp_path, luks_spec())
    try:
        root = graph.disks["vm0"].root
        await root.write(0, pattern(3, 3 * MiB))
        await root.write_zeroes(1000, 2 * MiB + 100, unmap=True)
        back = await root.read(0, 3 * MiB)
        assert back[1000 : 2 * MiB + 1100] == bytes(2 * MiB + 100)
        assert back[:1000] == pattern(3, 3 * MiB)[:1000]
    finally:
        await graph.close()
    assert blank.read_bytes()[PAYLOAD + 4096 : PAYLOAD + 8192] != bytes(4096)


async def test_discards_are_dropped_unless_unmap_is_asked(tmp_path, blank):
    await formatted(tmp_path)
    data = pattern(4, MiB)
    graph = await open_graph(tmp_path, luks_spec())
    try:
        root = graph.disks["vm0"].root
        await root.write(0, data)
        await root.discard(0, MiB)
        assert await root.read(0, MiB) == data
    finally:
        await graph.close()
    graph = await open_graph(tmp_path, luks_spec(discard='"unmap"'))
    try:
        root = graph.disks["vm0"].root
        await root.discard(0, MiB)
        await root.flush()
        assert blank.read_bytes()[PAYLOAD : PAYLOAD + MiB] == bytes(MiB)  # the child punched it
        assert await root.read(0, 4096) != data[:4096]
    finally:
        await graph.close()


async def test_block_status_reports_data_everywhere(tmp_path, blank):
    await formatted(tmp_path)
    graph = await open_graph(tmp_path, luks_spec())
    try:
        extents = await graph.disks["vm0"].root.block_status(0, 6 * MiB)
        assert sum(e.length for e in extents) == 6 * MiB
        assert extents[0].offset == 0
        assert all(e.status & Status.DATA and not e.status & Status.ZERO for e in extents)
    finally:
        await graph.close()


async def test_truncate_grows_the_child(tmp_path, blank):
    await formatted(tmp_path)
    graph = await open_graph(tmp_path, luks_spec())
    try:
        root = graph.disks["vm0"].root
        await root.truncate(10 * MiB)
        assert graph.nodes["crypt"].size == 10 * MiB
        await root.write(10 * MiB - 512, b"x" * 512)
        assert await root.read(10 * MiB - 512, 512) == b"x" * 512
    finally:
        await graph.close()
    assert blank.stat().st_size == PAYLOAD + 10 * MiB


async def test_passphrase_from_the_environment(tmp_path, blank, monkeypatch):
    await formatted(tmp_path)
    monkeypatch.setenv("FUSEDISK_TEST_PASS", PASSPHRASE.decode())
    graph = await open_graph(
        tmp_path, luks_spec(**{"key-file": None, "passphrase-env": '"FUSEDISK_TEST_PASS"'})
    )
    try:
        assert graph.disks["vm0"].size == 6 * MiB
        assert graph.nodes["crypt"].option_values()["passphrase-env"] == "FUSEDISK_TEST_PASS"
    finally:
        await graph.close()


async def test_secrets_never_show(tmp_path, blank):
    await formatted(tmp_path)
    graph = await open_graph(tmp_path, luks_spec())
    try:
        node = graph.nodes["crypt"]
        shown = " ".join(
            [
                *node.option_values().values(),
                node.controls()["header"].read(),
                str(node.driver_stats()),
            ]
        )
        assert PASSPHRASE.decode() not in shown
        assert "Key Slot 0: ENABLED" in shown
        assert not any(isinstance(v, bytes) for v in vars(node).values())
    finally:
        await graph.close()


async def test_read_only_node_reads_and_refuses_writes(tmp_path, blank):
    await formatted(tmp_path)
    before = digest(blank)
    graph = await open_graph(tmp_path, luks_spec(**{"read-only": "true"}))
    try:
        root = graph.disks["vm0"].root
        assert len(await root.read(0, 4096)) == 4096
        with pytest.raises(ReadOnly):
            await root.write(0, bytes(512))
    finally:
        await graph.close()
    assert digest(blank) == before


# -- refusals: nothing is written -------------------------------------------------------


async def expect_refusal(tmp_path: Path, image: Path, text: str, error, message: str) -> None:
    before = digest(image)
    with pytest.raises(error, match=message) as info:
        await open_graph(tmp_path, text)
    assert digest(image) == before
    assert PASSPHRASE.decode() not in str(info.value)
    assert str(info.value).startswith("node 'crypt': ")


async def test_wrong_key_refuses_to_open(tmp_path, blank):
    await formatted(tmp_path)
    (tmp_path / "wrong").write_bytes(PASSPHRASE + b"\n")  # a newline matters
    await expect_refusal(
        tmp_path,
        blank,
        luks_spec(**{"key-file": '"wrong"'}),
        keyslot_crypto.WrongKey,
        r"wrong key: no key slot accepts it \(1 active slot\(s\) tried\)",
    )


async def test_a_child_without_header_is_not_formatted_unless_asked(tmp_path, blank):
    await expect_refusal(
        tmp_path, blank, luks_spec(), OpenError, "holds no LUKS header .* set format = true"
    )


async def test_format_refuses_a_child_holding_data(tmp_path, blank):
    with open(blank, "r+b") as f:
        f.seek(700 * 1024)
        f.write(b"\x01")
    await expect_refusal(
        tmp_path,
        blank,
        luks_spec(format="true"),
        OpenError,
        "refusing to format: the first MiB of the device is not all zeroes",
    )


async def test_a_bare_luks2_magic_is_a_damaged_luks2_header(tmp_path, blank):
    """Before LUKS2 support: "LUKS2 is not supported"; now both copies are looked at."""
    with open(blank, "r+b") as f:
        f.write(b"LUKS\xba\xbe\x00\x02" + bytes(4088))
    await expect_refusal(
        tmp_path, blank, luks_spec(format="true"), CorruptImage,
        "damaged LUKS2 header: both copies are unusable",
    )  # fmt: skip


async def test_damaged_header_is_named(tmp_path, blank):
    await formatted(tmp_path)
    with open(blank, "r+b") as f:
        f.seek(208)  # key slot 0's state
        f.write(b"\xff\xff\xff\xff")
    await expect_refusal(
        tmp_path, blank, luks_spec(), CorruptImage, "damaged LUKS header: key slot 0 has an unknown"
    )


async def test_truncated_device_is_named(tmp_path, blank):
    await formatted(tmp_path)
    os.truncate(blank, MiB)
    await expect_refusal(
        tmp_path, blank, luks_spec(), CorruptImage, "the device is truncated: .* holds only 1048576"
    )


async def test_a_too_small_child_is_not_formatted(tmp_path, blank):
    os.truncate(blank, MiB)
    await expect_refusal(
        tmp_path, blank, luks_spec(format="true"), OpenError, "too small for a LUKS1 header"
    )


async def test_key_source_errors(tmp_path, blank, monkeypatch):
    await formatted(tmp_path)
    monkeypatch.delenv("FUSEDISK_NO_SUCH_VAR", raising=False)
    cases = [
        ({"passphrase-env": '"X"'}, "give either 'key-file' or 'passphrase-env', not both"),
        ({"key-file": '"missing"'}, "option 'key-file': cannot read .*missing': No such file"),
        (
            {"key-file": None, "passphrase-env": '"FUSEDISK_NO_SUCH_VAR"'},
            "option 'passphrase-env': environment variable 'FUSEDISK_NO_SUCH_VAR' is not set",
        ),
        ({"key-file": None}, "no key given: .*standard input is not a terminal"),
    ]
    (tmp_path / "empty").write_bytes(b"")
    cases.append(({"key-file": '"empty"'}, "'key-file': .*empty' is empty"))
    for options, message in cases:
        await expect_refusal(tmp_path, blank, luks_spec(**options), OpenError, message)


async def test_read_only_child_cannot_be_formatted(tmp_path, blank):
    await expect_refusal(
        tmp_path,
        blank,
        luks_spec(
            child='file = { driver = "file", filename = "d0.img", read-only = true }',
            format="true",
        ),
        OpenError,
        "cannot format a read-only node",
    )


# -- over other nodes: qcow2, snapshots ------------------------------------------------------

needs_qcow2 = pytest.mark.skipif("qcow2" not in drivers(), reason="no qcow2 driver yet")


@needs_qcow2
async def test_luks_over_qcow2_and_a_snapshot_passes_below_it(tmp_path, blank):
    from fusedisk.formats.qcow2.create import create_qcow2
    from fusedisk.graph.snapshot import take_snapshot

    create_qcow2(tmp_path / "d0.qcow2", 16 * MiB)
    text = luks_spec(child='file = { driver = "qcow2", filename = "d0.qcow2" }', format="true")
    first = pattern(5, MiB)
    graph = await open_graph(tmp_path, text)
    try:
        disk = graph.disks["vm0"]
        assert disk.size == 14 * MiB
        await disk.write(0, first)
        await take_snapshot(graph, disk, disk.root, "s1")
        assert disk.top is graph.nodes["crypt"]  # luks stays on top
        below = graph.nodes["crypt"].children["file"].node
        assert below.driver == "qcow2" and below.name != "crypt.file"
        await disk.write(MiB, first)
        assert await disk.read(0, 2 * MiB) == first * 2
    finally:
        await graph.close()
    overlay = tmp_path / "d0.s1.qcow2"
    assert overlay.exists() and first[:4096] not in overlay.read_bytes()  # ciphertext only
    graph = await open_graph(tmp_path, text)  # the snapshot is replayed on open
    try:
        assert await graph.disks["vm0"].read(0, 2 * MiB) == first * 2
    finally:
        await graph.close()
