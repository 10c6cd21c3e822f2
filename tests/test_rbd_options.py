"""The rbd driver's option checks and QEMU's `rbd:` names, without a cluster."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fusedisk.errors import OpenError
from fusedisk.formats.rbd.target import (
    auth_methods,
    client_settings,
    mon_host,
    parse_filename,
    read_key_file,
    target_of,
)


def test_qemu_file_names():
    name = r"rbd:pool/ns/img@snap:conf=/etc/c\:1.conf:id=u:rados_osd_op_timeout=5"
    assert parse_filename(name) == {
        "pool": "pool", "namespace": "ns", "image": "img", "snapshot": "snap",
        "conf": "/etc/c:1.conf", "user": "u",
        "rados-options": {"rados_osd_op_timeout": "5"},
    }  # fmt: skip
    assert parse_filename("rbd:rbd/vm0") == {"pool": "rbd", "image": "vm0"}
    for bad in ("rbd:onlypool", "rbd:a/b/c/d", "nbd:x/y", "rbd:p/i:novalue"):
        with pytest.raises(ValueError):
            parse_filename(bad)


def test_servers_become_mon_host():
    servers = [{"host": "127.0.0.1", "port": "3300"}, {"host": "::1", "port": 6789}]
    assert mon_host(servers, "w") == "127.0.0.1:3300,[::1]:6789"
    for bad in ([], [{"host": ""}], [{"host": "a", "port": "0"}], [{"host": "a", "x": 1}], "h"):
        with pytest.raises(OpenError, match=r"^w"):
            mon_host(bad, "w")


def test_client_options_and_auth_methods():
    assert client_settings({"rados_osd_op_timeout": 5, "rbd_cache": False}, "w") == {
        "rados_osd_op_timeout": "5", "rbd_cache": "false",
    }  # fmt: skip
    with pytest.raises(OpenError, match="not a client option name"):
        client_settings({"a=b": 1}, "w")
    assert auth_methods(["cephx", "none"], "w") == "cephx;none"
    assert auth_methods("cephx", "w") == "cephx"
    with pytest.raises(OpenError):
        auth_methods("krb5", "w")


def test_key_files_are_confined_like_images(tmp_path):
    key = tmp_path / "k"
    key.write_text("  AQBsecret==\n")
    assert read_key_file(str(key), "w") == "AQBsecret=="
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OpenError, match="is a FIFO"):  # refused without blocking
        read_key_file(str(fifo), "node 'r': option 'key-file'")
    with pytest.raises(OpenError, match="is a directory"):
        read_key_file(str(tmp_path), "w")
    (tmp_path / "big").write_bytes(b"x" * 5000)
    with pytest.raises(OpenError, match="larger than"):
        read_key_file(str(tmp_path / "big"), "w")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(OpenError, match="is empty"):
        read_key_file(str(tmp_path / "empty"), "w")


def test_required_options_are_named():
    with pytest.raises(OpenError, match="node 'r': option 'pool' is required"):
        target_of({"image": "x"}, "node 'r'")
    with pytest.raises(OpenError, match="node 'r': option 'image' is required"):
        target_of({"pool": "x"}, "node 'r'")


def test_missing_bindings_say_what_to_install(tmp_path):
    """Without Debian's python3-rbd the node names the package, in one sentence."""
    code = (
        "import fusedisk.formats.rbd.librbd as l, fusedisk.system_bindings as b, sys\n"
        "b.DEBIAN_FOLDERS = ()\n"
        "sys.modules.pop('rados', None); sys.modules.pop('rbd', None)\n"
        "sys.path = [p for p in sys.path if 'dist-packages' not in p]\n"
        "try:\n    l.bindings()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "apt install --no-install-recommends python3-rados python3-rbd" in out


def test_a_conf_that_is_no_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "ceph.conf"
    os.mkfifo(fifo)
    with pytest.raises(OpenError, match=r"node 'r': option 'conf': .* is a FIFO"):
        target_of({"pool": "p", "image": "i", "conf": str(fifo)}, "node 'r'")
