"""Find libnbd's Python binding, which Debian ships for its own python3 only.

python3-libnbd installs `nbd.py` and `libnbdmod.cpython-311-<arch>.so` in
/usr/lib/python3/dist-packages, a folder a virtualenv made from another
Python 3.11 build (pyenv's) does not search.  The extension's ABI is that of
CPython 3.11, so any 3.11 loads it: we load exactly those two files by path,
rather than putting Debian's whole dist-packages on sys.path (whose other
modules would shadow or clash with the venv's).  PyPI has no libnbd binding
matching bookworm's libnbd 1.14 (the `nbd` name there is another project).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

DEBIAN_FOLDERS = ("/usr/lib/python3/dist-packages",)


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


@cache
def libnbd() -> ModuleType:
    """The `nbd` module; ImportError with what to install if there is none."""
    try:
        import nbd

        return nbd
    except ImportError:
        pass
    for folder in map(Path, DEBIAN_FOLDERS):
        wrapper = folder / "nbd.py"
        if not wrapper.exists():
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            extension = folder / f"libnbdmod{suffix}"
            if extension.exists():
                if "libnbdmod" not in sys.modules:
                    _load("libnbdmod", extension)
                return _load("nbd", wrapper)
    raise ImportError(
        "libnbd's Python binding for this Python "
        f"({sys.version_info.major}.{sys.version_info.minor}) is not installed "
        "(Debian: apt install python3-libnbd)"
    )
