"""A wrong spec is refused with a sentence naming the node and the option, before
anything is mounted, created or written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusedisk.errors import SpecError
from fusedisk.spec import parse_spec
from tests.conftest import make_image

BAD_SPECS = {
    "unknown driver": (
        '[nodes.d0]\ndriver = "qcow9"\nfilename = "d0.img"\n[disks.vm0]\nnode = "d0"\n',
        ["node 'd0'", "option 'driver'", "unknown driver 'qcow9'"],
    ),
    "unknown option": (
        '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\ncluster-size = 1\n'
        '[disks.vm0]\nnode = "d0"\n',
        ["node 'd0'", "unknown option 'cluster-size'"],
    ),
    "wrong type": (
        '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\noffset = "lots"\n'
        '[disks.vm0]\nnode = "d0"\n',
        ["node 'd0'", "option 'offset'", "expected a size"],
    ),
    "missing child": (
        '[nodes.d0]\ndriver = "raw"\nfile = "nowhere"\n[disks.vm0]\nnode = "d0"\n',
        ["node 'd0'", "option 'file'", "no node named 'nowhere'"],
    ),
    "child required": (
        '[nodes.d0]\ndriver = "raw"\n[disks.vm0]\nnode = "d0"\n',
        ["node 'd0'", "child 'file' is required"],
    ),
    "doubly used child": (
        '[nodes.f]\ndriver = "file"\nfilename = "d0.img"\n'
        '[nodes.a]\ndriver = "raw"\nfile = "f"\n[nodes.b]\ndriver = "raw"\nfile = "f"\n'
        '[disks.vm0]\nnode = "a"\n[disks.vm1]\nnode = "b"\n',
        ["node 'b'", "option 'file'", "node 'f' is already used by node 'a'"],
    ),
    "cycle": (
        '[nodes.a]\ndriver = "raw"\nfile = "b"\n[nodes.b]\ndriver = "raw"\nfile = "a"\n'
        '[nodes.top]\ndriver = "raw"\nfilename = "d0.img"\n[disks.vm0]\nnode = "top"\n',
        ["cycle", "a -> b -> a"],
    ),
    "disk without node": (
        '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\n[disks.vm0]\nmode = 0o600\n',
        ["disk 'vm0'", "option 'node' is required"],
    ),
    "disk on a missing node": (
        '[disks.vm0]\nnode = "ghost"\n',
        ["disk 'vm0'", "option 'node'", "no node named 'ghost'"],
    ),
    "no disk": ('[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\n', ["declares no disk"]),
    "bad choice": (
        '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\n'
        '[disks.vm0]\nnode = "d0"\ndetect-zeroes = "maybe"\n',
        ["disk 'vm0'", "option 'detect-zeroes'", "'maybe'"],
    ),
    "unknown section": (
        '[nodez.d0]\ndriver = "raw"\n[disks.vm0]\nnode = "d0"\n',
        ["[nodez]", "unknown section"],
    ),
    "bad name": (
        '[nodes."a/b"]\ndriver = "raw"\nfilename = "d0.img"\n[disks.vm0]\nnode = "a/b"\n',
        ["node 'a/b'", "a name may hold"],
    ),
    "not toml": ("[nodes.d0\n", ["not valid TOML"]),
    "file and filename": (
        '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\n'
        'file = { driver = "file", filename = "d0.img" }\n[disks.vm0]\nnode = "d0"\n',
        ["node 'd0'", "either 'file' or 'filename'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_refused_with_a_message_naming_node_and_option(case, tmp_path):
    text, expected = BAD_SPECS[case]
    with pytest.raises(SpecError) as err:
        parse_spec(text, tmp_path / "spec.toml")
    message = str(err.value)
    assert str(tmp_path / "spec.toml") in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def _tree_state(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()[:4096])
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.mount
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing image", "cannot open"),
        ("window past the end", "option 'size'"),
        ("unknown option", "unknown option"),
    ],
)
def test_mount_refuses_a_bad_spec_and_touches_nothing(case, needle, tmp_path):
    make_image(tmp_path / "d0.img", 65536, b"z")
    nodes = {
        "missing image": 'driver = "raw"\nfilename = "missing.img"',
        "window past the end": 'driver = "raw"\nfilename = "d0.img"\nsize = "1M"',
        "unknown option": 'driver = "raw"\nfilename = "d0.img"\nbogus = 1',
    }[case]
    (tmp_path / "spec.toml").write_text(f'[nodes.d0]\n{nodes}\n[disks.vm0]\nnode = "d0"\n')
    (tmp_path / "mnt").mkdir()
    before = _tree_state(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "fusedisk", "mount", str(tmp_path / "spec.toml"),
         str(tmp_path / "mnt")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert needle in result.stderr and "node 'd0" in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    assert _tree_state(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.img", "mnt", "spec.toml"]


def test_check_prints_the_tree_and_refuses_missing_images(tmp_path):
    make_image(tmp_path / "d0.img", 65536)
    spec = tmp_path / "spec.toml"
    spec.write_text('[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\n[disks.vm0]\nnode = "d0"\n')
    ok = subprocess.run([sys.executable, "-m", "fusedisk", "check", str(spec)],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "disk vm0: 65536 bytes" in ok.stdout and "file: d0.file (file" in ok.stdout
    (tmp_path / "d0.img").unlink()
    bad = subprocess.run([sys.executable, "-m", "fusedisk", "check", str(spec)],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1
    assert "node 'd0.file': option 'filename': cannot open" in bad.stderr


def test_relative_paths_resolve_against_the_spec_folder(tmp_path):
    spec = parse_spec(
        '[nodes.d0]\ndriver = "raw"\nfilename = "images/d0.img"\n[disks.vm0]\nnode = "d0"\n',
        tmp_path / "sub" / "spec.toml",
    )
    assert spec.nodes["d0.file"].options["filename"] == str(tmp_path / "sub" / "images/d0.img")


def test_inline_and_named_children_and_sizes(tmp_path):
    spec = parse_spec(
        '[nodes.f]\ndriver = "file"\nfilename = "/abs/x.img"\n'
        '[nodes.d0]\ndriver = "raw"\nfile = "f"\noffset = "64K"\nsize = 1048576\n'
        '[disks.vm0]\nnode = "d0"\nmode = 0o644\n',
        tmp_path / "spec.toml",
    )
    assert spec.nodes["d0"].children == {"file": "f"}
    assert spec.nodes["d0"].options["offset"] == 65536
    assert spec.nodes["f"].options["filename"] == "/abs/x.img"
    assert spec.disks["vm0"].mode == 0o644


def test_an_empty_optional_child_means_none(tmp_path):
    spec = parse_spec(
        '[nodes.d0]\ndriver = "qcow2"\nfilename = "d0.qcow2"\nbacking = ""\n'
        '[disks.vm0]\nnode = "d0"\n',
        tmp_path / "spec.toml",
    )
    assert "backing" not in spec.nodes["d0"].children
    assert spec.nodes["d0"].options["backing"] is None
    with pytest.raises(SpecError, match="no node named ''"):
        parse_spec('[nodes.d0]\ndriver = "raw"\nfile = ""\n[disks.vm0]\nnode = "d0"\n',
                   tmp_path / "spec.toml")  # fmt: skip


@pytest.mark.parametrize("name", ["metrics", "last-error", "throttle-groups"])
def test_a_disk_cannot_hide_a_file_of_the_mount_root(tmp_path, name) -> None:
    text = f'[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\n\n[disks.{name}]\nnode = "d0"\n'
    with pytest.raises(SpecError, match=f"disk '{name}'.*taken at the mount's root"):
        parse_spec(text, tmp_path / "spec.toml")
