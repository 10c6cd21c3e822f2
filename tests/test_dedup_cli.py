"""`fusedisk create -f dedup` and `fusedisk check SPEC` on a dedup disk."""

from __future__ import annotations

import subprocess
import sys


def fusedisk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusedisk", *args], capture_output=True, text=True)


def test_create_then_check_a_dedup_disk(tmp_path):
    meta, data = tmp_path / "meta", tmp_path / "data"
    made = fusedisk("create", "-f", "dedup", "-o", f"data={data}", str(meta), "16M")
    assert made.returncode == 0, made.stderr
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[nodes.dd]\ndriver = "dedup"\nmetadata = { driver = "file", filename = "meta" }\n'
        'data = { driver = "file", filename = "data" }\n[disks.vm0]\nnode = "dd"\n'
    )
    before = meta.read_bytes()
    checked = fusedisk("check", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "node dd: status: clean" in checked.stdout
    assert meta.read_bytes() == before  # checking writes nothing


def test_create_dedup_needs_a_data_file(tmp_path):
    made = fusedisk("create", "-f", "dedup", str(tmp_path / "meta"), "16M")
    assert made.returncode == 1 and "-o data=DATAFILE" in made.stderr
    assert not (tmp_path / "meta").exists()
