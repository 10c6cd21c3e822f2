"""NBD test helpers: a `fusedisk serve` process, and a tiny raw client for misbehaving.

The raw client speaks just enough NBD (fixed newstyle, NBD_OPT_GO, simple
replies) to then send what a real client never would: garbage, oversized
requests, requests past the end, or a half-sent write before vanishing.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fusedisk.export.nbd import protocol as p

START_TIMEOUT = 20.0


def unix_listening(sock: Path) -> bool:
    """True once a server listens on `sock`: the file appears at bind(2), a moment
    before listen(2), and a connect in between is refused.  Read from the kernel's
    table rather than by connecting, as qemu-nbd without -t exits after one client."""
    target = str(sock)
    with open("/proc/net/unix") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == target and int(fields[3], 16) & 0x10000:
                return True
    return False


def nbd_uri(sock: Path, disk: str = "vm0") -> str:
    return f"nbd+unix:///{disk}?socket={sock}"


class Server:
    """`fusedisk serve --nbd unix:SOCK SPEC` in a subprocess, always stopped."""

    def __init__(
        self,
        spec: Path,
        sock: Path,
        extra: tuple[str, ...] = (),
        preexec_fn: Callable[[], object] | None = None,
    ) -> None:
        self.spec = spec
        self.sock = sock
        self.log_path = sock.with_suffix(".log")
        cmd = [sys.executable, "-m", "fusedisk", "serve", "--nbd", f"unix:{sock}",
               "--log-file", str(self.log_path), *extra, str(spec)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=preexec_fn)  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "serving" not in line:
            self.stop(check=False)
            raise AssertionError(f"fusedisk serve did not start: {line}\n{self.log}")

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    @property
    def uri(self) -> str:
        return nbd_uri(self.sock)

    def stop(self, check: bool = True) -> int:
        """SIGTERM and wait; with `check`, it must exit 0 with no unexpected error logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"fusedisk serve did not stop on SIGTERM:\n{self.log}") from None
        if check:
            assert status == 0, self.log
            assert "unexpected error" not in self.log, self.log
        return status


class External:
    """An NBD server program on a unix socket, stopped at the end."""

    def __init__(self, sock: Path, *cmd: object) -> None:
        self.sock = sock
        self.cmd = [str(c) for c in cmd]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> External:
        if self.sock.exists():
            self.sock.unlink()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not unix_listening(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.stop()
                raise AssertionError(f"{self.cmd[0]} did not start: {err}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@contextmanager
def external_servers() -> Iterator[Callable[..., External]]:
    """Start NBD server programs; every one is stopped at the end, pass or fail."""
    started: list[External] = []

    def start(sock: Path, *cmd: object) -> External:
        server = External(sock, *cmd)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()


class RawClient:
    """A blocking NBD client over a unix socket, for sending what it should not."""

    def __init__(self, sock: Path, timeout: float = 10.0) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(str(sock))
        self.size = 0
        self.flags = 0

    def close(self) -> None:
        self.s.close()

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.s.recv(n - len(out))
            if not chunk:
                raise EOFError(f"server closed the connection after {len(out)} of {n} bytes")
            out += chunk
        return out

    def greeting(self) -> None:
        magic, opt, _flags = p.HANDSHAKE_HEADER.unpack(self.recv(p.HANDSHAKE_HEADER.size))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        self.s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies (type, payload) up to the final one."""
        self.s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
            assert magic == p.REPLY_MAGIC and opt == option
            replies.append((kind, self.recv(length)))
            if kind != p.REP_INFO and kind != p.REP_SERVER and kind != p.REP_META_CONTEXT:
                return replies

    def go(self, name: str = "vm0") -> None:
        self.greeting()
        replies = self.option(p.OPT_GO, p.name_payload(name) + struct.pack(">H", 0))
        assert replies[-1][0] == p.REP_ACK, replies
        for kind, data in replies:
            if kind == p.REP_INFO and struct.unpack(">H", data[:2])[0] == p.INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", data[2:])

    def request(
        self, kind: int, offset: int, length: int, cookie: int = 1, flags: int = 0,
        payload: bytes = b"",
    ) -> None:  # fmt: skip
        header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, kind, cookie, offset, length)
        self.s.sendall(header + payload)

    def reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """A simple reply: (error, cookie, data); data only follows a successful read."""
        magic, error, cookie = p.SIMPLE_REPLY.unpack(self.recv(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC
        data = self.recv(data_length) if data_length and not error else b""
        return error, cookie, data

    def closed_by_server(self, wait: float = 10.0) -> bool:
        """True once the server has hung up on us."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if not self.s.recv(65536):
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
        return False


def run_tool(*cmd: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"{cmd}:\n{result.stdout}{result.stderr}"
    return result


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def serve_file_over_nbd(sock: Path, image: Path) -> Callable[[], None]:
    """`nbdkit file IMAGE` on `sock` (a third-party server); returns its stopper."""
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", str(image)],
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while not unix_listening(sock) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    if not unix_listening(sock):
        stop()
        raise AssertionError(f"nbdkit did not start on {sock}")
    return stop
