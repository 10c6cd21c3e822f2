"""The quorum's vote: pure functions on what children answered (no I/O).

A range read from several children is voted per block (VOTE_BLOCK bytes,
aligned to the disk): each child's block is hashed with xxh3_128, the largest
group wins if it has `threshold` members and no other group is as large; a
block without such a winner is undecided (the node fails the read with EIO).
Block status is voted alike: a piece reads as zeroes only where enough
children say so.  What the node keeps of each child is in health.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise

import xxhash

from fusedisk.graph.extents import Extent, Status, merge_extents

#: the unit of a vote: children are compared and repaired in blocks of this size
VOTE_BLOCK = 4096

Range = tuple[int, int]  # (offset, length)


# -- the vote (pure: no I/O) ---------------------------------------------------


@dataclass
class Verdict:
    """The result of voting on one range read from several children.

    `wrong` holds, per child that answered, the ranges where it lost the vote;
    `undecided` the ranges no group won.  Children that failed to answer are
    not in `wrong`: the caller knows them.
    """

    offset: int
    length: int
    data: bytes  # the winning bytes; undecided ranges hold zeroes
    wrong: dict[str, list[Range]] = field(default_factory=dict)
    undecided: list[Range] = field(default_factory=list)

    def decided(self) -> list[Range]:
        """The complement of `undecided` within the range."""
        out: list[Range] = []
        pos = self.offset
        for off, n in self.undecided:
            if off > pos:
                out.append((pos, off - pos))
            pos = off + n
        if pos < self.offset + self.length:
            out.append((pos, self.offset + self.length - pos))
        return out


def _add_range(ranges: list[Range], off: int, n: int) -> None:
    """Append, merging with the previous range when contiguous."""
    if ranges and ranges[-1][0] + ranges[-1][1] == off:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
    else:
        ranges.append((off, n))


def vote(
    offset: int, results: Mapping[str, bytes], threshold: int, block: int = VOTE_BLOCK
) -> Verdict:
    """Vote per `block` (aligned to absolute offsets) among the children's results.

    A block's winner is the largest group of identical contents if it has at
    least `threshold` members and no other group is as large.
    """
    names = list(results)
    length = len(results[names[0]]) if names else 0
    if len(names) < threshold or not names:
        return Verdict(offset, length, bytes(length), {}, [(offset, length)] if length else [])
    first = results[names[0]]
    if all(results[n] == first for n in names[1:]):
        return Verdict(offset, length, first)
    verdict = Verdict(offset, length, b"")
    out = bytearray(length)
    end = offset + length
    pos = offset
    while pos < end:
        stop = min(end, (pos // block + 1) * block)
        a, b = pos - offset, stop - offset
        pieces = {n: results[n][a:b] for n in names}
        p0 = pieces[names[0]]
        if all(pieces[n] == p0 for n in names[1:]):
            out[a:b] = p0
            pos = stop
            continue
        groups: dict[int, list[str]] = {}
        for n in names:
            groups.setdefault(xxhash.xxh3_128_intdigest(pieces[n]), []).append(n)
        ranked = sorted(groups.values(), key=len, reverse=True)
        best = ranked[0]
        if len(best) >= threshold and (len(ranked) == 1 or len(ranked[1]) < len(best)):
            out[a:b] = pieces[best[0]]
            for group in ranked[1:]:
                for n in group:
                    _add_range(verdict.wrong.setdefault(n, []), pos, stop - pos)
        else:
            _add_range(verdict.undecided, pos, stop - pos)
        pos = stop
    # Where one child won everywhere, its bytes are the answer: no copy.
    if not verdict.undecided:
        for n in names:
            if n not in verdict.wrong:
                verdict.data = results[n]
                return verdict
    verdict.data = bytes(out)
    return verdict


def zero_majority(
    offset: int, length: int, answers: list[list[Extent]], threshold: int, voters: int
) -> list[Extent]:
    """Block status of the quorum: a piece reads as zeroes only where at least
    `threshold` children, and more than half of the voters, say so."""
    end = offset + length
    cuts = {offset, end}
    for extents in answers:
        for e in extents:
            cuts.update(c for c in (e.offset, e.end) if offset < c < end)
    points = sorted(cuts)
    out: list[Extent] = []
    for start, stop in pairwise(points):
        votes = 0
        for extents in answers:
            for e in extents:
                if e.offset <= start and stop <= e.end:
                    if e.status & Status.ZERO:
                        votes += 1
                    break
        zero = votes >= threshold and votes * 2 > voters
        status = (Status.ZERO if zero else Status.DATA) | Status.ALLOCATED
        out.append(Extent(start, stop - start, status))
    return merge_extents(out)
