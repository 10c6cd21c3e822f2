"""`fusedisk create -f rbd rbd:POOL/IMAGE:conf=... SIZE` and `fusedisk info rbd:...`.

Both are short blocking calls made by the command line (no event loop): they
connect with the same options and bounds as the node (target.py, client.py).
"""

from __future__ import annotations

import errno
from typing import Any

from fusedisk.errors import OpenError, SpecError
from fusedisk.formats.rbd.client import RbdError, Target, connect_cluster, open_image
from fusedisk.formats.rbd.librbd import bindings
from fusedisk.formats.rbd.target import parse_filename, target_of
from fusedisk.graph.options import Option, option_table

#: how long create and info wait for the cluster
TIMEOUT = 10.0

CREATE_OPTIONS = option_table(
    Option(
        "cluster_size",
        "size",
        4 << 20,
        "the object size: a power of two, 4 KiB to 32 MiB (QEMU's name)",
    ),
)


def _target(name: str) -> Target:
    try:
        options = parse_filename(name)
    except ValueError as e:
        raise SpecError(str(e)) from None
    return target_of(options, f"'{name}'")


def create_image(
    name: str,
    size: int | None,
    options: dict[str, Any],
    backing: str | None = None,
    backing_format: str | None = None,
) -> None:
    """Create the image `name` names, of `size` bytes; its pool must exist."""
    if size is None:
        raise SpecError(f"'{name}': an rbd image needs a size")
    if backing:
        raise SpecError(f"'{name}': rbd images take no backing file (use an rbd clone)")
    order = int(options.get("cluster_size") or 4 << 20).bit_length() - 1
    if not 12 <= order <= 25 or 1 << order != int(options.get("cluster_size") or 4 << 20):
        raise SpecError(f"'{name}': option 'cluster_size' must be a power of two, 4K-32M")
    target = _target(name)
    if target.snapshot:
        raise SpecError(f"'{name}': create an image, not a snapshot (drop '@...')")
    rados, rbd = bindings()
    try:
        cluster = connect_cluster(target, TIMEOUT)
    except RbdError as e:
        raise OpenError(f"'{name}': {e}") from None
    try:
        try:
            ioctx = cluster.open_ioctx(target.pool)
        except rados.Error as e:
            raise OpenError(f"'{name}': cannot open pool '{target.pool}': {e}") from None
        try:
            if target.namespace:
                ioctx.set_namespace(target.namespace)
            rbd.RBD().create(ioctx, target.image, size, order=order, old_format=False)
        except rbd.ImageExists:
            raise OpenError(f"'{name}': image '{target.spec()}' exists already") from None
        except rbd.Error as e:
            raise OpenError(f"'{name}': cannot create '{target.spec()}': {e}") from None
        finally:
            ioctx.close()
    finally:
        cluster.shutdown()


def image_info(name: str) -> dict[str, Any]:
    """`qemu-img info`'s names for an rbd image (format raw, as QEMU shows it)."""
    target = _target(name)
    try:
        cluster, ioctx, image = open_image(target, True, False, TIMEOUT)
    except RbdError as e:
        if e.errno == errno.ENOENT:
            raise OpenError(f"'{name}': {e}") from None
        raise OpenError(f"'{name}': {e}") from None
    try:
        stat = image.stat()
        snaps = sorted(image.list_snaps(), key=lambda s: s["id"])
        extents: list[int] = []  # the objects that exist: qemu-img's actual-size
        image.diff_iterate(0, image.size(), None, lambda o, n, e: extents.append(n * e))
        info: dict[str, Any] = {
            "filename": name,
            "format": "raw",
            "virtual-size": image.size(),
            "actual-size": sum(extents),
            "cluster-size": stat["obj_size"],
            "dirty-flag": False,
            "format-specific": {
                "type": "rbd",
                "data": {
                    "image": target.spec(),
                    "features": image.features(),
                    "object-size": stat["obj_size"],
                    "block-name-prefix": stat["block_name_prefix"],
                },
            },
        }
        if snaps:
            info["snapshots"] = [
                {"id": str(s["id"]), "name": s["name"], "vm-state-size": 0,
                 "date-sec": 0, "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0}
                for s in snaps
            ]  # fmt: skip
        return info
    finally:
        image.close()
        ioctx.close()
        cluster.shutdown()
