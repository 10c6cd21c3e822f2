"""`fusedisk info` beside `qemu-img info`: the same fields, the same values.

Images are made by qemu-img (qcow2 with a backing chain, internal snapshots,
zstd, extended L2, lazy refcounts; LUKS; raw) and by `fusedisk dedup create`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs, run

pytestmark = [needs("qemu-img"), pytest.mark.timeout(60)]


def fusedisk(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusedisk", *map(str, args)], capture_output=True, text=True
    )


def info(*args: object) -> Any:
    result = fusedisk("info", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def qemu_info(*args: object) -> Any:
    return json.loads(run("qemu-img", "info", "--output=json", *args))


def same_fields(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Every field qemu-img shows, equal in ours (snapshot times aside)."""
    for key, value in theirs.items():
        if key == "snapshots":
            assert [(s["id"], s["name"], s["vm-state-size"]) for s in ours[key]] == [
                (s["id"], s["name"], s["vm-state-size"]) for s in value]  # fmt: skip
        else:
            assert ours.get(key) == value, (key, ours.get(key), value)


def test_qcow2_backing_chain_and_snapshots(tmp_path: Path) -> None:
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", base, "64M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        "compression_type=zstd,extended_l2=on,cluster_size=128k,lazy_refcounts=on",
        "-b", "base.qcow2", "-F", "qcow2", mid)  # fmt: skip
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    run("qemu-img", "snapshot", "-c", "before-upgrade", top)
    run("qemu-img", "snapshot", "-c", "second", top)
    ours = info("--backing-chain", top)
    theirs = qemu_info("--backing-chain", top)
    assert [i["filename"] for i in ours] == [str(top), str(mid), str(base)]
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        same_fields(a, b)
    assert ours[1]["format-specific"]["data"]["extended-l2"] is True
    assert ours[2]["format-specific"]["data"]["compat"] == "0.10"
    same_fields(info(top), qemu_info(top))

    text = fusedisk("info", "--backing-chain", top).stdout
    assert "backing file: base.qcow2 (actual path: " in text
    assert "before-upgrade" in text and "compression type: zstd" in text


@needs("cryptsetup")
def test_luks_header_without_secrets(tmp_path: Path) -> None:
    image, secret = tmp_path / "l.luks", tmp_path / "pw"
    secret.write_text("a passphrase")
    image.write_bytes(bytes(16 << 20))
    # cryptsetup with fixed iterations: qemu-img's timed calibration fails on a busy machine
    run("cryptsetup", "luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000",
        "--key-file", secret, image)  # fmt: skip
    ours = info(image)
    same_fields(ours, qemu_info(image))
    dump = run(sys.executable, "-m", "fusedisk", "luks", "dump", image)
    digest_line = next(line for line in dump.splitlines() if line.startswith("MK digest"))
    digest = digest_line.split("\t")[-1].split()  # its first 16 bytes, as hex pairs
    assert len(digest) == 16
    text = fusedisk("info", image).stdout + json.dumps(ours)
    for form in (" ".join(digest), "".join(digest), ":".join(digest)):
        assert form not in text  # no digest (nor salt or key material: no field holds them)
    assert "salt" not in text.lower() and "digest" not in text.lower()


def test_raw_and_dedup(tmp_path: Path) -> None:
    raw = tmp_path / "d.img"
    raw.write_bytes(b"\1" * 3 * 65536)
    same_fields(info(raw), qemu_info("-f", "raw", raw))
    assert info(raw)["format"] == "raw" and info(raw)["virtual-size"] == 3 * 65536

    meta, data = tmp_path / "m.dd", tmp_path / "d.dd"
    result = fusedisk("dedup", "create", "--metadata", meta, "--data", data, "--size", "64M")
    assert result.returncode == 0, result.stderr
    doc = info(meta)
    assert doc["format"] == "dedup" and doc["virtual-size"] == 64 << 20
    assert doc["format-specific"]["data"]["block-size"] == 4096
    assert "block size: 4096" in fusedisk("info", meta).stdout


def test_bad_input_is_a_sentence(tmp_path: Path) -> None:
    missing = fusedisk("info", tmp_path / "nope.qcow2")
    assert missing.returncode == 1
    assert (
        missing.stderr
        == f"fusedisk: image '{tmp_path / 'nope.qcow2'}': No such file or directory\n"
    )
    broken = tmp_path / "broken.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", broken, "1M")
    with open(broken, "r+b") as f:
        f.seek(20)
        f.write(b"\0\0\0\x40")  # cluster_bits 64
    result = fusedisk("info", broken)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cluster_bits 64 is out of range" in result.stderr
    top = tmp_path / "top.qcow2"
    run(
        "qemu-img",
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        top,
        "1M",
    )
    result = fusedisk("info", "--backing-chain", top)
    assert result.returncode == 1
    assert f"backing file '{tmp_path / 'gone.qcow2'}' of '{top}'" in result.stderr
