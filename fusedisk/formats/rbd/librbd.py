"""Find Ceph's Python bindings (`rados`, `rbd`), which Debian ships for its own python3.

python3-rados and python3-rbd install `rados.cpython-311-<arch>.so` and
`rbd.cpython-311-<arch>.so` in /usr/lib/python3/dist-packages, a folder a
virtualenv built from another Python 3.11 does not search.  Their ABI is
CPython 3.11's, so any 3.11 loads them: we load exactly those two files by
path (as formats/nbd/libnbd.py does for libnbd), `rados` first, because
`rbd` imports it.  PyPI has no binding matching the system's librbd.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from types import ModuleType

from fusedisk.system_bindings import debian_extension, load_by_path, python_version

INSTALL_HINT = "Debian: apt install --no-install-recommends python3-rados python3-rbd"


def _find(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    extension = debian_extension(name)
    if extension is not None:
        return load_by_path(name, extension)
    raise ImportError(
        f"Ceph's Python binding '{name}' for this Python ({python_version()}) is not "
        f"installed ({INSTALL_HINT})"
    )


@cache
def bindings() -> tuple[ModuleType, ModuleType]:
    """The `rados` and `rbd` modules; ImportError saying what to install if missing."""
    rados = _find("rados")
    return rados, _find("rbd")
