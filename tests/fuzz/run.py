"""Run one fuzz target under atheris (coverage-guided, libFuzzer):

    python -m tests.fuzz.run TARGET [libFuzzer options] [CORPUS_DIR ...]

e.g. `python -m tests.fuzz.run qcow2 -max_total_time=60 tests/fuzz/corpus/qcow2`.
fusedisk's modules are instrumented for coverage; a crash (an exception other than a
FuseDiskError, a timeout, too much memory) stops the run with a non-zero status and
leaves the input as `crash-*` (see -artifact_prefix). Put each such input under
tests/fuzz/regressions/TARGET/ and fix the bug: tests/test_fuzz.py replays them all.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import atheris

with atheris.instrument_imports(include=["fusedisk"]):
    import fusedisk

    # every module now, so drivers the registry would load later are instrumented too
    for _info in pkgutil.walk_packages(fusedisk.__path__, "fusedisk."):
        if not _info.name.endswith("__main__"):
            importlib.import_module(_info.name)
    from tests.fuzz.targets import TARGETS


def main() -> None:
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
