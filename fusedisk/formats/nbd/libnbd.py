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

import sys
from functools import cache
from types import ModuleType

from fusedisk.system_bindings import DEBIAN_FOLDERS, debian_extension, load_by_path, python_version


@cache
def libnbd() -> ModuleType:
    """The `nbd` module; ImportError with what to install if there is none."""
    try:
        import nbd

        return nbd
    except ImportError:
        pass
    extension = debian_extension("libnbdmod")
    wrapper = extension.parent / "nbd.py" if extension is not None else None
    if extension is not None and wrapper is not None and wrapper.exists():
        if "libnbdmod" not in sys.modules:
            load_by_path("libnbdmod", extension)
        return load_by_path("nbd", wrapper)
    raise ImportError(
        f"libnbd's Python binding for this Python ({python_version()}) is not installed "
        f"(Debian: apt install python3-libnbd; looked in {', '.join(DEBIAN_FOLDERS)})"
    )
