"""The consistency check of a dedup image: every refcount, map entry, index entry, hash.

Memory stays bounded: the map is read once per slice of at most 2**20
physical blocks, counting the references that fall in that slice, and the
slice's refcounts are compared with the counts.  With `hashes`, every
referenced block is read from `data` and its hash compared with the table.

Findings are *errors* (a refcount lower than the references, an entry out of
range, a hash that does not match, counters that disagree: data is at risk),
*leaks* (a refcount higher than the references: space is lost, nothing else)
and *warnings* (a torn index bucket: only deduplication chances are lost).
Stale index entries are normal (the index is advisory) and only counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fusedisk.errors import FuseDiskError
from fusedisk.formats.dedup.entries import pbt_entries, pbt_holds, pbt_location
from fusedisk.formats.dedup.index import (
    ContentIndex,
    bucket_checksum_ok,
    bucket_entries,
    bucket_problem,
)
from fusedisk.formats.dedup.layout import MAP_PER_PAGE, PAGE, PBT_PER_PAGE

if TYPE_CHECKING:
    from fusedisk.formats.dedup.volume import DedupVolume

SLICE = 1 << 20  # physical blocks counted per pass over the map
RUN = 256  # metadata pages read at once
MAX_LISTED = 50  # findings listed per kind (all are counted)


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error_count: int = 0
    leak_count: int = 0
    summary: dict[str, Any] = field(default_factory=dict)

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_LISTED:
            self.errors.append(text)

    def leak(self, text: str) -> None:
        self.leak_count += 1
        if len(self.leaks) < MAX_LISTED:
            self.leaks.append(text)

    @property
    def status(self) -> str:
        if self.error_count:
            return "corrupt"
        if self.leak_count:
            return "leaks"
        return "clean"

    @property
    def exit_code(self) -> int:
        """As `qemu-img check`: 0 clean, 2 corruption, 3 leaks only."""
        return {"clean": 0, "corrupt": 2, "leaks": 3}[self.status]

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "errors": self.error_count,
            "leaks": self.leak_count,
            "error_list": self.errors,
            "leak_list": self.leaks,
            "warnings": self.warnings,
            **self.summary,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2) + "\n"

    def lines(self) -> list[str]:
        out = [f"error: {e}" for e in self.errors]
        if self.error_count > len(self.errors):
            out.append(f"error: ... and {self.error_count - len(self.errors)} more")
        out += [f"leak: {e}" for e in self.leaks]
        if self.leak_count > len(self.leaks):
            out.append(f"leak: ... and {self.leak_count - len(self.leaks)} more")
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"{k.replace('_', ' ')}: {v}" for k, v in self.summary.items()]
        out.append(f"status: {self.status}")
        return out


async def _pages(node: DedupVolume, first: int, count: int) -> tuple[bytearray, set[int]]:
    """`count` metadata pages as the node sees them now (cache and journal overlay
    first), and which of them came from the cache."""
    raw = bytearray(await node.md.read(first * PAGE, count * PAGE))
    cached = set()
    for pno in range(first, first + count):
        at = (pno - first) * PAGE
        page = node.cache.peek(pno)
        if page is not None:
            raw[at : at + PAGE] = page.data
            cached.add(pno)
        elif pno in node._overlay:
            raw[at : at + PAGE] = node._overlay[pno]
    return raw, cached


@dataclass
class _Tally:
    """What the passes count, to compare with the image's counters."""

    used_logical: int = 0
    used_physical: int = 0
    hashed: int = 0


async def check_image(node: DedupVolume, hashes: bool = True) -> CheckReport:
    """Check the image of an open dedup node; the caller keeps it from changing."""
    report = CheckReport()
    sb = node.sb
    c = node.counters
    tally = _Tally()
    for lo in range(0, sb.physical_blocks, SLICE):
        hi = min(sb.physical_blocks, lo + SLICE)
        counts = await _count_references(node, report, tally, lo, hi)
        await _check_table(node, report, tally, lo, hi, counts, hashes)
    if tally.used_logical != c.used_logical:
        report.error(
            f"the image counts {c.used_logical} logical blocks in use, the map has "
            f"{tally.used_logical}"
        )
    if tally.used_physical != c.used_physical:
        report.error(
            f"the image counts {c.used_physical} physical blocks in use, the table has "
            f"{tally.used_physical}"
        )
    index = await _check_index(node, report)
    report.summary = {
        "logical_blocks_used": tally.used_logical,
        "physical_blocks_used": tally.used_physical,
        "block_size": sb.block_size,
        "blocks_hashed": tally.hashed,
        **index,
    }
    return report


