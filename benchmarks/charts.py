#!/usr/bin/env python3
"""PNG charts of benchmark results: fusedisk beside qemu-storage-daemon and the host file.

    .venv/bin/python benchmarks/charts.py RESULTS.json... [--out docs/benchmarks]

Each results file is what `fio_compare.py --json` writes: {"machine", "format",
"cache" ("warm" or "cold"), "results": {target: {job: {"MB/s", "IOPS", ...}}}};
files without "format" or "cache" count as raw and warm.  One chart per format and
cache: sequential jobs in MB/s on the left, 4 KiB jobs in IOPS on the right, one
bar per target.  matplotlib (the `bench` extra) is imported here only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: bar colours, so a target keeps its colour from chart to chart
COLOURS = {
    "host file": "#7f7f7f",
    "qemu-storage-daemon": "#1f77b4",
    "fusedisk": "#d62728",
    "fusedisk-pyfuse3": "#ff9896",
}
OTHER_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def load(paths: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """Results by (format, cache); a later file for the same pair adds targets and jobs."""
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        try:
            doc = json.loads(path.read_text())
            results = doc["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}: not a benchmark results file ({e})") from None
        key = (str(doc.get("format", "raw")), str(doc.get("cache", "warm")))
        run = runs.setdefault(key, {"machine": doc.get("machine", ""), "results": {}})
        for target, jobs in results.items():
            run["results"].setdefault(target, {}).update(jobs)
    return runs


def chart(fmt: str, cache: str, run: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    results: dict[str, dict[str, dict[str, float]]] = run["results"]
    targets = list(results)
    jobs = list(dict.fromkeys(job for target in targets for job in results[target]))
    panels = [
        ("sequential, 1 MiB requests", "MB/s", [j for j in jobs if j.startswith("seq")]),
        ("random, 4 KiB requests", "IOPS", [j for j in jobs if not j.startswith("seq")]),
    ]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False,
        gridspec_kw={"width_ratios": [max(len(p[2]), 1) for p in panels]},
    )  # fmt: skip
    spare = iter(OTHER_COLOURS)
    colours = {t: COLOURS.get(t) or next(spare, "#000000") for t in targets}
    width = 0.8 / max(len(targets), 1)
    for ax, (title, unit, panel_jobs) in zip(axes[0], panels, strict=True):
        for i, target in enumerate(targets):
            xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(panel_jobs))]
            values = [results[target].get(job, {}).get(unit, 0.0) for job in panel_jobs]
            bars = ax.bar(xs, values, width, label=target, color=colours[target])
            ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=7, rotation=90,
                         padding=2)  # fmt: skip
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xticks(range(len(panel_jobs)), panel_jobs, rotation=20, ha="right")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.93),
               ncol=len(targets), frameon=False, fontsize=8)  # fmt: skip
    fig.suptitle(f"fio through the mount: {fmt} image, {cache} page cache")
    if run.get("machine"):
        fig.text(0.5, 0.01, run["machine"], ha="center", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 0.88))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{fmt}-{cache}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files of fio_compare.py")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
    )
    args = parser.parse_args(argv)
    for (fmt, cache), run in sorted(load(args.results).items()):
        print(chart(fmt, cache, run, args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
