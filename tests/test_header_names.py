"""File names in image headers (backing file, data file) stay inside the spec's folders
unless the spec says `backing-files = "any"`: a header cannot make the daemon (often
root) read or write a host file the spec did not name.  Before, a backing name
`../../secret` or `/etc/...` was opened and its bytes shown to the guest."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fusedisk.formats.qcow2.create import create_qcow2
from tests.conftest import cli, read_at
from tests.mounting import Mount

pytestmark = [pytest.mark.timeout(60)]

SECRET = b"root's secret, not for any guest\n" * 16
SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "images/top.qcow2"
{options}

[disks.vm0]
node = "d0"
"""


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """tmp/vm/{spec.toml, images/} is the spec's; tmp/outside/secret is not."""
    (tmp_path / "vm" / "images").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(SECRET)
    return tmp_path / "vm"


def spec(vm: Path, options: str = "") -> Path:
    path = vm / "spec.toml"
    path.write_text(SPEC.format(options=options))
    return path


def top_with_backing(vm: Path, name: str) -> None:
    create_qcow2(vm / "images" / "top.qcow2", 1 << 20, backing=name, backing_fmt="raw")


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_backing_name_outside_the_spec_folders_is_refused(layout: Path, how: str) -> None:
    secret = layout.parent / "outside" / "secret"
    if how == "dotdot":
        name = "../../outside/secret"
    elif how == "absolute":
        name = str(secret)
    else:
        (layout / "images" / "innocent").symlink_to(secret)
        name = "innocent"
    top_with_backing(layout, name)
    result = cli("check", spec(layout))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for words in ("node 'd0'", "its backing file", "outside the spec's folders",
                  "option 'backing-files'"):  # fmt: skip
        assert words in result.stderr, result.stderr


@pytest.mark.mount
def test_backing_files_any_lets_a_header_name_any_file(
    layout: Path, mount: Callable[..., Mount]
) -> None:
    top_with_backing(layout, "../../outside/secret")
    s = spec(layout, 'backing-files = "any"\nread-only = true')
    assert cli("check", s).returncode == 0
    m = mount(s)
    assert read_at(m.path("vm0.img"), 0, len(SECRET)) == SECRET


@pytest.mark.mount
def test_names_inside_the_spec_folders_still_work(
    layout: Path, mount: Callable[..., Mount]
) -> None:
    base = layout / "base"
    base.mkdir()
    (base / "b.raw").write_bytes(SECRET)
    top_with_backing(layout, str(base / "b.raw"))  # absolute, inside the spec's folder
    m = mount(spec(layout, "read-only = true"))
    assert read_at(m.path("vm0.img"), 0, len(SECRET)) == SECRET


def test_a_backing_chain_cannot_step_out_either(layout: Path) -> None:
    """The backing file's own backing name obeys the same rule, even with the base
    inside: a chain inherits the spec's folders from the image the spec names."""
    mid = layout / "images" / "mid.qcow2"
    create_qcow2(mid, 1 << 20, backing="../../outside/secret", backing_fmt="raw")
    create_qcow2(layout / "images" / "top.qcow2", 1 << 20, backing="mid.qcow2",
                 backing_fmt="qcow2")  # fmt: skip
    result = cli("check", spec(layout))
    assert result.returncode == 1
    assert "mid.qcow2" in result.stderr and "outside the spec's folders" in result.stderr


def test_a_data_file_outside_the_spec_folders_is_refused(layout: Path) -> None:
    victim = layout.parent / "outside" / "secret"
    create_qcow2(layout / "images" / "top.qcow2", 1 << 20, data_file="top.data")
    os.unlink(layout / "images" / "top.data")
    (layout / "images" / "top.data").symlink_to(victim)  # the header's name leads outside
    result = cli("check", spec(layout))
    assert result.returncode == 1 and "its data file" in result.stderr
    assert "outside the spec's folders" in result.stderr
    assert victim.read_bytes() == SECRET
