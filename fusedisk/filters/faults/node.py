"""Driver `faults`: inject I/O errors, corrupt reads, drop or delay requests -- a testing tool.

In the spirit of QEMU's blkdebug, nbdkit's error filter and device-mapper's
flakey/error targets: put it anywhere in a tree to see how the layers above
(quorum, a guest file system, fsck, an application) cope with a failing
device.  It must never sit in a tree that holds data you care about.

One rule, given as flat options (so it fits a TOML table and a one-value
control file each), all changeable at run time:

    which requests   error-reads / error-writes / error-flushes / error-discards /
                     error-zeroes: fail them with `errno` (default EIO);
                     corrupt-reads: flip one bit per 512-byte sector of what a read returns;
                     drop-writes: report writes (and discard, write-zeroes) as done
                     without doing them;
                     delay-reads / delay-writes (and discard, write-zeroes) /
                     delay-flushes: hold them `delay` milliseconds first (a slow
                     device, like nbdkit's delay filter), then go on as ruled
    where            range-start, range-length (0: to the end); flush has no range
    when             after: the first N requests the rule applies to pass;
                     probability: then each one fails with this chance (seeded by
                     `seed`, for reproducible runs); max-errors: stop after this many

A request the rule applies to is one of an enabled kind that overlaps the
range.  A delay comes first; then errors take precedence over corruption and
dropping.  A delayed request waits in trio (trio.sleep), so it holds no
other request and is cancelled like any wait.  Changing any
rule option (through `options/<name>` or the `rules` control file) starts the
rule afresh: its `after` and `max-errors` counters restart from zero.
"""

from __future__ import annotations

import errno as _errno
import os
import random
from typing import Any

import trio

from fusedisk.errors import ControlError, IOFailure, OpenError
from fusedisk.graph.node import Control, Filter
from fusedisk.graph.options import Option, OptionValueError, option_table

SECTOR = 512

_KINDS = ("read", "write", "flush", "discard", "write_zeroes")

RULE_OPTIONS = option_table(
    Option("error-reads", "bool", False, "fail reads the rule applies to", runtime=True),
    Option("error-writes", "bool", False, "fail writes the rule applies to", runtime=True),
    Option("error-flushes", "bool", False, "fail flushes", runtime=True),
    Option("error-discards", "bool", False, "fail discards the rule applies to", runtime=True),
    Option("error-zeroes", "bool", False, "fail write-zeroes the rule applies to", runtime=True),
    Option("errno", "str", "EIO", "the error returned, by name (EIO, ENOSPC, ...)", runtime=True),
    Option("range-start", "size", 0, "first byte of the range", minimum=0, runtime=True),
    Option(
        "range-length", "size", 0, "length of the range (0: to the end)", minimum=0, runtime=True
    ),
    Option(
        "probability",
        "float",
        1.0,
        "chance that a request the rule applies to fails",
        minimum=0,
        maximum=1,
        runtime=True,
    ),
    Option(
        "after", "int", 0, "let this many matching requests pass first", minimum=0, runtime=True
    ),
    Option(
        "max-errors",
        "int",
        0,
        "inject at most this many faults (0: no limit)",
        minimum=0,
        runtime=True,
    ),
    Option("corrupt-reads", "bool", False, "flip one bit per sector of data read", runtime=True),
    Option(
        "drop-writes",
        "bool",
        False,
        "writes, discards and write-zeroes succeed without being done",
        runtime=True,
    ),
    Option("seed", "int", None, "seed of the random choices (default: random)", runtime=True),
    Option("delay-reads", "bool", False, "hold reads the rule applies to", runtime=True),
    Option(
        "delay-writes",
        "bool",
        False,
        "hold writes, discards and write-zeroes the rule applies to",
        runtime=True,
    ),
    Option("delay-flushes", "bool", False, "hold flushes", runtime=True),
    Option(
        "delay",
        "float",
        0.0,
        "how long a delayed request is held, in milliseconds",
        minimum=0,
        runtime=True,
    ),
)

#: which delay option holds which kind of request
_DELAYS = {
    "read": "delay-reads",
    "write": "delay-writes",
    "discard": "delay-writes",
    "write_zeroes": "delay-writes",
    "flush": "delay-flushes",
}


