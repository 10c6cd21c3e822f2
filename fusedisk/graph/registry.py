"""The driver registry: every Node subclass with a `driver` name in fusedisk.formats
and fusedisk.filters, found by importing those packages.

Discovery instead of a hand-kept list means a new driver is one new file (or
package) and nothing else to edit.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from functools import cache
from typing import Any

from fusedisk.graph.node import Node

DRIVER_PACKAGES = ("fusedisk.formats", "fusedisk.filters")


@cache
def drivers() -> dict[str, type[Node]]:
    """Driver name -> class, for every driver shipped with fusedisk."""
    found: dict[str, type[Node]] = {}
    for package_name in DRIVER_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__, package_name + "."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                name = cls.__dict__.get("driver")
                if issubclass(cls, Node) and name and cls.__module__.startswith(info.name):
                    if name in found and found[name] is not cls:
                        raise RuntimeError(f"driver {name!r} is defined twice")
                    found[name] = cls
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
