"""Overlay names (graph/naming.py) and error sentences (errors.describe), without a mount."""

from __future__ import annotations

import errno
from pathlib import Path

from fusedisk.errors import describe
from fusedisk.graph import graph as _graph  # noqa: F401  (the record kinds)
from fusedisk.graph.changes import Change
from fusedisk.graph.naming import PART_BYTES, bounded, family, overlay_names


def test_bounded_keeps_short_names_and_cuts_long_ones_with_a_hash() -> None:
    assert bounded("hourly-2026-12-007") == "hourly-2026-12-007"
    long_a, long_b = "a" * 100 + "1", "a" * 100 + "2"
    assert len(bounded(long_a).encode()) <= PART_BYTES
    assert bounded(long_a) != bounded(long_b)  # the hash keeps them apart
    assert bounded(long_a) == bounded(long_a)
    wide = "é" * 60  # two bytes each: cut on a character, never inside one
    assert len(bounded(wide).encode()) <= PART_BYTES
    bounded(wide).encode().decode()


def _snapshot(name: str, node: str, base: str, filename: str, **extra: str) -> Change:
    overlay = {"node": node, "base": base, "filename": filename, **extra}
    record = {"op": "snapshot", "name": name, "disk": "vm0", "overlays": [overlay]}
    return Change.from_record(record, Path("spec.toml.state.json"))


def test_the_family_of_a_new_or_an_old_scheme_chain() -> None:
    assert family([], "d0", "d0") == ("d0", "d0")
    old = [
        _snapshot("s1", "d0.s1", "d0", "/images/d0.s1.qcow2"),
        _snapshot("s2", "d0.s1.s2", "d0.s1", "/images/d0.s1.s2.qcow2"),
    ]
    assert family(old, "d0.s1.s2", "d0.s1.s2") == ("d0", "d0")
    new = [*old, _snapshot("s3", "d0.s3", "d0.s1.s2", "/images/d0.s3.qcow2", stem="d0",
                           **{"node-stem": "d0"})]  # fmt: skip
    assert family(new, "d0.s3", "d0.s3") == ("d0", "d0")


def test_a_taken_name_gets_a_counter(tmp_path: Path) -> None:
    (tmp_path / "d0.s1.qcow2").write_text("")
    path, node = overlay_names(tmp_path, ("d0", "d0"), "s1", set(), set())
    assert (path.name, node) == ("d0.s1_2.qcow2", "d0.s1_2")
    path, node = overlay_names(tmp_path, ("d0", "d0"), "s2", set(), {"d0.s2"})
    assert (path.name, node) == ("d0.s2_2.qcow2", "d0.s2_2")
    (tmp_path / "d0.s3.qcow2").symlink_to(tmp_path / "nowhere")  # never followed
    assert overlay_names(tmp_path, ("d0", "d0"), "s3", set(), set())[1] == "d0.s3_2"


def test_describe_gives_an_os_error_as_a_sentence_end() -> None:
    error = OSError(errno.ENAMETOOLONG, "File name too long", "/images/x")
    assert describe(error) == "'/images/x': File name too long"
    assert describe(OSError(errno.EIO, "Input/output error")) == "Input/output error"
    assert describe(ValueError("plain")) == "plain"
