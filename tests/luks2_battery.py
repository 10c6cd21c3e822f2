"""A battery of crafted LUKS2 headers, each opened by a luks node and read from.

    python -m tests.luks2_battery FOLDER     one JSON line per case, then the peak RSS

Each case bends one thing of a valid image (tests/luks2_craft.py) with valid
checksums, so the check it aims at is reached.  An outcome is "opened" or the
FuseDiskError's sentence; anything else (a traceback) is printed as "crash".
tests/test_luks2_headers.py runs this in a subprocess under a memory limit and
a timeout: no traceback, no hang, bounded memory.
"""

from __future__ import annotations

import json
import resource
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from fusedisk.errors import FuseDiskError
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests import luks2_craft as craft

Change = Callable[[dict[str, Any]], Any]


def _set(*path: Any) -> Change:
    *keys, value = path

    def change(meta: dict[str, Any]) -> None:
        node = meta
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return change


def _del(*keys: str) -> Change:
    def change(meta: dict[str, Any]) -> None:
        node = meta
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return change


KS = ("keyslots", "0")
SEG = ("segments", "0")
DIG = ("digests", "0")
ARGON = {"type": "argon2id", "time": 4, "memory": 32, "cpus": 1, "salt": "AAAAAAAAAAAA"}


def _json_cases() -> dict[str, Change]:
    cases: dict[str, Change] = {}
    for name, values in {
        "key_size": [0, -1, 65, 1 << 40, "64", None, True],
        "priority": [3, -1, "high"],
    }.items():
        for v in values:
            cases[f"keyslot {name}={v!r}"] = _set(*KS, name, v)
    for name, values in {
        "stripes": [0, 1, 3999, 4001, 10**9],
        "hash": ["md5x", "", 5],
        "type": ["luks2", 0],
    }.items():
        for v in values:
            cases[f"af {name}={v!r}"] = _set(*KS, "af", name, v)
    for name, values in {
        "offset": ["0", "1", "9" * 30, "-5", 5, "16777216", "32769"],
        "size": ["0", "4096", str(1 << 62)],
        "encryption": ["twofish-xts-plain64", "aes-xts-bogus", "", "aes", "aes-cbc-essiv:nohash"],
        "key_size": [0, 1000, 48],
    }.items():
        for v in values:
            cases[f"area {name}={v!r}"] = _set(*KS, "area", name, v)
    for name, values in {
        "type": ["scrypt", "argon2d", None],
        "iterations": [0, -1, 1 << 40, "1000"],
        "hash": ["md5", "whirlpool"],
        "salt": ["!!!", "", "A" * 5000],
    }.items():
        for v in values:
            cases[f"kdf {name}={v!r}"] = _set(*KS, "kdf", name, v)
    for name, v in {
        "time": 2**32, "memory": (4 << 20) + 1, "cpus": 5, "cpus0": 0, "memory1": 1, "time0": 0,
        "work": 1 << 30,
    }.items():  # fmt: skip
        field = name.rstrip("01")
        kdf = {**ARGON, field: v}
        if name == "work":
            kdf = {**ARGON, "time": 1 << 30, "memory": 4 << 20}
        cases[f"argon2 {name}={v}"] = _set(*KS, "kdf", kdf)
    cases["argon2 cheap, wrong key"] = _set(*KS, "kdf", ARGON)
    cases["argon2i cheap, wrong key"] = _set(*KS, "kdf", {**ARGON, "type": "argon2i"})
    cases["argon2 salt of 4 bytes"] = _set(*KS, "kdf", {**ARGON, "salt": "AAAAAA=="})
    for name, values in {
        "offset": ["0", "5", str(1 << 64), "4096"],
        "size": ["1", "abc", "0", str(1 << 40)],
        "sector_size": [1024, 8192, 511, "4096"],
        "encryption": ["aes-cbc-plain64", "serpent-xts-plain64", "aes-xts-plain64:x"],
        "iv_tweak": ["-1", str(1 << 64), "123"],
        "type": ["linear", "crypt2"],
        "integrity": [{"type": "hmac(sha256)"}],
        "flags": ["x", [1]],
    }.items():
        for v in values:
            cases[f"segment {name}={v!r}"] = _set(*SEG, name, v)
    cases["two segments"] = _set("segments", "1", {"type": "linear", "offset": "0", "size": "0"})
    cases["no segment"] = _set("segments", {})
    for name, values in {
        "type": ["sha"],
        "digest": ["", "AAAA"],
        "iterations": [0, 1 << 40],
        "keyslots": [["99"], [], "0", [0]],
        "segments": [[]],
        "salt": ["%%"],
        "hash": ["md4"],
    }.items():
        for v in values:
            cases[f"digest {name}={v!r}"] = _set(*DIG, name, v)
    for name, values in {
        "json_size": ["0", "99999999", 12288],
        "keyslots_size": ["0", str(1 << 63), "16744449"],
        "requirements": [{"mandatory": ["online-reencrypt-v2"]}, {"mandatory": ["foo"]},
                         {"mandatory": "x"}],
        "flags": [5],
    }.items():  # fmt: skip
        for v in values:
            cases[f"config {name}={v!r}"] = _set("config", name, v)
    cases["40 tokens"] = _set("tokens", {str(i): {"type": "x", "keyslots": []} for i in range(40)})
    cases["token without type"] = _set("tokens", {"0": {"keyslots": []}})
    cases["clevis token"] = _set("tokens", {"0": {"type": "clevis", "keyslots": ["0"]}})
    cases["33 keyslots"] = _set("keyslots", {str(i): {} for i in range(33)})
    cases["keyslot id 'a'"] = _set("keyslots", {"a": {}})
    for part in ("keyslots", "segments", "digests", "config"):
        cases[f"no {part}"] = _del(part)
    return cases


