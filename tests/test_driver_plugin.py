"""A new driver is one new package: tests/plugin_driver/tinydisk, declared under the
`fusedisk.drivers` entry point, is found, created, described and mounted by the
unchanged fusedisk (issue 21)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import cli, read_at

PLUGIN = Path(__file__).parent / "plugin_driver"


@pytest.fixture
def with_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [str(PLUGIN), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    monkeypatch.setenv("PYTHONPATH", ":".join(paths))


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_a_driver_outside_fusedisk_is_created_described_and_mounted(
    tmp_path: Path, with_plugin: None, write_spec, mount
) -> None:
    image = tmp_path / "t.tiny"
    made = cli("create", "-f", "tiny", "-o", "fill=7", image, "1M")
    assert made.returncode == 0, made.stderr
    assert read_at(image, 512, 4) == b"\x07" * 4

    info = cli("info", "--json", image)
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["format"] == "tiny"  # probed by the plugin's own slot
    assert described["virtual-size"] == 1 << 20
    assert described["format-specific"]["data"] == {"header-bytes": 512}

    spec = write_spec('[nodes.t]\ndriver = "tiny"\nfilename = "t.tiny"\n[disks.vm0]\nnode = "t"\n')
    m = mount(spec)
    disk = m.path("vm0.img")
    assert disk.stat().st_size == 1 << 20
    with open(disk, "r+b") as f:
        assert f.read(4) == b"\x07" * 4
        f.seek(4096)
        f.write(b"plugin")
        f.flush()
        os.fsync(f.fileno())
    assert (m.path("vm0", "nodes", "t", "driver")).read_text().strip() == "tiny"
    m.stop()
    assert read_at(image, 512 + 4096, 6) == b"plugin"


def test_without_the_plugin_the_driver_is_unknown(tmp_path: Path) -> None:
    made = cli("create", "-f", "tiny", tmp_path / "t.tiny", "1M")
    assert made.returncode != 0
    assert "invalid choice: 'tiny'" in made.stderr
