"""What fusedisk refuses in LUKS2 metadata, and the layout checks of its areas.

Run on parsed metadata (luks2_json.py) before any key derivation: refusals()
names a feature fusedisk cannot honour (re-encryption, unknown requirements,
integrity, several segments), check_layout() what makes the header damaged
(areas outside the key slot area, overlapping, a segment inside the header).
"""

from __future__ import annotations

from fusedisk.filters.luks.luks2_json import BUILTIN_TOKENS, Metadata, MetadataError


def refusals(meta: Metadata) -> str | None:
    """Why fusedisk cannot open this volume, as a phrase, or None."""
    for req in meta.requirements:
        if req.startswith("online-reencrypt"):
            return (
                f"an online re-encryption is in progress (requirement {req!r}); finish it with "
                "`cryptsetup reencrypt --resume-only` first"
            )
        return f"it has requirement {req!r}, which fusedisk does not know"
    if any(k.type == "reencrypt" for k in meta.keyslots.values()):
        return "a re-encryption keyslot is present (re-encryption in progress)"
    crypt = [s for s in meta.segments.values()]
    if len(crypt) != 1:
        return f"{len(crypt)} data segments (a re-encryption in progress, or none at all)"
    seg = crypt[0]
    if seg.type != "crypt":
        return f"segment {seg.id} has type {seg.type!r} (only 'crypt' is supported)"
    if seg.integrity:
        return f"segment {seg.id} uses integrity protection (dm-integrity), which is not supported"
    return None


def plugin_tokens(meta: Metadata) -> list[str]:
    """Descriptions of tokens that need a cryptsetup plugin (fusedisk never runs them)."""
    return [
        f"token {i} ({t['type']})"
        for i, t in meta.tokens.items()
        if t["type"] not in BUILTIN_TOKENS
    ]


def check_layout(meta: Metadata, hdr_size: int, device_size: int | None) -> None:
    """Key slot areas inside the key slot area and apart; the segment after them.

    `device_size` is the size of the device holding the header (None: unknown).
    Raises MetadataError.
    """
    area_start = 2 * hdr_size
    area_end = area_start + meta.keyslots_size
    if device_size is not None and area_end > device_size:
        raise MetadataError(
            f"the key slot areas end at byte {area_end}, past the device's {device_size} bytes"
        )
    spans: list[tuple[int, int, int]] = []
    for ks in meta.keyslots.values():
        if ks.type != "luks2":
            continue
        end = ks.area_offset + ks.area_size
        if ks.area_offset < area_start or end > area_end:
            raise MetadataError(
                f"keyslot {ks.id}'s area (bytes {ks.area_offset}-{end}) is outside the key slot "
                f"areas (bytes {area_start}-{area_end})"
            )
        if ks.material_size > ks.area_size:
            raise MetadataError(f"keyslot {ks.id}'s key material does not fit its area")
        for other, start, stop in spans:
            if ks.area_offset < stop and start < end:
                raise MetadataError(f"keyslots {other} and {ks.id} overlap")
        spans.append((ks.id, ks.area_offset, end))
    for seg in meta.segments.values():
        if seg.offset and seg.offset < area_end:
            raise MetadataError(f"segment {seg.id} starts at byte {seg.offset}, inside the header")
        if seg.offset % 512 or (seg.size is not None and seg.size % seg.sector_size):
            raise MetadataError(f"segment {seg.id}'s offset or size is not sector aligned")
