"""`fusedisk luks format|add-key|remove-key|dump`: manage the LUKS header of an image.

LUKS1 here; LUKS2 (`format --version 2`, or an image whose header is LUKS2)
in _luks_v2.py, which shares the target and key handling.

The target is an image file (`fusedisk luks dump disk.img`) or the child of a
`luks` node of a spec (`--spec vm.toml --node crypt`), reached through the
same graph code as a mount, so a luks layer over a qcow2 is managed in place.
Keys come from a file (`--key-file`, its raw bytes), an environment variable
(`--passphrase-env NAME`) or the terminal; never from the command line, where
other users could read them.  With `--spec`, the node's own key options are
the default for the existing key.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import trio

from fusedisk.errors import OpenError, SpecError
from fusedisk.filters.luks import keyslot_crypto, luks1_keyslot, luks1_manage
from fusedisk.filters.luks import luks1_header as lh
from fusedisk.filters.luks.cipher import SECTOR
from fusedisk.filters.luks.node import CIPHERS, ask_passphrase, read_key_env, read_key_file
from fusedisk.graph.edge import Edge
from fusedisk.graph.graph import Graph
from fusedisk.graph.options import OptionValueError, parse_size
from fusedisk.hostio.files import create_file
from fusedisk.spec import DiskSpec, NodeSpec, Spec, load_spec

_DISK = "luks-cli"


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", nargs="?", help="the image file (or use --spec and --node)")
    p.add_argument("--spec", help="a spec file holding the luks node")
    p.add_argument("--node", help="the luks node of --spec whose header to manage")


def _add_key_source(p: argparse.ArgumentParser, prefix: str, what: str) -> None:
    p.add_argument(
        f"--{prefix}key-file", metavar="FILE", help=f"file whose raw bytes are the {what}"
    )
    p.add_argument(
        f"--{prefix}passphrase-env", metavar="NAME", help=f"environment variable holding the {what}"
    )


def _add_pbkdf(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--iter-time",
        type=int,
        default=2000,
        metavar="MS",
        help="PBKDF2 time of the new key slot in ms (default 2000, as cryptsetup)",
    )
    p.add_argument(
        "--pbkdf2-iterations",
        type=int,
        metavar="N",
        help=f"force this PBKDF2 iteration count (at least {lh.MIN_ITERATIONS}; for tests)",
    )


def _add_luks2_kdf(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LUKS2 key slots")
    g.add_argument(
        "--pbkdf",
        choices=("argon2id", "argon2i", "pbkdf2"),
        default="argon2id",
        help="key derivation of the new LUKS2 key slot (default argon2id, as cryptsetup)",
    )
    g.add_argument(
        "--pbkdf-memory",
        type=int,
        default=1 << 20,
        metavar="KIB",
        help="Argon2 memory in KiB (default 1048576, at most half the RAM and 4 GiB)",
    )
    g.add_argument("--pbkdf-parallel", type=int, default=0, metavar="N", help="Argon2 lanes (1-4)")
    g.add_argument(
        "--pbkdf-force-iterations",
        type=int,
        metavar="N",
        help="force the Argon2 passes (≥ 4) or PBKDF2 iterations (≥ 1000) instead of --iter-time",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "luks",
        help="format a LUKS1 or LUKS2 image, add or remove key slots, show its header",
        description="Manage the LUKS1 or LUKS2 header (the version read from it) of an image "
        "file, or of the child of a luks node of a spec (--spec, --node).  Keys are read "
        "from --key-file (raw bytes, like cryptsetup --key-file), from an environment "
        "variable, or asked on the terminal.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    # one function per sub-command adds its arguments, in the order --help lists them
    _register_format(actions)
    _register_add_key(actions)
    _register_remove_key(actions)
    _register_dump(actions)


def _register_format(actions: argparse._SubParsersAction) -> None:
    f = actions.add_parser(
        "format", help="write a new LUKS header (--version 1 or 2) with one key slot"
    )
    _add_target(f)
    _add_key_source(f, "", "passphrase")
    _add_pbkdf(f)
    f.add_argument("--cipher", default="aes-xts-plain64", choices=CIPHERS)
    f.add_argument(
        "--key-size", type=int, default=512, choices=(128, 192, 256, 384, 512), metavar="BITS"
    )
    f.add_argument("--hash", default="sha256", choices=tuple(keyslot_crypto.HASHES))
    f.add_argument(
        "--size",
        help="create the image file with room for SIZE bytes of payload (e.g. 1G)",
    )
    f.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing LUKS header or data in the first MiB",
    )
    f.add_argument(
        "--version", type=int, choices=(1, 2), default=1, help="LUKS version (default 1)"
    )
    f.add_argument(
        "--sector-size",
        type=int,
        choices=(512, 1024, 2048, 4096),
        default=4096,
        help="LUKS2 encryption sector size (default 4096)",
    )
    f.add_argument("--label", default="", help="LUKS2 label")
    _add_luks2_kdf(f)
    f.set_defaults(func=run)


def _register_add_key(actions: argparse._SubParsersAction) -> None:
    a = actions.add_parser("add-key", help="add a passphrase in a free key slot")
    _add_target(a)
    _add_key_source(a, "", "existing passphrase")
    _add_key_source(a, "new-", "new passphrase")
    a.add_argument("--key-slot", type=int, metavar="N", help="use this slot (default: first free)")
    _add_pbkdf(a)
    _add_luks2_kdf(a)
    a.set_defaults(func=run)


def _register_remove_key(actions: argparse._SubParsersAction) -> None:
    r = actions.add_parser(
        "remove-key",
        help="remove the key slot a passphrase opens, or a given slot",
        description="Without --key-slot, remove the key slot that the given key opens (like "
        "cryptsetup luksRemoveKey).  With --key-slot N, wipe slot N (like luksKillSlot); the "
        "given key must then open another slot.  Removing the last key needs --force.",
    )
    _add_target(r)
    _add_key_source(r, "", "passphrase")
    r.add_argument("--key-slot", type=int, metavar="N", help="the slot to remove")
    r.add_argument(
        "--force",
        action="store_true",
        help="allow removing the last key slot, or a slot without another valid key",
    )
    r.set_defaults(func=run)


def _register_dump(actions: argparse._SubParsersAction) -> None:
    d = actions.add_parser("dump", help="show the header (no key needed)")
    _add_target(d)
    d.set_defaults(func=run)


# -- the target ------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    spec: Spec
    where: str
    key_options: dict[str, Any]


def _target(args: argparse.Namespace, read_only: bool) -> Target:
    if (args.image is None) == (args.spec is None):
        raise SpecError("give either an image file or --spec with --node")
    if args.image is not None:
        if args.node:
            raise SpecError("--node goes with --spec, not with an image file")
        path = Path(args.image).absolute()
        node = NodeSpec("image", "file", {"filename": str(path), "read-only": read_only})
        spec = Spec(path.parent / "luks.toml", {"image": node}, {_DISK: DiskSpec(_DISK, "image")})
        return Target(spec, f"'{args.image}'", {})
    if not args.node:
        raise SpecError("--spec needs --node (the luks node to manage)")
    spec = load_spec(args.spec)
    node_spec = spec.nodes.get(args.node)
    if node_spec is None or node_spec.driver != "luks":
        raise SpecError(f"{args.spec}: there is no luks node named '{args.node}'")
    child = node_spec.children["file"]
    assert isinstance(child, str)
    nodes = spec.nodes
    if read_only:
        nodes = {
            name: dataclasses.replace(n, options={**n.options, "read-only": True})
            for name, n in nodes.items()
        }
    sub = dataclasses.replace(spec, nodes=nodes, disks={_DISK: DiskSpec(_DISK, child)})
    return Target(sub, f"node '{args.node}'", dict(node_spec.options))


def _key(
    args: argparse.Namespace, prefix: str, defaults: dict[str, Any], prompt: str, confirm: bool
) -> bytes:
    key_file = getattr(args, f"{prefix}key_file")
    env = getattr(args, f"{prefix}passphrase_env")
    flag = f"--{prefix.replace('_', '-')}"
    if key_file and env:
        raise SpecError(f"give either {flag}key-file or {flag}passphrase-env, not both")
    if not key_file and not env and not prefix:
        key_file = defaults.get("key-file")
        env = defaults.get("passphrase-env")
    if key_file:
        return read_key_file(str(key_file), f"{flag}key-file")
    if env:
        return read_key_env(str(env), f"{flag}passphrase-env")
    return ask_passphrase(prompt, "fusedisk luks", confirm)


def _iterations(args: argparse.Namespace) -> int | None:
    n = args.pbkdf2_iterations
    if n is not None and n < lh.MIN_ITERATIONS:
        raise SpecError(f"--pbkdf2-iterations must be at least {lh.MIN_ITERATIONS}")
    if args.iter_time < 1:
        raise SpecError("--iter-time must be at least 1 ms")
    return n


# -- the actions ---------------------------------------------------------------------------


async def _with_device(target: Target, action: Any) -> Any:
    graph = await Graph.open(target.spec)
    try:
        return await action(graph.disks[_DISK].root)
    finally:
        await graph.close()


def _create_image(args: argparse.Namespace) -> None:
    try:
        payload = parse_size(args.size)
    except OptionValueError as e:
        raise SpecError(f"--size: {e}") from None
    if payload % SECTOR:
        raise SpecError(f"--size must be a multiple of {SECTOR} bytes")
    _, payload_sectors = lh.layout(args.key_size // 8)
    create_file(
        args.image,
        f"cannot create '{args.image}'",
        size=payload_sectors * SECTOR + payload,
        mode=0o600,
    )


def _format(args: argparse.Namespace) -> int:
    if args.size is not None:
        if args.image is None:
            raise SpecError("--size creates an image file; it does not go with --spec")
        _create_image(args)
    target = _target(args, read_only=False)
    iterations = _iterations(args)
    passphrase = _key(args, "", target.key_options, "Passphrase for the new LUKS volume: ", True)

    async def action(edge: Edge) -> lh.LuksHeader:
        if not args.force:
            await luks1_manage.check_blank(edge, target.where)
        return await luks1_manage.format_device(
            edge,
            target.where,
            passphrase,
            cipher=args.cipher,
            key_bytes=args.key_size // 8,
            hash_name=args.hash,
            iter_time_ms=args.iter_time,
            iterations=iterations,
        )

    hdr = trio.run(_with_device, target, action)
    print(
        f"{target.where}: LUKS1 {hdr.cipher}, {hdr.key_bytes * 8}-bit key, "
        f"payload at byte {hdr.payload_bytes}, key slot 0 ({hdr.slots[0].iterations} iterations)"
    )
    return 0


def _add_key(args: argparse.Namespace) -> int:
    target = _target(args, read_only=False)
    iterations = _iterations(args)
    old = _key(args, "", target.key_options, "Existing passphrase: ", False)
    new = _key(args, "new_", {}, "New passphrase: ", True)

    async def action(edge: Edge) -> int:
        hdr = await lh.read_header(edge, target.where)
        _, master_key = await luks1_keyslot.unlock(edge, hdr, old, target.where)
        return await luks1_manage.add_key(
            edge,
            hdr,
            master_key,
            new,
            target.where,
            slot_index=args.key_slot,
            iter_time_ms=args.iter_time,
            iterations=iterations,
        )

    slot = trio.run(_with_device, target, action)
    print(f"{target.where}: key slot {slot} added")
    return 0


def _remove_key(args: argparse.Namespace) -> int:
    target = _target(args, read_only=False)
    if args.key_slot is not None and args.force and not (args.key_file or args.passphrase_env):
        passphrase = None  # --force --key-slot N: no key needed, like luksKillSlot -q
    else:
        passphrase = _key(args, "", target.key_options, "Passphrase: ", False)

    async def action(edge: Edge) -> int:
        hdr = await lh.read_header(edge, target.where)
        active = hdr.active_slots()
        if args.key_slot is not None:
            victim = args.key_slot
            if victim not in active:
                raise OpenError(f"{target.where}: key slot {victim} is not in use")
            if passphrase is not None:
                opened, _ = await luks1_keyslot.unlock(edge, hdr, passphrase, target.where)
                if opened == victim and not args.force:
                    raise OpenError(
                        f"{target.where}: the key given opens slot {victim} itself; give a key "
                        "of another slot (or --force)"
                    )
        else:
            assert passphrase is not None
            victim, _ = await luks1_keyslot.unlock(edge, hdr, passphrase, target.where)
        if active == [victim] and not args.force:
            raise OpenError(
                f"{target.where}: key slot {victim} is the last one; removing it makes the "
                "data unreadable for good (use --force to do it anyway)"
            )
        await luks1_manage.remove_key(edge, hdr, victim, target.where)
        return victim

    slot = trio.run(_with_device, target, action)
    print(f"{target.where}: key slot {slot} removed")
    return 0


def _dump(args: argparse.Namespace) -> int:
    target = _target(args, read_only=True)

    async def action(edge: Edge) -> lh.LuksHeader:
        return await lh.read_header(edge, target.where)

    print(lh.dump(trio.run(_with_device, target, action)), end="")
    return 0


async def header_version(target: Target) -> int | None:
    async def action(edge: Edge) -> int | None:
        return lh.probe(await edge.read(0, min(edge.node.size, 8)))

    return await _with_device(target, action)


def run(args: argparse.Namespace) -> int:
    from fusedisk.commands import _luks_v2 as luks_v2

    if args.action == "format" and args.version == 2:
        return luks_v2.format_v2(args)
    if args.action != "format" and trio.run(header_version, _target(args, read_only=True)) == 2:
        return luks_v2.ACTIONS[args.action](args)
    actions = {
        "format": _format,
        "add-key": _add_key,
        "remove-key": _remove_key,
        "dump": _dump,
    }
    return actions[args.action](args)
