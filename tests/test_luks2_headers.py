"""LUKS2 headers that are damaged, crafted or carry what fusedisk refuses.

Damaged copies (the other serves; both: a clear error), the newer copy by seqid, a
100+-case crafted battery (no traceback, no hang, bounded memory), and refusals of
real cryptsetup states: a re-encryption initialised, a token needing a plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from fusedisk.errors import CorruptImage, OpenError
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests import luks2_craft as craft
from tests.conftest import needs
from tests.luks2_battery import SPEC

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def open_and_read(image: Path, key_bytes: bytes = craft.PASSPHRASE, write: bytes = b"") -> dict:
    key = image.parent / "key"
    key.write_bytes(key_bytes)

    async def run() -> dict:
        spec = parse_spec(SPEC.format(image=image, key=key), image.parent / "s.toml")
        graph = await Graph.open(spec)
        try:
            disk = graph.disks["vm0"]
            if write:
                await disk.write(0, write)
            data = await disk.read(0, 4096)
            return {"data": data, **graph.nodes["crypt"].driver_stats()}
        finally:
            await graph.close()

    return trio.run(run)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return craft.make_image(tmp_path / "l2.img")


def test_a_damaged_primary_is_served_by_the_secondary(image):
    open_and_read(image, write=b"A" * 4096)
    craft.damage(image, 4096 + 100)  # the primary's JSON: its checksum no longer matches
    stats = open_and_read(image)
    assert stats["data"] == b"A" * 4096
    assert stats["header-copy"] == "secondary"
    assert "checksum does not match" in stats["other-copy-problem"]


def test_a_damaged_secondary_leaves_the_primary_in_use(image):
    craft.damage(image, 16384 + 10)
    stats = open_and_read(image)
    assert stats["header-copy"] == "primary" and "at byte 16384" in stats["other-copy-problem"]


def test_both_copies_damaged_is_a_clear_error(image):
    craft.damage(image, 5000)
    craft.damage(image, 16384 + 5000)
    with pytest.raises(CorruptImage, match=r"node 'crypt': damaged LUKS2 header: both copies"):
        open_and_read(image)


def test_the_copy_with_the_higher_seqid_wins(image):
    """A crash between the two copies' writes: the secondary holds the newer metadata."""
    binary, meta = craft.read_copy(image, "secondary")
    meta["segments"]["0"]["iv_tweak"] = "8"
    secondary = bytearray(
        binary.__class__(**{**binary.__dict__, "seqid": binary.seqid + 1}).pack(
            json.dumps(meta).encode()
        )
    )
    with open(image, "r+b") as f:
        os.pwrite(f.fileno(), bytes(secondary), 16384)
    stats = open_and_read(image)
    assert stats["header-copy"] == "secondary" and stats["iv-tweak"] == 8
    assert "older" in stats["other-copy-problem"]


def test_argon2_memory_past_the_cap_is_refused_before_any_allocation(image):
    def change(meta):
        meta["keyslots"]["0"]["kdf"] = {
            "type": "argon2id", "time": 4, "memory": (4 << 20) + 1, "cpus": 4, "salt": "A" * 44,
        }  # fmt: skip

    craft.rewrite(image, change)
    with pytest.raises(CorruptImage, match=r"node 'crypt'.*past the 4194304 KiB \(4 GiB\)"):
        open_and_read(image)


def test_an_unknown_requirement_and_an_integrity_segment_are_refused(image):
    craft.rewrite(image, lambda m: m["config"].update(requirements={"mandatory": ["new-thing"]}))
    with pytest.raises(OpenError, match="requirement 'new-thing', which fusedisk does not know"):
        open_and_read(image)
    craft.rewrite(image, lambda m: m["config"].pop("requirements"))
    craft.rewrite(image, lambda m: m["segments"]["0"].update(integrity={"type": "hmac(sha256)"}))
    with pytest.raises(OpenError, match="integrity protection"):
        open_and_read(image)


@pytest.mark.timeout(240)
def test_a_battery_of_crafted_headers_is_refused_cleanly(tmp_path):
    """Each case opens a luks node over a bent header and reads: a sentence naming the
    node or the data, never a traceback; the whole battery in bounded time and memory
    (a 3 GB address-space limit: an Argon2 of 4 GiB could not even start)."""
    proc = subprocess.run(
        ["prlimit", "--as=3000000000", sys.executable, "-m", "tests.luks2_battery", tmp_path],
        capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    results, peak = lines[:-1], lines[-1]["peak_rss_kib"]
    assert len(results) >= 100
    crashes = [r for r in results if r["outcome"] == "crash"]
    assert not crashes, crashes[0]["message"]
    for r in results:
        if r["outcome"] == "refused":
            assert r["message"].startswith("node 'crypt': "), r
    assert sum(r["outcome"] == "refused" for r in results) >= 95
    assert peak < 600 << 10, f"peak RSS {peak} KiB"


@needs("cryptsetup")
def test_a_reencryption_initialised_by_cryptsetup_is_refused(image, tmp_path):
    key = tmp_path / "k"
    key.write_bytes(craft.PASSPHRASE)
    subprocess.run(
        ["cryptsetup", "reencrypt", "--init-only", "-q", "--key-file", key,
         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", image],
        check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(OpenError, match=r"node 'crypt': .*online re-encryption is in progress"):
        open_and_read(image)


@needs("cryptsetup")
def test_a_plugin_token_is_named_when_the_passphrase_fails(image, tmp_path):
    token = tmp_path / "token.json"
    token.write_text('{"type": "clevis", "keyslots": ["0"], "jwe": {}}')
    subprocess.run(
        ["cryptsetup", "token", "import", "--json-file", token, image],
        check=True, capture_output=True,
    )  # fmt: skip
    assert open_and_read(image)["tokens"] == ["clevis"]  # the passphrase still opens it
    with pytest.raises(OpenError, match=r"token 0 \(clevis\) needs a cryptsetup token plugin"):
        open_and_read(image, b"wrong")


def test_an_argon2_cost_the_daemon_cannot_afford_is_a_clear_error(image, tmp_path):
    """Within cryptsetup's caps (2 GiB here) but past what the process may allocate (a
    1.5 GB address-space limit, as a MemoryMax= would be): a sentence, not a crash."""

    def change(meta):
        meta["keyslots"]["0"]["kdf"] = {
            "type": "argon2id", "time": 1, "memory": 2 << 20, "cpus": 1, "salt": "A" * 44,
        }  # fmt: skip

    craft.rewrite(image, change)
    key = tmp_path / "key"
    key.write_bytes(craft.PASSPHRASE)
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(image=image, key=key))
    proc = subprocess.run(
        ["prlimit", "--as=1500000000", sys.executable, "-m", "fusedisk", "check", spec],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "node 'crypt': keyslot 0: not enough memory for its Argon2 cost" in proc.stderr
