"""The TOML spec: parsed, checked and turned into plain, typed configuration.

Everything that can be checked without touching an image is checked here, so
a wrong spec is refused before anything is opened, created or mounted.  Each
error is one sentence naming the spec file, the node (or disk) and the option.
Opening the images (missing file, bad header) is the graph's job and happens,
too, before the mount.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusedisk.errors import SpecError
from fusedisk.fuse.names import MOUNT_ROOT_FILES
from fusedisk.graph.node import ChildSlot, Node
from fusedisk.graph.options import REQUIRED, Option, OptionValueError, option_table
from fusedisk.graph.registry import drivers
from fusedisk.spec_types import DiskSpec, NodeSpec, Spec

_MAX_ID = (1 << 32) - 2  # uid_t; (uid_t)-1 means "no change" to chown
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")

DISK_OPTIONS = option_table(
    Option("node", "str", REQUIRED, "the top node of the disk"),
    Option("mode", "int", 0o600, "permission bits of <disk>.img", minimum=0, maximum=0o7777),
    Option("uid", "int", 0, "owner of <disk>.img", minimum=0, maximum=_MAX_ID),
    Option("gid", "int", 0, "group of <disk>.img", minimum=0, maximum=_MAX_ID),
    Option("read-only", "bool", False, "refuse writes to the disk"),
    Option(
        "detect-zeroes",
        "str",
        "off",
        "turn all-zero writes into write-zeroes requests (unmap: may free space)",
        choices=("off", "on", "unmap"),
    ),
    Option("growable", "bool", False, "let truncate(2) on <disk>.img grow the disk"),
)


def _section_options() -> dict[str, Mapping[str, Option]]:
    """Top-level sections that drivers declare (throttle-groups, ...)."""
    sections: dict[str, Mapping[str, Option]] = {}
    for cls in drivers().values():
        sections.update(getattr(cls, "spec_sections", {}))
    return sections


def _flatten_options(table: Mapping[str, Any], specs: Mapping[str, Option]) -> dict[str, Any]:
    """QEMU's dotted option names: TOML reads `cache.direct = true` (and `cache =
    { direct = true }`) as a nested table; an option named `cache.direct` takes it."""
    flat: dict[str, Any] = {}
    for key, raw in table.items():
        if isinstance(raw, dict) and key not in specs:
            for sub, value in _flatten_options(
                {f"{key}.{k}": v for k, v in raw.items()}, specs
            ).items():
                flat[sub] = value
        else:
            flat[key] = raw
    return flat


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.nodes: dict[str, NodeSpec] = {}

    def fail(self, where: str, message: str) -> SpecError:
        return SpecError(f"{self.path}: {where}: {message}")

    def parse_options(
        self, where: str, table: Mapping[str, Any], specs: Mapping[str, Option]
    ) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, raw in _flatten_options(table, specs).items():
            spec = specs.get(key)
            if spec is None:
                known = ", ".join(sorted(specs)) or "none"
                raise self.fail(where, f"unknown option '{key}' (known options: {known})")
            try:
                values[key] = spec.parse(raw, self.path.parent)
            except OptionValueError as e:
                raise self.fail(where, f"option '{key}': {e}") from None
        for key, spec in specs.items():
            if key not in values:
                if spec.required:
                    raise self.fail(where, f"option '{key}' is required")
                values[key] = spec.default
        return values

    def add_node(self, name: str, table: Any, inline: bool, where: str) -> str:
        if not isinstance(table, dict):
            raise self.fail(where, "expected a table of options")
        if name in self.nodes:
            raise self.fail(where, f"a node named '{name}' is defined twice")
        driver = table.get("driver")
        if driver is None:
            raise self.fail(where, "option 'driver' is required")
        cls = drivers().get(driver) if isinstance(driver, str) else None
        if cls is None:
            known = ", ".join(drivers())
            raise self.fail(where, f"option 'driver': unknown driver {driver!r} (known: {known})")
        table = dict(table)
        del table["driver"]
        slots = {s.name: s for s in cls.child_slots}
        if "filename" in table and cls.accepts_filename and "filename" not in cls.all_options():
            if "file" in table:
                raise self.fail(where, "give either 'file' or 'filename', not both")
            table["file"] = {"driver": "file", "filename": table.pop("filename")}
        spec = NodeSpec(name, driver, {}, inline=inline)
        self.nodes[name] = spec
        option_table_ = {k: v for k, v in table.items() if k not in slots}
        spec.options = self.parse_options(where, option_table_, cls.all_options())
        for slot in cls.child_slots:
            if table.get(slot.name) == "" and not slot.required and not slot.many:
                spec.options[slot.name] = None  # QEMU's `backing: null`: explicitly none
            elif slot.name in table:
                spec.children[slot.name] = self.child_refs(name, slot, table[slot.name], where)
            elif slot.required:
                raise self.fail(where, f"child '{slot.name}' is required")
        return name

    def child_refs(self, parent: str, slot: ChildSlot, value: Any, where: str) -> str | list[str]:
        here = f"{where}: option '{slot.name}'"
        if slot.many:
            if not isinstance(value, list) or not value:
                raise self.fail(where, f"option '{slot.name}': expected a list of nodes")
            return [
                self.child_ref(f"{parent}.{slot.name}.{i}", item, f"{here}[{i}]")
                for i, item in enumerate(value)
            ]
        return self.child_ref(f"{parent}.{slot.name}", value, here)

    def child_ref(self, inline_name: str, value: Any, where: str) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return self.add_node(inline_name, value, True, where)
        raise self.fail(where, f"expected a node name or an inline table, got {value!r}")


def _check_name(parser: _Parser, where: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise parser.fail(where, "a name may hold letters, digits and _ . + - only")


def _check_disk_entries(parser: _Parser, disks: Mapping[str, Any]) -> None:
    """Each disk shows as NAME.img and NAME/ at the mount's root: no two disks may share
    an entry (disks `a` and `a.img`); the root's own files are checked in parse_spec."""
    owners: dict[str, str] = {}
    for disk in disks:
        for entry in (disk, f"{disk}.img"):
            if entry in owners:
                raise parser.fail(
                    f"disk '{disk}'", f"its mount entry '{entry}' is also disk '{owners[entry]}''s"
                )
            owners[entry] = disk


def _check_references(parser: _Parser, spec: Spec) -> None:
    used_by: dict[str, str] = {}

    def use(child: str, user: str, where: str) -> None:
        if child not in spec.nodes:
            raise parser.fail(where, f"there is no node named '{child}'")
        if child in used_by:
            raise parser.fail(
                where, f"node '{child}' is already used by {used_by[child]}; a node has one parent"
            )
        used_by[child] = user

    for node in list(spec.nodes.values()):
        for slot, ref in node.children.items():
            for i, child in enumerate([ref] if isinstance(ref, str) else ref):
                suffix = f"[{i}]" if isinstance(ref, list) else ""
                use(child, f"node '{node.name}'", f"node '{node.name}': option '{slot}'{suffix}")
    for disk in spec.disks.values():
        use(disk.node, f"disk '{disk.name}'", f"disk '{disk.name}': option 'node'")

    # A cycle is a chain of parents that comes back to its start.
    for start in spec.nodes:
        seen = [start]
        current = start
        while current in used_by and used_by[current].startswith("node '"):
            current = used_by[current][len("node '") : -1]
            if current in seen:
                chain = " -> ".join([*seen[seen.index(current) :], current])
                raise parser.fail(f"node '{start}'", f"the children form a cycle: {chain}")
            seen.append(current)


def parse_spec(text: str, path: Path) -> Spec:
    """Check a spec's text; `path` names it in errors and anchors relative paths."""
    path = path.absolute()
    parser = _Parser(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise SpecError(f"{path}: not valid TOML for fusedisk: nested too deeply") from None
    sections = _section_options()
    for key in doc:
        if key not in ("nodes", "disks", *sections):
            known = ", ".join(["nodes", "disks", *sections])
            raise parser.fail(f"[{key}]", f"unknown section (known sections: {known})")
    for key in ("nodes", "disks", *sections):
        if not isinstance(doc.get(key, {}), dict):
            raise parser.fail(f"[{key}]", "expected a table")
    if not doc.get("disks"):
        raise parser.fail("[disks]", "the spec declares no disk")

    for name, table in doc.get("nodes", {}).items():
        _check_name(parser, f"node '{name}'", name)
        parser.add_node(name, table, False, f"node '{name}'")

    disks: dict[str, DiskSpec] = {}
    for name, table in doc["disks"].items():
        where = f"disk '{name}'"
        _check_name(parser, where, name)
        taken = {*MOUNT_ROOT_FILES, *sections} & {name, name.removesuffix(".img")}
        if taken:
            raise parser.fail(where, f"the name is taken at the mount's root by '{taken.pop()}'")
        if not isinstance(table, dict):
            raise parser.fail(where, "expected a table of options")
        values = parser.parse_options(where, table, DISK_OPTIONS)
        disks[name] = DiskSpec(
            name=name,
            node=values["node"],
            mode=values["mode"],
            uid=values["uid"],
            gid=values["gid"],
            read_only=values["read-only"],
            detect_zeroes=values["detect-zeroes"],
            growable=values["growable"],
        )

    _check_disk_entries(parser, disks)
    extra: dict[str, dict[str, dict[str, Any]]] = {}
    for section, options in sections.items():
        extra[section] = {}
        for name, table in doc.get(section, {}).items():
            where = f"[{section}.{name}]"
            if not isinstance(table, dict):
                raise parser.fail(where, "expected a table of options")
            extra[section][name] = parser.parse_options(where, table, options)

    spec = Spec(path, parser.nodes, disks, extra)
    _check_references(parser, spec)
    _inherit_read_only(spec)
    return spec


def _inherit_read_only(spec: Spec) -> None:
    """A read-only node's children open read-only too, as QEMU's inherit: its image is
    never written, and the image lock (hostio/locking.py) then lets others read it."""

    def mark(name: str) -> None:
        node = spec.nodes[name]
        node.options["read-only"] = True
        for ref in node.children.values():
            for child in [ref] if isinstance(ref, str) else ref:
                mark(child)

    for node in list(spec.nodes.values()):
        if node.options.get("read-only"):
            mark(node.name)


def load_spec(path: str | Path) -> Spec:
    """Read and check the spec file at `path`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec: {e.strerror}") from None
    return spec_from_bytes(data, path)


def spec_from_bytes(data: bytes, path: Path) -> Spec:
    """Check a spec file's bytes: UTF-8 TOML, as the TOML standard says."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start} is {data[e.start]:#x})") from None
    return parse_spec(text, path)


def node_class(spec: NodeSpec) -> type[Node]:
    return drivers()[spec.driver]
