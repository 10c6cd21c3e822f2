"""Fuzzing the parsers of untrusted bytes (tests/fuzz/): the committed corpus and every
input that once crashed replay on each run; a bounded coverage-guided run (atheris)
follows, a few seconds per target (FUSEDISK_FUZZ_SECONDS to change it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.fuzz.targets import TARGETS

FUZZ = Path(__file__).parent / "fuzz"
ROOT = Path(__file__).parent.parent
SECONDS = int(os.environ.get("FUSEDISK_FUZZ_SECONDS", "4"))


def inputs(target: str) -> list[Path]:
    return sorted(p for kind in ("corpus", "regressions") for p in (FUZZ / kind / target).glob("*"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_and_past_crashes_replay(target: str) -> None:
    files = inputs(target)
    assert files, f"no corpus for {target}"
    for path in files:
        TARGETS[target](path.read_bytes())  # raises on a crash: the test names the input


@pytest.mark.parametrize("name", sorted(p.name for p in (FUZZ / "regressions" / "spec").glob("*")))
def test_bad_spec_files_are_refused_by_the_cli(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fusedisk", "check", str(FUZZ / "regressions" / "spec" / name)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("fusedisk: ")


LUKS_SPEC = """
[nodes.crypt]
driver = "luks"
key-file = "key"
file = { driver = "file", filename = "luks.img" }
[disks.vm0]
node = "crypt"
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(p.name for p in (FUZZ / "regressions" / "luks").glob("*")))
def test_bad_luks_headers_are_refused_at_once(name: str, tmp_path: Path) -> None:
    """Before: 2^31 iterations ended in a PanicException traceback, a million stripes in
    seconds of work and 235 MiB before "wrong key"."""
    head = (FUZZ / "regressions" / "luks" / name).read_bytes()
    image = tmp_path / "luks.img"
    image.write_bytes(head)
    os.truncate(image, 80 << 20)
    (tmp_path / "key").write_bytes(b"pw")  # the seed's passphrase
    (tmp_path / "spec.toml").write_text(LUKS_SPEC)
    result = cli("check", tmp_path / "spec.toml", timeout=20)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
    assert "damaged LUKS header" in result.stderr


@pytest.mark.timeout(SECONDS + 90)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_bounded_coverage_guided_fuzzing(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    work = tmp_path / "corpus"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", target, f"-max_total_time={SECONDS}",
         "-timeout=10", "-rss_limit_mb=1500", f"-artifact_prefix={tmp_path}/",
         str(work), str(FUZZ / "corpus" / target)],
        capture_output=True, text=True, cwd=ROOT, timeout=SECONDS + 80,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    kinds = ("crash", "timeout", "oom", "leak")
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.split("-")[0] in kinds)
    runs = [line for line in proc.stderr.splitlines() if line.startswith("Done ")]
    assert proc.returncode == 0 and not crashes, (
        f"fuzzing {target} found {crashes}; add the input to tests/fuzz/regressions/{target}/"
        f" and fix it:\n{proc.stderr[-4000:]}"
    )
    print(f"{target}: {runs[-1] if runs else proc.stderr[-200:]}")