def parse_errno(value: Any) -> int:
    """An errno from a name ('EIO', 'enospc') or a number; OptionValueError if unknown."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value in _errno.errorcode:
            return value
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) in _errno.errorcode:
            return int(text)
        code = getattr(_errno, text.upper(), None)
        if isinstance(code, int) and text.upper().startswith("E"):
            return code
    raise OptionValueError(f"expected an errno name such as EIO or ENOSPC, got {value!r}")


class FaultsNode(Filter):
    driver = "faults"
    summary = "a testing tool: injects I/O errors, corrupts reads, drops writes"
    option_specs = RULE_OPTIONS

    async def open(self) -> None:
        await super().open()
        try:
            self._errno = parse_errno(self.options.get("errno", "EIO"))
        except OptionValueError as e:
            raise OpenError(f"node '{self.name}': option 'errno': {e}") from None
        self._rng = random.Random(self._seed(self.options.get("seed")))
        self._matched = 0
        self._injected = 0
        self.errors_injected = 0
        self.reads_corrupted = 0
        self.writes_dropped = 0
        self.requests_delayed = 0

    @staticmethod
    def _seed(value: Any) -> int:
        return int(value) if value is not None else int.from_bytes(os.urandom(8), "little")

    # -- the rule ------------------------------------------------------------------------

    def _opt(self, name: str) -> Any:
        return self.options.get(name, RULE_OPTIONS[name].default)

    def _applies(self, kind: str, offset: int, length: int) -> bool:
        o = self._opt
        enabled = {
            "read": o("error-reads") or o("corrupt-reads"),
            "write": o("error-writes") or o("drop-writes"),
            "flush": o("error-flushes"),
            "discard": o("error-discards") or o("drop-writes"),
            "write_zeroes": o("error-zeroes") or o("drop-writes"),
        }[kind]
        if not enabled and not o(_DELAYS[kind]):
            return False
        if kind == "flush":
            return True
        start, end = self._range()
        return offset < end and start < offset + length

    def _range(self) -> tuple[int, int]:
        start = int(self._opt("range-start"))
        length = int(self._opt("range-length"))
        return start, (start + length if length else 1 << 63)

    def _fires(self, kind: str, offset: int = 0, length: int = 0) -> bool:
        """Whether the rule hits this request (and count it)."""
        if not self._applies(kind, offset, length):
            return False
        self._matched += 1
        if self._matched <= int(self._opt("after")):
            return False
        limit = int(self._opt("max-errors"))
        if limit and self._injected >= limit:
            return False
        probability = float(self._opt("probability"))
        if probability < 1.0 and self._rng.random() >= probability:
            return False
        self._injected += 1
        return True

    async def _fires_after_delay(self, kind: str, offset: int = 0, length: int = 0) -> bool:
        """`_fires`, and if it does and the rule delays this kind, hold the request first."""
        if not self._fires(kind, offset, length):
            return False
        delay = float(self._opt("delay"))
        if delay > 0 and self._opt(_DELAYS[kind]):
            self.requests_delayed += 1
            await trio.sleep(delay / 1000)
        return True

    def _fail(self, kind: str, offset: int, length: int) -> IOFailure:
        self.errors_injected += 1
        where = "" if kind == "flush" else f" at {offset}+{length}"
        name = _errno.errorcode.get(self._errno, str(self._errno))
        return IOFailure(
            f"node '{self.name}': injected {name} on {kind.replace('_', '-')}{where}", self._errno
        )

    def _corrupt(self, offset: int, data: bytes) -> bytes:
        """Flip one bit in each 512-byte sector of `data` that lies in the range."""
        start, end = self._range()
        lo, hi = max(start, offset), min(end, offset + len(data))
        buf = bytearray(data)
        pos = lo
        while pos < hi:
            sector_end = min((pos // SECTOR + 1) * SECTOR, hi)
            at = self._rng.randrange(pos, sector_end)
            buf[at - offset] ^= 1 << self._rng.randrange(8)
            pos = sector_end
        self.reads_corrupted += 1
        return bytes(buf)

    async def _write_outside(self, offset: int, length: int, do: Any) -> None:
        """Drop the part of a write inside the range; do the rest with `do(off, n)`."""
        self.writes_dropped += 1
        start, end = self._range()
        if offset < start:
            await do(offset, min(start, offset + length) - offset)
        if offset + length > end:
            head = max(end, offset)
            await do(head, offset + length - head)

    # -- requests ------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        if not await self._fires_after_delay("read", offset, length):
            return await self.filtered.read(offset, length)
        if self._opt("error-reads"):
            raise self._fail("read", offset, length)
        data = await self.filtered.read(offset, length)
        return self._corrupt(offset, data) if self._opt("corrupt-reads") else data

    async def write(self, offset: int, data: bytes) -> None:
        if not await self._fires_after_delay("write", offset, len(data)):
            await self.filtered.write(offset, data)
        elif self._opt("error-writes"):
            raise self._fail("write", offset, len(data))
        elif not self._opt("drop-writes"):
            await self.filtered.write(offset, data)
        else:

            async def part(off: int, n: int) -> None:
                await self.filtered.write(off, data[off - offset : off - offset + n])

            await self._write_outside(offset, len(data), part)

    async def flush(self) -> None:
        if await self._fires_after_delay("flush") and self._opt("error-flushes"):
            raise self._fail("flush", 0, 0)
        await self.filtered.flush()

    async def discard(self, offset: int, length: int) -> None:
        if not await self._fires_after_delay("discard", offset, length):
            await self.filtered.discard(offset, length)
        elif self._opt("error-discards"):
            raise self._fail("discard", offset, length)
        elif not self._opt("drop-writes"):
            await self.filtered.discard(offset, length)
        else:
            await self._write_outside(offset, length, self.filtered.discard)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if not await self._fires_after_delay("write_zeroes", offset, length):
            await self.filtered.write_zeroes(offset, length, unmap)
        elif self._opt("error-zeroes"):
            raise self._fail("write_zeroes", offset, length)
        elif not self._opt("drop-writes"):
            await self.filtered.write_zeroes(offset, length, unmap)
        else:

            async def part(off: int, n: int) -> None:
                await self.filtered.write_zeroes(off, n, unmap)

            await self._write_outside(offset, length, part)

    # -- run time --------------------------------------------------------------------------

    def _restart(self, values: dict[str, Any]) -> None:
        """Take new rule values: new errno, maybe a new seed, counters from zero."""
        if "errno" in values:
            self._errno = parse_errno(values["errno"])
        self.options.update(values)
        if "seed" in values:
            self._rng = random.Random(self._seed(values["seed"]))
        self._matched = 0
        self._injected = 0

    async def apply_option(self, name: str, value: Any) -> None:
        try:
            self._restart({name: value})
        except OptionValueError as e:
            raise ControlError(f"node '{self.name}': option '{name}': {e}") from None

    def _rules_text(self) -> str:
        lines = [f"{name} = {spec.render(self._opt(name))}" for name, spec in RULE_OPTIONS.items()]
        return "\n".join(lines) + "\n"

    async def _write_rules(self, text: str) -> None:
        """`key=value` pairs (spaces, commas or newlines between them); `clear` resets."""
        values: dict[str, Any] = {}
        for token in text.replace(",", " ").split():
            if token == "clear":
                values.update({name: spec.default for name, spec in RULE_OPTIONS.items()})
                continue
            key, sep, raw = token.partition("=")
            spec = RULE_OPTIONS.get(key.strip())
            if not sep or spec is None:
                known = ", ".join(RULE_OPTIONS)
                raise ControlError(
                    f"node '{self.name}': rules: expected key=value or 'clear', got {token!r} "
                    f"(keys: {known})"
                )
            try:
                values[spec.name] = spec.parse(raw.strip())
                if spec.name == "errno":
                    parse_errno(values["errno"])
            except OptionValueError as e:
                raise ControlError(
                    f"node '{self.name}': rules: option '{spec.name}': {e}"
                ) from None
        self._restart(values)

    def controls(self) -> dict[str, Control]:
        return {
            "rules": Control(
                read=self._rules_text,
                write=self._write_rules,
                help="the fault rule as key = value lines; write key=value pairs, or 'clear'",
            )
        }

    def driver_stats(self) -> dict[str, Any]:
        return {
            "matched": getattr(self, "_matched", 0),
            "injected": getattr(self, "_injected", 0),
            "errors_injected": getattr(self, "errors_injected", 0),
            "reads_corrupted": getattr(self, "reads_corrupted", 0),
            "writes_dropped": getattr(self, "writes_dropped", 0),
            "requests_delayed": getattr(self, "requests_delayed", 0),
        }
