"""TLS both ways: `fusedisk serve --tls-creds` and the nbd driver's `tls-creds`.

Certificates come from openssl (a CA, a server and a client certificate, in
QEMU's tls-creds-x509 folder layout); the other ends are libnbd (nbdinfo),
QEMU (qemu-io) and nbdkit, so both sides are checked against independent
implementations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fusedisk.errors import OpenError
from fusedisk.export.nbd import protocol as p
from fusedisk.graph.graph import Graph
from fusedisk.spec import load_spec
from tests.conftest import make_image, needs, raw_spec
from tests.nbd_helpers import RawClient, Server, external_servers, file_bytes, run_tool

pytestmark = [pytest.mark.timeout(90), needs("openssl", "nbdinfo", "qemu-io", "nbdkit")]

MiB = 1 << 20


def make_credentials(folder: Path) -> tuple[Path, Path]:
    """A CA and a server and a client certificate signed by it: (server dir, client dir)."""
    folder.mkdir()

    def openssl(*args: object) -> None:
        run_tool("openssl", *args)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        folder / "ca-key.pem",
        "-out",
        folder / "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fusedisk test CA",
    )
    dirs = []
    for who, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        out = folder / who
        out.mkdir()
        ext = folder / f"{who}.ext"
        ext.write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            f"extendedKeyUsage={usage}\nkeyUsage=digitalSignature,keyEncipherment\n"
        )
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            out / f"{who}-key.pem",
            "-out",
            folder / f"{who}.csr",
            "-subj",
            "/CN=localhost",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            folder / f"{who}.csr",
            "-CA",
            folder / "ca-cert.pem",
            "-CAkey",
            folder / "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            out / f"{who}-cert.pem",
            "-extfile",
            ext,
        )
        (out / "ca-cert.pem").write_bytes((folder / "ca-cert.pem").read_bytes())
        dirs.append(out)
    return dirs[0], dirs[1]


@pytest.fixture
def creds(tmp_path):
    return make_credentials(tmp_path / "pki")


def test_the_export_requires_tls_and_serves_libnbd_and_qemu(tmp_path, write_spec, creds):
    server_dir, client_dir = creds
    image = make_image(tmp_path / "d0.img", 8 * MiB)
    server = Server(write_spec(raw_spec()), tmp_path / "tls.sock", ("--tls-creds", str(server_dir)))
    try:
        sock = server.sock
        size = run_tool(
            "nbdinfo", "--size", f"nbds+unix:///vm0?socket={sock}&tls-certificates={client_dir}"
        ).stdout
        assert size.strip() == str(8 * MiB)
        plain = run_tool("nbdinfo", "--size", server.uri, check=False)
        assert plain.returncode != 0 and "requires TLS" in plain.stderr
        qemu = run_tool(
            "qemu-io",
            "--object",
            f"tls-creds-x509,id=t0,dir={client_dir},endpoint=client",
            "--image-opts",
            f"driver=nbd,server.type=unix,server.path={sock},export=vm0,"
            "tls-creds=t0,tls-hostname=localhost",
            "-c",
            "write -P 0x6b 1M 1M",
            "-c",
            "read -P 0x6b 1M 1M",
        ).stdout
        assert "Pattern verification failed" not in qemu
    finally:
        server.stop()
    assert file_bytes(image, MiB, 4) == b"\x6b" * 4
    assert "TLS required" in server.log


def test_a_client_without_a_certificate_is_refused(tmp_path, write_spec, creds):
    server_dir, client_dir = creds
    make_image(tmp_path / "d0.img", MiB)
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    (anonymous / "ca-cert.pem").write_bytes((client_dir / "ca-cert.pem").read_bytes())
    server = Server(write_spec(raw_spec()), tmp_path / "tls.sock", ("--tls-creds", str(server_dir)))
    try:
        result = run_tool(
            "nbdinfo",
            "--size",
            f"nbds+unix:///vm0?socket={server.sock}&tls-certificates={anonymous}",
            check=False,
        )
        assert result.returncode != 0
        run_tool(
            "nbdinfo",
            "--size",
            f"nbds+unix:///vm0?socket={server.sock}&tls-certificates={client_dir}",
        )
    finally:
        server.stop()


def test_missing_credentials_are_refused_with_the_file_named(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", MiB)
    (tmp_path / "empty").mkdir()
    result = run_tool(
        sys.executable,
        "-m",
        "fusedisk",
        "serve",
        "--tls-creds",
        tmp_path / "empty",
        "--nbd",
        f"unix:{tmp_path / 's.sock'}",
        write_spec(raw_spec()),
        check=False,
    )
    assert result.returncode == 1 and "'ca-cert.pem' is missing" in result.stderr


def spec_with(sock: Path, extra: str) -> str:
    return (
        f'[nodes.remote]\ndriver = "nbd"\nserver.path = "{sock}"\n{extra}\n'
        '[disks.vm0]\nnode = "remote"\n'
    )


async def test_the_driver_speaks_tls_to_nbdkit_and_to_fusedisk(tmp_path, write_spec, creds):
    server_dir, client_dir = creds
    with external_servers() as start:
        kit = tmp_path / "kit.sock"
        start(
            kit,
            "nbdkit",
            "-f",
            "-U",
            kit,
            "--tls=require",
            f"--tls-certificates={server_dir}",
            "--tls-verify-peer",
            "memory",
            "8M",
        )
        spec = tmp_path / "d.toml"
        spec.write_text(spec_with(kit, f'tls-creds = "{client_dir}"'))
        graph = await Graph.open(load_spec(spec))
        try:
            disk = graph.disks["vm0"]
            await disk.write(4096, b"secret" * 100)
            assert await disk.read(4096, 600) == b"secret" * 100
        finally:
            await graph.close()
        spec.write_text(spec_with(kit, ""))  # no TLS: nbdkit refuses
        with pytest.raises(OpenError, match="cannot open export"):
            await Graph.open(load_spec(spec))

    image = make_image(tmp_path / "own.img", 4 * MiB)
    own_spec = tmp_path / "own.toml"
    own_spec.write_text(raw_spec("own.img"))
    server = Server(own_spec, tmp_path / "own.sock", ("--tls-creds", str(server_dir)))
    try:
        spec.write_text(spec_with(server.sock, f'export = "vm0"\ntls-creds = "{client_dir}"'))
        graph = await Graph.open(load_spec(spec))
        try:
            await graph.disks["vm0"].write(0, b"tls both ways")
            await graph.disks["vm0"].flush()
        finally:
            await graph.close()
    finally:
        server.stop()
    assert file_bytes(image, 0, 13) == b"tls both ways"


def test_options_before_tls_and_a_garbage_tls_handshake(tmp_path, write_spec, creds):
    server_dir, client_dir = creds
    make_image(tmp_path / "d0.img", MiB)
    server = Server(write_spec(raw_spec()), tmp_path / "tls.sock", ("--tls-creds", str(server_dir)))
    try:
        bad = RawClient(server.sock)
        bad.greeting()
        assert bad.option(p.OPT_LIST)[-1][0] == p.REP_ERR_TLS_REQD
        assert bad.option(p.OPT_STARTTLS)[-1][0] == p.REP_ACK
        bad.s.sendall(b"\x16\x03\x01" + bytes(200))  # not a ClientHello
        assert bad.closed_by_server()
        bad.close()
        uri = f"nbds+unix:///vm0?socket={server.sock}&tls-certificates={client_dir}"
        run_tool("nbdinfo", "--size", uri)
    finally:
        server.stop()
    assert "TLS handshake failed" in server.log


def test_export_name_before_starttls_is_hung_up_on_without_a_reply(tmp_path, write_spec, creds):
    from tests.test_nbd_bad_clients import export_name_answer

    server_dir, _ = creds
    make_image(tmp_path / "d0.img", MiB)
    server = Server(write_spec(raw_spec()), tmp_path / "tls.sock", ("--tls-creds", str(server_dir)))
    try:
        bad = RawClient(server.sock)
        bad.greeting()
        assert export_name_answer(bad, b"vm0") == b""
        bad.close()
    finally:
        server.stop()
    assert "before TLS" in server.log
