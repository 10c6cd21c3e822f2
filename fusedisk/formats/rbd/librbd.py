"""Find Ceph's Python bindings (`rados`, `rbd`), which Debian ships for its own python3.

python3-rados and python3-rbd install `rados.cpython-311-<arch>.so` and
`rbd.cpython-311-<arch>.so` in /usr/lib/python3/dist-packages, a folder a
virtualenv built from another Python 3.11 does not search.  Their ABI is
CPython 3.11's, so any 3.11 loads them: we load exactly those two files by
path (as formats/nbd/libnbd.py does for libnbd), `rados` first, because
`rbd` imports it.  PyPI has no binding matching the system's librbd.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

DEBIAN_FOLDERS = ("/usr/lib/python3/dist-packages",)
INSTALL_HINT = "Debian: apt install --no-install-recommends python3-rados python3-rbd"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _find(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    for folder in map(Path, DEBIAN_FOLDERS):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            extension = folder / f"{name}{suffix}"
            if extension.exists():
                return _load(name, extension)
    raise ImportError(
        f"Ceph's Python binding '{name}' for this Python "
        f"({sys.version_info.major}.{sys.version_info.minor}) is not installed ({INSTALL_HINT})"
    )


@cache
def bindings() -> tuple[ModuleType, ModuleType]:
    """The `rados` and `rbd` modules; ImportError saying what to install if missing."""
    rados = _find("rados")
    return rados, _find("rbd")
