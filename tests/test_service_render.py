"""What status and the metrics file render, from documents of the shapes the mount shows.

The mount tests (test_service_mount.py) drive the same code through real files;
these pin the text for cases a mount cannot hold still: a commit half done with
its ETA, a job file with fields missing or renamed, label values that need
escaping.
"""

from __future__ import annotations

import io
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from fusedisk.commands.status import render, summary
from fusedisk.metrics import Exposition, numbers
from fusedisk.service.reader import DiskView, JobProgress, MountView, NodeView, job_line

RUNNING_COMMIT = {
    "kind": "commit", "target": "s1", "state": "running", "done_bytes": 300 << 20,
    "total_bytes": 1200 << 20, "progress": 0.25, "elapsed": 10.0, "error": "",
}  # fmt: skip


def test_job_line_has_progress_rate_and_eta() -> None:
    job = JobProgress.of(RUNNING_COMMIT)
    assert job.rate == 30 << 20 and job.eta == 30.0
    assert job_line(job) == ("commit s1: running 25.0%, 300.0 MiB of 1.2 GiB, 30.0 MiB/s, ETA 30s")


def test_job_documents_are_read_tolerantly() -> None:
    assert job_line(JobProgress.of({})) == "no job"
    odd = JobProgress.of({"state": "failed", "done_bytes": "many", "error": "disk gone"}, "scrub")
    assert odd.failed and odd.done == 0
    assert job_line(odd) == "scrub: failed 0.0%, 0 B of 0 B in 0s: disk gone"


def test_status_screen_of_a_running_commit() -> None:
    disk = DiskView(
        name="vm1", size=1 << 30, read_only=True, top="b1",
        nodes={"b1": NodeView("b1", "qcow2", 1 << 30, {}, {})}, stats={}, job=RUNNING_COMMIT,
    )  # fmt: skip
    view = MountView(Path("/mnt/disks"), {"vm1": disk}, last_error="")
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(render(view))
    text = console.export_text()
    assert "vm1 1.0 GiB (1073741824 bytes), read-only" in text
    assert "b1 (qcow2)" in text
    assert "job: commit s1: running 25.0%, 300.0 MiB of 1.2 GiB, 30.0 MiB/s, ETA 30s" in text
    doc = summary(view)["disks"]["vm1"]
    assert doc["job"]["eta_seconds"] == 30.0 and doc["read_only"] is True


def test_exposition_escapes_and_parses() -> None:
    out = Exposition()
    out.add("fusedisk_x", "gauge", "help with \\ and\nnewline", {"node": 'a"b\\c\nd'}, 1)
    out.add("fusedisk_x", "gauge", "ignored: the first help wins", {"node": "e"}, 2.5)
    (family,) = text_string_to_metric_families(out.text())
    assert family.documentation == "help with \\ and\nnewline"
    assert [(s.labels["node"], s.value) for s in family.samples] == [('a"b\\c\nd', 1), ("e", 2.5)]


def test_numbers_flattens_driver_stats() -> None:
    stats = {"hits": 3, "cache": {"pages": 2, "ratio": 0.5}, "uuid": "x", "on": True, "1st": 1}
    assert dict(numbers(stats)) == {
        "hits": 3, "cache_pages": 2, "cache_ratio": 0.5, "on": 1, "_1st": 1}  # fmt: skip
