"""The slots a driver fills to own its whole job beyond requests: recognising,
creating and describing images.

QEMU's `struct BlockDriver` is the model (include/block/block_int-common.h):
`bdrv_probe` scores how sure a format is that the first bytes are its own,
`bdrv_co_create_opts` with `create_opts` makes a new image from `-o` options
the driver declares, `bdrv_get_specific_info` describes one, and
`protocol_name` claims targets written `proto:...`.  `fusedisk create`,
`fusedisk info` and format detection ask the registry, which asks these
slots; no table of formats lives anywhere else, so a new driver is one new
package.

Every slot is a classmethod: it works on an image that is not opened as a
node (qemu-img's tools do the same), and its defaults say "not mine".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from fusedisk.errors import NotSupported
from fusedisk.graph.options import Option

#: probe scores, as QEMU uses them: a magic number is certain, raw takes anything
PROBE_CERTAIN = 100
PROBE_FALLBACK = 1


class DriverSlots:
    """Mixed into Node: the image-level slots, all refusing by default."""

    driver: ClassVar[str] = ""
    #: a leaf whose images are named `PROTOCOL:...` rather than by a host file (rbd)
    protocol: ClassVar[str | None] = None
    #: the `-o` options of `fusedisk create -f DRIVER`; None: the driver creates nothing
    create_options: ClassVar[Mapping[str, Option] | None] = None
    #: `fusedisk create -b BACKING` is allowed (the format has backing files)
    creates_overlays_of_backing: ClassVar[bool] = False

    @classmethod
    def probe(cls, head: bytes) -> int:
        """How sure the driver is that an image starting with `head` is its format:
        0 not at all, PROBE_CERTAIN for a magic number (QEMU's bdrv_probe)."""
        return 0

    @classmethod
    def create(
        cls,
        target: str,
        size: int | None,
        options: dict[str, Any],
        backing: str | None = None,
        backing_format: str | None = None,
    ) -> None:
        """Make a new, empty image at `target` (`size` None: the backing file's).

        `options` holds every name of `create_options`, parsed.  An existing
        image is never replaced.  Raises SpecError for bad parameters,
        OpenError when the target cannot be written.
        """
        raise NotSupported(f"driver '{cls.driver}' cannot create images")

    @classmethod
    def info(cls, target: str) -> dict[str, Any]:
        """The driver's part of `fusedisk info`, in `qemu-img info --output=json`'s
        names: at least `virtual-size`; `format-specific`, `backing-filename`,
        `dirty-flag`... where the format has them.  Reads, never writes, and shows
        no secret."""
        raise NotSupported(f"driver '{cls.driver}' cannot describe images")

    @classmethod
    def creatable(cls) -> bool:
        return cls.create_options is not None
