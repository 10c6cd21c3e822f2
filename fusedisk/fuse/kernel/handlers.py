"""The requests about names, attributes and directories: lookups, getattr,
readlink, statfs, opendir, readdir(plus).

They touch no disk data and never wait, so each is one call into the mount's
file system and one packed reply; kept apart from session.py, which holds the
loop, the eager start and the data requests (read, write, setattr, fsync...).
"""

from __future__ import annotations

import os
import stat

from fusedisk.fuse.filesystem import Attributes, MountFilesystem
from fusedisk.fuse.kernel import protocol as p


class NodeHandlers:
    """Mixed into the session: handlers over `fs` that answer at once."""

    fs: MountFilesystem

    # -- attributes ---------------------------------------------------------------------

    @staticmethod
    def _attr(a: Attributes) -> bytes:
        seconds = a.time_ns // 1_000_000_000
        return p.pack_attr(
            a.ino, a.size, a.blocks, seconds, a.time_ns % 1_000_000_000, a.mode, a.nlink,
            a.uid, a.gid,
        )  # fmt: skip

    def _entry_out(self, a: Attributes) -> bytes:
        sec, nsec = p.split_timeout(a.timeout)
        return p.ENTRY_OUT.pack(a.ino, 0, sec, sec, nsec, nsec) + self._attr(a)

    def _attr_out(self, a: Attributes) -> bytes:
        sec, nsec = p.split_timeout(a.timeout)
        return p.ATTR_OUT.pack(sec, nsec, 0) + self._attr(a)

    def _lookup(self, a: p.Args, nodeid: int) -> bytes:
        return self._entry_out(self.fs.lookup(nodeid, a.name()))

    def _getattr(self, a: p.Args, nodeid: int) -> bytes:
        return self._attr_out(self.fs.getattr(nodeid))

    def _readlink(self, a: p.Args, nodeid: int) -> bytes:
        return os.fsencode(self.fs.readlink(nodeid))

    def _statfs(self, a: p.Args, nodeid: int) -> bytes:
        blocks = self.fs.total_blocks(4096)
        return p.STATFS_OUT.pack(blocks, 0, 0, 0, 0, 4096, 255, 4096, 0)

    # -- directories --------------------------------------------------------------------

    def _opendir(self, a: p.Args, nodeid: int) -> bytes:
        self.fs.opendir(nodeid)
        return p.OPEN_OUT.pack(nodeid, 0, 0)

    def _listing(self, a: p.Args, nodeid: int, plus: bool) -> bytes:
        """READDIR(PLUS): entries from the request's offset on, as many as its buffer holds;
        each entry's offset is the index of the next one."""
        _fh, start, size, *_ = a.struct(p.READ_IN)
        out = bytearray()
        for index, (name, attrs) in enumerate(self.fs.readdir(nodeid, start), start + 1):
            kind = stat.S_IFMT(attrs.mode) >> 12
            record = p.pack_dirent(attrs.ino, index, os.fsencode(name), kind)
            if plus:
                record = self._entry_out(attrs) + record
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def _readdir(self, a: p.Args, nodeid: int) -> bytes:
        return self._listing(a, nodeid, plus=False)

    def _readdirplus(self, a: p.Args, nodeid: int) -> bytes:
        return self._listing(a, nodeid, plus=True)
