"""`fusedisk luks` on LUKS2: format --version 2, add-key, remove-key, dump.

Same targets and key sources as LUKS1 (luks.py); the header work is
luks2_manage.py's, each header write flushed before the next step.
"""

from __future__ import annotations

import argparse
from typing import Any

import trio

from fusedisk.errors import OpenError, SpecError
from fusedisk.filters.luks import luks1_manage
from fusedisk.filters.luks import luks2_json as lj
from fusedisk.filters.luks import luks2_manage as lm
from fusedisk.filters.luks import luks2_volume as l2
from fusedisk.graph.edge import Edge
from fusedisk.graph.options import OptionValueError, parse_size
from fusedisk.hostio.files import create_file


def _luks() -> Any:
    from fusedisk.commands import luks

    return luks


def kdf_choice(args: argparse.Namespace) -> lm.KdfChoice:
    forced = args.pbkdf_force_iterations
    floor = 1000 if args.pbkdf == "pbkdf2" else 4
    if forced is not None and forced < floor:
        raise SpecError(f"--pbkdf-force-iterations must be at least {floor} for {args.pbkdf}")
    if not 0 <= args.pbkdf_parallel <= lj.ARGON2_MAX_PARALLEL:
        raise SpecError(f"--pbkdf-parallel must be 1-{lj.ARGON2_MAX_PARALLEL}")
    if not lj.ARGON2_MIN_MEMORY_KIB <= args.pbkdf_memory <= lj.ARGON2_MAX_MEMORY_KIB:
        raise SpecError(
            f"--pbkdf-memory must be {lj.ARGON2_MIN_MEMORY_KIB}-{lj.ARGON2_MAX_MEMORY_KIB} KiB"
        )
    if args.iter_time < 1:
        raise SpecError("--iter-time must be at least 1 ms")
    return lm.KdfChoice(
        type=args.pbkdf,
        iter_time_ms=args.iter_time,
        iterations=forced,
        memory_kib=args.pbkdf_memory,
        parallel=args.pbkdf_parallel,
    )


def _writer(edge: Edge) -> lm.Write:
    async def write(offset: int, data: bytes) -> None:
        await edge.write(offset, data)
        await edge.flush()

    return write


async def load(edge: Edge, where: str) -> l2.Luks2Volume:
    return await l2.load(edge.read, edge.node.size, edge.node.size, where)


def _create_image(args: argparse.Namespace) -> None:
    try:
        payload = parse_size(args.size)
    except OptionValueError as e:
        raise SpecError(f"--size: {e}") from None
    if payload % args.sector_size:
        raise SpecError(f"--size must be a multiple of {args.sector_size} bytes")
    create_file(
        args.image,
        f"cannot create '{args.image}'",
        size=lm.PAYLOAD_OFFSET + payload,
        mode=0o600,
    )


def format_v2(args: argparse.Namespace) -> int:
    luks = _luks()
    if args.size is not None:
        if args.image is None:
            raise SpecError("--size creates an image file; it does not go with --spec")
        _create_image(args)
    target = luks._target(args, read_only=False)
    kdf = kdf_choice(args)
    passphrase = luks._key(
        args, "", target.key_options, "Passphrase for the new LUKS volume: ", True
    )

    async def action(edge: Edge) -> dict[str, Any]:
        if not args.force:
            await luks1_manage.check_blank(edge, target.where)
        return await lm.format_volume(
            _writer(edge), edge.node.size, target.where, passphrase, cipher=args.cipher,
            key_bytes=args.key_size // 8, sector_size=args.sector_size, kdf=kdf, label=args.label,
        )  # fmt: skip

    meta = trio.run(luks._with_device, target, action)
    seg, slot = meta["segments"]["0"], meta["keyslots"]["0"]
    print(
        f"{target.where}: LUKS2 {seg['encryption']}, {args.key_size}-bit key, "
        f"{seg['sector_size']}-byte sectors, payload at byte {seg['offset']}, "
        f"key slot 0 ({slot['kdf']['type']})"
    )
    return 0


def _add_key(args: argparse.Namespace) -> int:
    luks = _luks()
    target = luks._target(args, read_only=False)
    kdf = kdf_choice(args)
    old = luks._key(args, "", target.key_options, "Existing passphrase: ", False)
    new = luks._key(args, "new_", {}, "New passphrase: ", True)

    async def action(edge: Edge) -> int:
        volume = await load(edge, target.where)
        _, volume_key = await l2.unlock(edge.read, volume, old, target.where)
        return await lm.add_key(
            _writer(edge), volume, volume_key, new, target.where, args.key_slot, kdf
        )

    slot = trio.run(luks._with_device, target, action)
    print(f"{target.where}: key slot {slot} added")
    return 0


def _remove_key(args: argparse.Namespace) -> int:
    luks = _luks()
    target = luks._target(args, read_only=False)
    if args.key_slot is not None and args.force and not (args.key_file or args.passphrase_env):
        passphrase = None  # --force --key-slot N: no key needed, like luksKillSlot -q
    else:
        passphrase = luks._key(args, "", target.key_options, "Passphrase: ", False)

    async def action(edge: Edge) -> int:
        volume = await load(edge, target.where)
        active = volume.active_keyslots()
        if args.key_slot is not None:
            victim = args.key_slot
            if victim not in active:
                raise OpenError(f"{target.where}: key slot {victim} is not in use")
            if passphrase is not None:
                opened, _ = await l2.unlock(edge.read, volume, passphrase, target.where)
                if opened == victim and not args.force:
                    raise OpenError(
                        f"{target.where}: the key given opens slot {victim} itself; give a key "
                        "of another slot (or --force)"
                    )
        else:
            assert passphrase is not None
            victim, _ = await l2.unlock(edge.read, volume, passphrase, target.where)
        if active == [victim] and not args.force:
            raise OpenError(
                f"{target.where}: key slot {victim} is the last one; removing it makes the "
                "data unreadable for good (use --force to do it anyway)"
            )
        await lm.remove_key(_writer(edge), volume, victim, target.where)
        return victim

    slot = trio.run(luks._with_device, target, action)
    print(f"{target.where}: key slot {slot} removed")
    return 0


def _dump(args: argparse.Namespace) -> int:
    luks = _luks()
    target = luks._target(args, read_only=True)

    async def action(edge: Edge) -> dict[str, Any]:
        return (await load(edge, target.where)).info()

    for key, value in trio.run(luks._with_device, target, action).items():
        print(f"{key}: {value}")
    return 0


ACTIONS = {"add-key": _add_key, "remove-key": _remove_key, "dump": _dump}