async def _count_references(
    node: DedupVolume, report: CheckReport, tally: _Tally, lo: int, hi: int
) -> np.ndarray:
    """How many map entries point at each physical block of [lo, hi); the first
    slice also checks the map entries themselves and counts those in use."""
    sb = node.sb
    n_logical, n_physical = sb.logical_blocks, sb.physical_blocks
    map_pages = -(-n_logical // MAP_PER_PAGE)
    counts = np.zeros(hi - lo, dtype=np.int64)
    for mfirst in range(0, map_pages, RUN):
        k = min(RUN, map_pages - mfirst)
        raw, _ = await _pages(node, sb.map_first_page + mfirst, k)
        refs = np.frombuffer(raw, dtype="<u8")
        lbn0 = mfirst * MAP_PER_PAGE
        valid = refs[: max(0, n_logical - lbn0)]
        if lo == 0:
            if refs[len(valid) :].any():
                report.error("map entries past the last logical block are not zero")
            for i in np.flatnonzero(valid > n_physical).tolist():
                report.error(
                    f"logical block {lbn0 + i} maps to physical block {int(valid[i]) - 1}, "
                    f"past the {n_physical} physical blocks"
                )
            tally.used_logical += int(np.count_nonzero(valid))
        hit = valid[(valid > lo) & (valid <= hi)].astype(np.int64) - 1 - lo
        if hit.size:
            counts += np.bincount(hit, minlength=hi - lo)
    return counts


async def _check_table(
    node: DedupVolume,
    report: CheckReport,
    tally: _Tally,
    lo: int,
    hi: int,
    counts: np.ndarray,
    hashes: bool,
) -> None:
    """Compare the table entries of [lo, hi) with the references counted."""
    sb = node.sb
    hwm = node.counters.hwm
    data_size = node.dt.size
    last_page = -(-hi // PBT_PER_PAGE)
    for pfirst in range(lo // PBT_PER_PAGE, last_page, RUN):
        k = min(RUN, last_page - pfirst)
        raw, _ = await _pages(node, sb.pbt_first_page + pfirst, k)
        entries = pbt_entries(raw)
        p0 = pfirst * PBT_PER_PAGE
        a, b = max(lo, p0), min(hi, p0 + len(entries))
        if b == sb.physical_blocks and np.frombuffer(raw, dtype="<u8")[(b - p0) * 4 :].any():
            report.error("physical block table entries past the last block are not zero")
        rows = entries[a - p0 : b - p0]
        refcounts = rows["refcount"].astype(np.int64)
        expected = counts[a - lo : b - lo]
        for i in np.flatnonzero(refcounts != expected).tolist():
            pbn, rc, refs_ = a + i, int(refcounts[i]), int(expected[i])
            text = f"physical block {pbn} has refcount {rc} but {refs_} logical blocks map to it"
            if rc < refs_:
                report.error(text)
            else:
                report.leak(text)
        tally.used_physical += int(np.count_nonzero(refcounts))
        for i in np.flatnonzero(refcounts[max(0, hwm - a) :] > 0).tolist():
            report.error(
                f"physical block {a + max(0, hwm - a) + i} is in use but at or above "
                f"the high-water mark {hwm}"
            )
        for i in np.flatnonzero(rows["reserved"]).tolist():
            report.error(f"physical block {a + i}: the reserved word of its entry is not 0")
        if hashes:
            tally.hashed += await _check_hashes(node, report, a, rows, expected, data_size)


async def _check_hashes(
    node: DedupVolume,
    report: CheckReport,
    first: int,
    rows: np.ndarray,
    expected: np.ndarray,
    data_size: int,
) -> int:
    """Hash every referenced block of a run of the table (`rows`: its entries); the
    number hashed."""
    bs = node.sb.block_size
    used = np.flatnonzero(expected > 0).tolist()
    done = 0
    i = 0
    while i < len(used):
        j = i + 1
        while j < len(used) and used[j] == used[j - 1] + 1 and j - i < 256:
            j += 1
        start = first + used[i]
        count = j - i
        if (start + count) * bs > data_size:
            report.error(
                f"physical blocks {start}..{start + count - 1} are in use but past the end "
                f"of the data child ({data_size} bytes)"
            )
            i = j
            continue
        data = await node.dt.read(start * bs, count * bs)
        for n in range(count):
            stored = rows[used[i + n]]["digest"].tobytes()
            digest = ContentIndex.hash(memoryview(data)[n * bs : (n + 1) * bs])
            if digest != stored:
                report.error(f"physical block {start + n}: its data does not match its hash")
        done += count
        i = j
    return done


async def _check_index(node: DedupVolume, report: CheckReport) -> dict[str, int]:
    sb = node.sb
    entries = stale = torn = 0
    for bfirst in range(0, sb.index_buckets, RUN):
        k = min(RUN, sb.index_buckets - bfirst)
        first = sb.index_first_page + bfirst
        raw, cached = await _pages(node, first, k)
        for n in range(k):
            data = raw[n * PAGE : (n + 1) * PAGE]
            if first + n not in cached and not bucket_checksum_ok(data):
                torn += 1
                report.warnings.append(
                    f"index bucket {bfirst + n} has a bad checksum (a torn write?); it reads "
                    "as empty"
                )
                continue
            problem = bucket_problem(data, sb.physical_blocks)
            if problem:
                report.error(f"index bucket {bfirst + n} {problem}")
                continue
            for _slot, tag, pbn in bucket_entries(data):
                entries += 1
                pno, word = pbt_location(sb, pbn)
                try:
                    page = await node.cache.get(pno)
                except FuseDiskError as e:
                    report.error(str(e))
                    continue
                if page.q[word] == 0 or not pbt_holds(page, word, tag):
                    stale += 1
    return {"index_entries": entries, "stale_index_entries": stale, "torn_index_buckets": torn}
