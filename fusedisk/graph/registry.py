"""The driver registry: every Node subclass with a `driver` name in fusedisk.formats
and fusedisk.filters, found by importing those packages, plus the drivers other
packages declare under the `fusedisk.drivers` entry-point group.

Discovery instead of a hand-kept list means a new driver is one new package and
nothing else to edit.  Commands (`create`, `info`) and format detection ask the
drivers' own slots (graph/driver_slots.py) through the functions below.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
from functools import cache
from types import ModuleType
from typing import Any

from fusedisk.errors import SpecError
from fusedisk.graph.driver_slots import DriverSlots
from fusedisk.graph.node import Node
from fusedisk.hostio.files import read_head

DRIVER_PACKAGES = ("fusedisk.formats", "fusedisk.filters")
#: the entry-point group under which another package declares its driver modules
ENTRY_POINT_GROUP = "fusedisk.drivers"
#: bytes read to probe a format, as QEMU reads (BLOCK_PROBE_BUF_SIZE)
PROBE_BYTES = 2048


def _module_drivers(module: ModuleType, prefix: str) -> list[type[Node]]:
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Node)
        and cls.__dict__.get("driver")
        and cls.__module__.startswith(prefix)
    ]


def _modules() -> list[tuple[ModuleType, str]]:
    found = []
    for package_name in DRIVER_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__, package_name + "."):
            found.append((importlib.import_module(info.name), info.name))
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        module = importlib.import_module(entry.value.partition(":")[0])
        found.append((module, module.__name__))
    return found


@cache
def drivers() -> dict[str, type[Node]]:
    """Driver name -> class, for every driver shipped with fusedisk."""
    found: dict[str, type[Node]] = {}
    for module, prefix in _modules():
        for cls in _module_drivers(module, prefix):
            if cls.driver in found and found[cls.driver] is not cls:
                raise RuntimeError(f"driver {cls.driver!r} is defined twice")
            found[cls.driver] = cls
    return dict(sorted(found.items()))


def driver_class(name: str) -> type[Node] | None:
    return drivers().get(name)


def default_options(driver: str) -> dict[str, Any]:
    """Every option of `driver` at its default: a node made by fusedisk, not by a spec."""
    return {name: option.default for name, option in drivers()[driver].all_options().items()}


def overlay_driver() -> type[Node]:
    """The driver a snapshot inserts as an overlay: found by capability, not by name."""
    found = [cls for cls in drivers().values() if cls.makes_overlays]
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} drivers declare makes_overlays; expected one")
    return found[0]


def _overrides(cls: type[Node], slot: str) -> bool:
    for klass in cls.__mro__:
        if slot in klass.__dict__:
            return klass is not DriverSlots
    return False


def creatable_drivers() -> dict[str, type[Node]]:
    """Drivers `fusedisk create -f` can make images of."""
    return {name: cls for name, cls in drivers().items() if cls.creatable()}


def describable_drivers() -> dict[str, type[Node]]:
    """Drivers `fusedisk info -f` can describe."""
    return {name: cls for name, cls in drivers().items() if _overrides(cls, "info")}


def probe_head(head: bytes) -> type[Node]:
    """The driver most sure that an image starting with `head` is its own (QEMU's
    bdrv_probe_all: the highest score wins; raw takes what nobody claims)."""
    scored = [(cls.probe(head), name) for name, cls in drivers().items()]
    score, name = max(scored)
    if score <= 0:
        raise SpecError("no driver recognises the image")
    return drivers()[name]


def protocol_driver(target: str) -> type[Node] | None:
    """The leaf driver whose images are named `PROTOCOL:...`, if `target` is one."""
    prefix, sep, _ = target.partition(":")
    if not sep:
        return None
    for cls in drivers().values():
        if cls.protocol == prefix:
            return cls
    return None


def image_driver(target: str, fmt: str | None, where: str) -> type[Node]:
    """The driver of an existing image: named by `fmt`, claimed by a protocol prefix,
    or probed from the file's first bytes."""
    if fmt is not None:
        cls = drivers().get(fmt)
        if cls is None:
            raise SpecError(f"{where}: unknown format {fmt!r} (known: {', '.join(drivers())})")
        return cls
    by_protocol = protocol_driver(target)
    if by_protocol is not None:
        return by_protocol
    return probe_head(read_head(target, PROBE_BYTES, where))


def virtual_size(target: str, fmt: str | None, where: str) -> int:
    """The size a guest sees of an existing image (an overlay made without a size)."""
    return int(image_driver(target, fmt, where).info(target)["virtual-size"])
