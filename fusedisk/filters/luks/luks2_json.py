"""The LUKS2 JSON metadata: keyslots, segments, digests, config, tokens.

Parsed into checked dataclasses before anything is derived from it: every
number has a range (the areas and refusals are checked in luks2_checks.py).
The text is at most hdr_size - 4096 bytes (≤ 4 MiB - 4 KiB), the objects at
most 32 of a kind, nesting bounded by Python's json parser
(RecursionError is caught), so a hostile header costs bounded work.

Numbers that may exceed 2^53 (offsets, sizes) are strings in the JSON, as
the format says; small ones (key_size, stripes, kdf costs) are numbers.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from fusedisk.filters.luks.cipher import SECTOR_SIZES

MAX_OBJECTS = 32  # keyslots, tokens, segments, digests: cryptsetup's limit
MAX_STRIPES = 4000  # cryptsetup writes and accepts 4000 only
MAX_KEY_BYTES = 64  # aes-xts-plain64 512-bit: the largest key fusedisk's ciphers take
#: Argon2 costs cryptsetup accepts: memory in KiB, parallel lanes, passes
ARGON2_MAX_MEMORY_KIB = 4 << 20  # 4 GiB
ARGON2_MIN_MEMORY_KIB = 32
ARGON2_MAX_PARALLEL = 4
ARGON2_MIN_TIME = 1
ARGON2_MAX_TIME = (1 << 32) - 1
#: passes × memory: cryptsetup's own choices (≤ 4 GiB, a few seconds) stay far below; a
#: hostile header past it (4 GiB × 2^20 passes...) would hold the daemon for days
ARGON2_MAX_WORK_KIB = 64 << 20  # 64 GiB·passes, ~1-2 min here
PBKDF2_MAX_ITERATIONS = (1 << 31) - 1  # cryptography's PBKDF2 limit
MAX_SALT_BYTES = 1024
#: token types cryptsetup handles itself; any other needs an external plugin
BUILTIN_TOKENS = ("luks2-keyring",)
PBKDF2_HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512")


class MetadataError(ValueError):
    """The JSON is malformed or out of range (the header is damaged)."""


@dataclass(frozen=True)
class Kdf:
    type: str  # "pbkdf2", "argon2i", "argon2id"
    salt: bytes
    hash: str = ""  # pbkdf2
    iterations: int = 0  # pbkdf2
    time: int = 0  # argon2
    memory: int = 0  # argon2, KiB
    cpus: int = 0  # argon2


@dataclass(frozen=True)
class Keyslot:
    id: int
    type: str
    key_size: int
    af_stripes: int
    af_hash: str
    area_offset: int
    area_size: int
    area_encryption: str
    area_key_size: int
    kdf: Kdf
    priority: int = 1  # 0 ignore, 1 normal, 2 high

    @property
    def material_size(self) -> int:
        """Bytes of split key material, rounded up to whole 512-byte sectors."""
        return -(-self.key_size * self.af_stripes // 512) * 512


@dataclass(frozen=True)
class Segment:
    id: int
    type: str
    offset: int
    size: int | None  # None: "dynamic", to the device's end
    iv_tweak: int
    encryption: str
    sector_size: int
    integrity: bool = False
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Digest:
    id: int
    type: str
    keyslots: tuple[int, ...]
    segments: tuple[int, ...]
    hash: str
    iterations: int
    salt: bytes
    digest: bytes


@dataclass(frozen=True)
class Metadata:
    keyslots: dict[int, Keyslot]
    segments: dict[int, Segment]
    digests: dict[int, Digest]
    tokens: dict[int, dict[str, Any]]
    json_size: int
    keyslots_size: int
    flags: tuple[str, ...] = ()
    requirements: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)


# -- typed access ------------------------------------------------------------------


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MetadataError(f"{what} is not a JSON object")
    return value


def _str(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise MetadataError(f"{what}: '{key}' is missing or not a string")
    return value


def _int(obj: dict[str, Any], key: str, what: str, low: int, high: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetadataError(f"{what}: '{key}' is missing or not an integer")
    if not low <= value <= high:
        raise MetadataError(f"{what}: '{key}' = {value} is outside {low}..{high}")
    return value


def _u64(obj: dict[str, Any], key: str, what: str) -> int:
    """A uint64 written as a decimal string, as the format stores offsets and sizes."""
    value = obj.get(key)
    if not isinstance(value, str) or not value.isdigit() or len(value) > 20:
        raise MetadataError(f"{what}: '{key}' is missing or not a decimal string")
    number = int(value)
    if number >= 1 << 64:
        raise MetadataError(f"{what}: '{key}' = {number} does not fit 64 bits")
    return number


def _b64(obj: dict[str, Any], key: str, what: str) -> bytes:
    text = _str(obj, key, what)
    if len(text) > MAX_SALT_BYTES * 2:
        raise MetadataError(f"{what}: '{key}' is too long")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MetadataError(f"{what}: '{key}' is not base64") from None


def _ids(obj: dict[str, Any], what: str) -> list[tuple[int, Any]]:
    if len(obj) > MAX_OBJECTS:
        raise MetadataError(f"{what}: {len(obj)} entries, at most {MAX_OBJECTS}")
    out = []
    for key, value in obj.items():
        if not key.isdigit() or len(key) > 3 or int(key) >= MAX_OBJECTS:
            raise MetadataError(f"{what}: '{key}' is not an id 0..{MAX_OBJECTS - 1}")
        out.append((int(key), value))
    return out


def _id_list(obj: dict[str, Any], key: str, what: str) -> tuple[int, ...]:
    value = obj.get(key)
    if not isinstance(value, list) or len(value) > MAX_OBJECTS:
        raise MetadataError(f"{what}: '{key}' is not a list of ids")
    ids = []
    for item in value:
        if not isinstance(item, str) or not item.isdigit() or len(item) > 3:
            raise MetadataError(f"{what}: '{key}' holds {item!r}, not an id string")
        ids.append(int(item))
    return tuple(ids)


# -- the parts ----------------------------------------------------------------------


def _kdf(obj: dict[str, Any], what: str) -> Kdf:
    kind = _str(obj, "type", what)
    salt = _b64(obj, "salt", what)
    if kind == "pbkdf2":
        hash_name = _str(obj, "hash", what)
        iterations = _int(obj, "iterations", what, 1, PBKDF2_MAX_ITERATIONS)
        return Kdf(kind, salt, hash=hash_name, iterations=iterations)
    if kind in ("argon2i", "argon2id"):
        time = _int(obj, "time", what, ARGON2_MIN_TIME, ARGON2_MAX_TIME)
        memory = _int(obj, "memory", what, 1, 1 << 62)
        if memory > ARGON2_MAX_MEMORY_KIB:
            raise MetadataError(
                f"{what}: Argon2 memory of {memory} KiB is past the {ARGON2_MAX_MEMORY_KIB} KiB "
                "(4 GiB) that cryptsetup allows; refusing to allocate it"
            )
        cpus = _int(obj, "cpus", what, 1, 1 << 24)
        if cpus > ARGON2_MAX_PARALLEL:
            raise MetadataError(
                f"{what}: Argon2 parallel cost {cpus} is past the {ARGON2_MAX_PARALLEL} that "
                "cryptsetup allows"
            )
        if memory < max(ARGON2_MIN_MEMORY_KIB, 8 * cpus):
            raise MetadataError(f"{what}: Argon2 memory of {memory} KiB is below the minimum")
        if len(salt) < 8:
            raise MetadataError(f"{what}: an Argon2 salt of {len(salt)} bytes (at least 8)")
        if time * memory > ARGON2_MAX_WORK_KIB:
            raise MetadataError(
                f"{what}: Argon2 cost of {time} passes over {memory} KiB is past fusedisk's cap "
                f"of {ARGON2_MAX_WORK_KIB >> 20} GiB·passes; refusing to spend that long"
            )
        return Kdf(kind, salt, time=time, memory=memory, cpus=cpus)
    raise MetadataError(f"{what}: key derivation {kind!r} is not supported")


def _keyslot(ident: int, obj: dict[str, Any]) -> Keyslot:
    what = f"keyslot {ident}"
    kind = _str(obj, "type", what)
    if kind != "luks2":
        # e.g. "reencrypt": kept as is, refused by refusals()
        return Keyslot(ident, kind, 0, 0, "", 0, 0, "", 0, Kdf("none", b""), 0)
    af = _obj(obj.get("af"), f"{what} af")
    area = _obj(obj.get("area"), f"{what} area")
    if _str(af, "type", f"{what} af") != "luks1" or _str(area, "type", f"{what} area") != "raw":
        raise MetadataError(f"{what}: only af type 'luks1' and area type 'raw' exist")
    priority = obj.get("priority", 1)
    if priority not in (0, 1, 2) or isinstance(priority, bool):
        raise MetadataError(f"{what}: priority {priority!r} is not 0, 1 or 2")
    return Keyslot(
        id=ident,
        type=kind,
        key_size=_int(obj, "key_size", what, 1, MAX_KEY_BYTES),
        af_stripes=_int(af, "stripes", f"{what} af", MAX_STRIPES, MAX_STRIPES),
        af_hash=_str(af, "hash", f"{what} af"),
        area_offset=_u64(area, "offset", f"{what} area"),
        area_size=_u64(area, "size", f"{what} area"),
        area_encryption=_str(area, "encryption", f"{what} area"),
        area_key_size=_int(area, "key_size", f"{what} area", 1, MAX_KEY_BYTES),
        kdf=_kdf(_obj(obj.get("kdf"), f"{what} kdf"), f"{what} kdf"),
        priority=priority,
    )


def _segment(ident: int, obj: dict[str, Any]) -> Segment:
    what = f"segment {ident}"
    kind = _str(obj, "type", what)
    size_text = obj.get("size")
    size = None if size_text == "dynamic" else _u64(obj, "size", what)
    flags = obj.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise MetadataError(f"{what}: 'flags' is not a list of strings")
    if kind != "crypt":
        return Segment(
            ident, kind, _u64(obj, "offset", what), size, 0, "", 512, False, tuple(flags)
        )
    sector_size = _int(obj, "sector_size", what, 512, 4096)
    if sector_size not in SECTOR_SIZES:
        raise MetadataError(f"{what}: sector_size {sector_size} is not one of {SECTOR_SIZES}")
    return Segment(
        id=ident,
        type=kind,
        offset=_u64(obj, "offset", what),
        size=size,
        iv_tweak=_u64(obj, "iv_tweak", what),
        encryption=_str(obj, "encryption", what),
        sector_size=sector_size,
        integrity="integrity" in obj,
        flags=tuple(flags),
    )


def _digest(ident: int, obj: dict[str, Any]) -> Digest:
    what = f"digest {ident}"
    kind = _str(obj, "type", what)
    if kind != "pbkdf2":
        raise MetadataError(f"{what}: digest type {kind!r} is not supported (only pbkdf2)")
    digest = _b64(obj, "digest", what)
    if not 16 <= len(digest) <= 64:
        raise MetadataError(f"{what}: a digest of {len(digest)} bytes")
    return Digest(
        id=ident,
        type=kind,
        keyslots=_id_list(obj, "keyslots", what),
        segments=_id_list(obj, "segments", what),
        hash=_str(obj, "hash", what),
        iterations=_int(obj, "iterations", what, 1, PBKDF2_MAX_ITERATIONS),
        salt=_b64(obj, "salt", what),
        digest=digest,
    )


def parse_metadata(text: bytes, hdr_size: int) -> Metadata:
    """The checked metadata of a copy whose JSON area holds `text` (MetadataError if bad)."""
    if len(text) > hdr_size - 4096:
        raise MetadataError("the JSON is larger than its area")
    try:
        root = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MetadataError(f"the JSON does not parse ({type(e).__name__})") from None
    root = _obj(root, "the JSON metadata")
    parts = {k: _obj(root.get(k), f"'{k}'") for k in ("keyslots", "segments", "digests", "config")}
    tokens = _obj(root.get("tokens", {}), "'tokens'")
    config = parts["config"]
    json_size = _u64(config, "json_size", "config")
    if json_size != hdr_size - 4096:
        raise MetadataError(f"config json_size {json_size} does not match the header's area")
    requirements: tuple[str, ...] = ()
    if "requirements" in config:
        req = _obj(config["requirements"], "config requirements")
        mandatory = req.get("mandatory", [])
        if not isinstance(mandatory, list) or not all(isinstance(r, str) for r in mandatory):
            raise MetadataError("config requirements: 'mandatory' is not a list of strings")
        requirements = tuple(mandatory[:MAX_OBJECTS])
    flags = config.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise MetadataError("config flags: not a list of strings")
    token_map: dict[int, dict[str, Any]] = {}
    for i, t in _ids(tokens, "tokens"):
        token = _obj(t, f"token {i}")
        _str(token, "type", f"token {i}")
        _id_list(token, "keyslots", f"token {i}")
        token_map[i] = token
    keyslots = _ids(parts["keyslots"], "keyslots")
    segments = _ids(parts["segments"], "segments")
    digests = _ids(parts["digests"], "digests")
    return Metadata(
        keyslots={i: _keyslot(i, _obj(v, f"keyslot {i}")) for i, v in keyslots},
        segments={i: _segment(i, _obj(v, f"segment {i}")) for i, v in segments},
        digests={i: _digest(i, _obj(v, f"digest {i}")) for i, v in digests},
        tokens=token_map,
        json_size=json_size,
        keyslots_size=_u64(config, "keyslots_size", "config"),
        flags=tuple(flags),
        requirements=requirements,
        raw=root,
    )
