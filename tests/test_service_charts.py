"""benchmarks/charts.py draws PNGs from results files; the daemon never imports the
command-line libraries (rich, matplotlib, prometheus_client)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = {
    "host file": {"seq-read-1M": 723.0, "seq-write-1M": 821.0,
                  "rand-read-4k-qd1": 27317.0, "rand-read-4k-qd16": 93843.0},
    "qemu-storage-daemon": {"seq-read-1M": 731.0, "seq-write-1M": 2366.0,
                            "rand-read-4k-qd1": 18750.0, "rand-read-4k-qd16": 47291.0},
    "fusedisk": {"seq-read-1M": 2696.0, "seq-write-1M": 1669.0,
                 "rand-read-4k-qd1": 10028.0, "rand-read-4k-qd16": 13108.0},
}  # fmt: skip


def results_file(path: Path, cache: str | None, scale: float = 1.0) -> Path:
    results = {
        target: {
            job: {"MB/s" if job.startswith("seq") else "IOPS": value * scale, "cpu_us": 20.0}
            for job, value in jobs.items()
        }
        for target, jobs in SAMPLE.items()
    }
    doc = {"machine": "2 × test vCPU", "format": "raw", "results": results}
    if cache is not None:
        doc["cache"] = cache
    path.write_text(json.dumps(doc))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_charts_from_warm_and_cold_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is in the bench extra")
    warm = results_file(tmp_path / "warm.json", None)  # no "cache": warm
    cold = results_file(tmp_path / "cold.json", "cold", scale=0.3)
    out = tmp_path / "charts"
    result = subprocess.run(
        [sys.executable, ROOT / "benchmarks" / "charts.py", warm, cold, "--out", out],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["raw-cold.png", "raw-warm.png"]
    for name in ("raw-cold.png", "raw-warm.png"):
        width, height = png_size(out / name)
        assert (width, height) == (1200, 450)  # two panels: MB/s and IOPS
        assert (out / name).stat().st_size > 20_000  # bars, labels and text drawn


def test_a_file_that_is_not_results_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"machine": "x"}')
    result = subprocess.run(
        [sys.executable, ROOT / "benchmarks" / "charts.py", bad, "--out", tmp_path],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{bad}: not a benchmark results file" in result.stderr


def test_the_daemon_imports_no_cli_library() -> None:
    code = (
        "import sys\n"
        "from fusedisk.cli import build_parser\n"
        "import fusedisk.fuse.serve, fusedisk.fuse.tree, fusedisk.metrics\n"
        "build_parser()\n"
        "print(sorted({'rich', 'matplotlib', 'prometheus_client'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