TEXT_CASES = {
    "json: a list": b"[]",
    "json: a string": b'"luks"',
    "json: deep nesting": b"[" * 6000 + b"]" * 6000,
    "json: not utf-8": b'{"keyslots": "\xff\xfe"}',
    "json: truncated": b'{"keyslots": {',
    "json: empty": b"",
}

BINARY_CASES = {
    "version 3": (6, b"\0\3"),
    "hdr_size 12345": (8, (12345).to_bytes(8, "big")),
    "hdr_size 2^40": (8, (1 << 40).to_bytes(8, "big")),
    "csum_alg md5": (72, b"md5\0"),
    "csum_alg unterminated": (72, b"s" * 32),
    "hdr_offset 7": (256, (7).to_bytes(8, "big")),
    "label not ascii": (24, b"\xff\xfe\0"),
    "uuid unterminated": (168, b"u" * 40),
}

SPEC = '[nodes.crypt]\ndriver = "luks"\nfile = {{ driver = "file", filename = "{image}" }}\n' \
    'key-file = "{key}"\n[disks.vm0]\nnode = "crypt"\n'  # fmt: skip


async def _open_and_read(image: Path, key: Path) -> None:
    spec = parse_spec(SPEC.format(image=image, key=key), image.parent / "s.toml")
    graph = await Graph.open(spec)
    try:
        disk = graph.disks["vm0"]
        if disk.size:
            await disk.read(0, min(disk.size, 1 << 16))
    finally:
        await graph.close(flush=False)


def run_case(base: Path, folder: Path, name: str, bend: Callable[[Path], None]) -> dict[str, str]:
    image = folder / "case.img"
    image.write_bytes(base.read_bytes())
    key = folder / "key"
    key.write_bytes(craft.PASSPHRASE)
    try:
        bend(image)
        trio.run(_open_and_read, image, key)
        return {"case": name, "outcome": "opened"}
    except FuseDiskError as e:
        return {"case": name, "outcome": "refused", "message": str(e)}
    except Exception:  # the bug this battery looks for
        return {"case": name, "outcome": "crash", "message": traceback.format_exc()}


def cases() -> dict[str, Callable[[Path], None]]:
    out: dict[str, Callable[[Path], None]] = {}
    for name, change in _json_cases().items():
        out[name] = lambda p, c=change: craft.rewrite(p, c)
    for name, text in TEXT_CASES.items():
        out[name] = lambda p, t=text: craft.rewrite(p, text=t)
    for name, (at, value) in BINARY_CASES.items():
        out[name] = lambda p, a=at, v=value: craft.patch_binary(p, a, v)
    out["both copies damaged"] = lambda p: (craft.damage(p, 5000), craft.damage(p, 16384 + 5000))
    return out


def main() -> None:
    folder = Path(sys.argv[1])
    base = craft.make_image(folder / "base.img")
    for name, bend in cases().items():
        print(json.dumps(run_case(base, folder, name, bend)), flush=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_kib": peak_kib}))


if __name__ == "__main__":
    main()
