"""Where a LUKS passphrase comes from: a key file, an environment variable, the terminal.

An environment variable is taken out of the process once read: removed from
os.environ (so programs the daemon starts do not inherit it) and overwritten
in the process's original environment block, which /proc/PID/environ shows
to anyone who may read it (the same user, root).  The value is kept here, in
the process's memory only, so that a node reopened later finds it again.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Awaitable, Callable

import trio

from fusedisk.errors import OpenError

MAX_KEY_FILE = 8 << 20  # cryptsetup's default limit on --key-file

#: passphrases taken from the environment, by variable name
_taken: dict[str, bytes] = {}


def read_key_file(path: str, where: str) -> bytes:
    """The raw bytes of a key file, as cryptsetup --key-file reads them (no newline stripped)."""
    try:
        with open(path, "rb") as f:
            key = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise OpenError(f"{where}: cannot read '{path}': {e.strerror}") from None
    if len(key) > MAX_KEY_FILE:
        raise OpenError(f"{where}: '{path}' is larger than {MAX_KEY_FILE} bytes")
    if not key:
        raise OpenError(f"{where}: '{path}' is empty")
    return key


def read_key_env(name: str, where: str) -> bytes:
    """The variable's value; the variable is then scrubbed from the environment."""
    value = os.environb.get(name.encode())
    if value is not None:
        _taken[name] = value
        scrub_environment(name)
    value = _taken.get(name)
    if value is None:
        raise OpenError(f"{where}: environment variable '{name}' is not set")
    if not value:
        raise OpenError(f"{where}: environment variable '{name}' is empty")
    return value


def ask_passphrase(prompt: str, where: str, confirm: bool = False) -> bytes:
    """Ask on the terminal (blocking: call it on a worker thread)."""
    if not sys.stdin.isatty():
        raise OpenError(
            f"{where}: no key given: set option 'key-file' or 'passphrase-env' "
            "(standard input is not a terminal, so the passphrase cannot be asked)"
        )
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Verify passphrase: ") != first:
        raise OpenError(f"{where}: the passphrases do not match")
    if not first:
        raise OpenError(f"{where}: the passphrase is empty")
    return first.encode()


def _environment_block() -> tuple[int, int] | None:
    """(start, end) addresses of the environment block exec gave this process."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    # env_start and env_end are fields 50 and 51 of stat(5); fields[0] is field 3
    if len(fields) < 49:
        return None
    return int(fields[47]), int(fields[48])


def scrub_environment(name: str) -> bool:
    """Take `name` out of os.environ and zero its value in /proc/self/environ's block.

    Returns whether the block held it.  Best effort: without /proc/self/mem
    (a hardened kernel), only os.environ is cleaned.
    """
    os.environb.pop(name.encode(), None)
    block = _environment_block()
    if block is None:
        return False
    start, end = block
    prefix = name.encode() + b"="
    try:
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            env = mem.read(end - start)
            found = False
            at = 0
            for entry in env.split(b"\0"):
                if entry.startswith(prefix):
                    mem.seek(start + at + len(prefix))
                    mem.write(bytes(len(entry) - len(prefix)))
                    found = True
                at += len(entry) + 1
            return found
    except OSError:
        return False


def file_reader(path: str, where: str) -> tuple[Callable[[int, int], Awaitable[bytes]], int]:
    """(read(offset, length), size) for a detached header file, read on a worker thread."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise OpenError(f"{where}: cannot read '{path}': {e.strerror}") from None

    def pread(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    async def read(offset: int, length: int) -> bytes:
        try:
            data = await trio.to_thread.run_sync(pread, offset, length)
        except OSError as e:
            raise OpenError(f"{where}: cannot read '{path}': {e.strerror}") from None
        if len(data) < length:
            raise OpenError(f"{where}: '{path}' ends at byte {offset + len(data)}")
        return data

    return read, size
