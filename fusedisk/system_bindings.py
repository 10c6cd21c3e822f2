"""Loading a C binding that Debian ships for its own python3 only (libnbd, Ceph).

python3-libnbd, python3-rados and python3-rbd install their extension modules in
/usr/lib/python3/dist-packages, a folder a virtualenv made from another Python 3.11
build (pyenv's) does not search.  The extensions' ABI is CPython 3.11's, so any
3.11 loads them: the drivers load exactly the files they need by path, rather
than putting Debian's whole dist-packages on sys.path, whose other modules would
shadow or clash with the venv's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DEBIAN_FOLDERS = ("/usr/lib/python3/dist-packages",)


def load_by_path(name: str, path: Path) -> ModuleType:
    """Import the module file `path` as `name` (and keep it in sys.modules)."""
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


def debian_extension(name: str) -> Path | None:
    """Debian's extension module `name` for this Python's ABI, if installed."""
    for folder in map(Path, DEBIAN_FOLDERS):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            extension = folder / f"{name}{suffix}"
            if extension.exists():
                return extension
    return None


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"
