"""Spec values that passed the checks and broke the mount later are refused up front:
a uid past uid_t (every `ls` of the mount was EIO), nan (passes every range check),
disk names whose mount entries collide with another disk's (a name the mount's root
shows itself is refused too: tests/test_spec_errors.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import cli, make_image

RAW = '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\n'


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (RAW + '[disks.vm0]\nnode = "d0"\nuid = 4294967296\n', ["disk 'vm0'", "option 'uid'"]),
        (RAW + '[disks.vm0]\nnode = "d0"\ngid = -1\n', ["disk 'vm0'", "option 'gid'"]),
        (
            '[nodes.f]\ndriver = "faults"\nprobability = nan\nfile = { driver = "file", '
            'filename = "d0.img" }\n[disks.vm0]\nnode = "f"\n',
            ["node 'f'", "option 'probability'", "finite"],
        ),
        (
            RAW + '[nodes.d1]\ndriver = "raw"\nfilename = "d0.img"\nread-only = true\n'
            '[disks.a]\nnode = "d0"\n[disks."a.img"]\nnode = "d1"\n',
            ["disk 'a.img'", "mount entry 'a.img'", "disk 'a''s"],
        ),
    ],
    ids=["uid", "gid", "nan", "a-and-a.img"],
)
def test_values_that_would_break_the_mount_are_refused(
    tmp_path: Path, write_spec: Callable[..., Path], text: str, words: list[str]
) -> None:
    make_image(tmp_path / "d0.img", 1 << 20)
    result = cli("check", write_spec(text))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in result.stderr, result.stderr
