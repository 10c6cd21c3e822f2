"""`fusedisk demo [DIR]`: make demo images and a spec in DIR, and mount them.

The quickest way to see fusedisk: it writes nothing outside DIR, reuses the
images if they exist, and prints how to use and unmount the result.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fusedisk.commands import mount as mount_command

DEMO_SPEC = """\
# The fusedisk demo: two disks over raw images in this folder.

[nodes.system]
driver = "raw"
filename = "system.img"

[nodes.data-part]
driver = "raw"
file = { driver = "file", filename = "data.img" }
offset = "1M"            # a window: the first MiB of data.img is not part of the disk

[disks.vm0]
node = "system"
detect-zeroes = "unmap"  # zero writes punch holes in system.img

[disks.data]
node = "data-part"
"""

IMAGES = {"system.img": 256 << 20, "data.img": 65 << 20}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="create demo images and mount a demo tree",
        description="Create sparse demo images and a spec in DIR (default "
        "/tmp/fusedisk-demo), mount them at DIR/mnt in the background, and say how to "
        "use and unmount them.",
    )
    p.add_argument("dir", nargs="?", default="/tmp/fusedisk-demo", help="the work folder")
    p.set_defaults(func=run)


def prepare(folder: Path) -> Path:
    """Create the demo images (sparse) and spec in `folder`; returns the spec's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in IMAGES.items():
        image = folder / name
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(size)
    spec = folder / "demo.toml"
    spec.write_text(DEMO_SPEC)
    (folder / "mnt").mkdir(exist_ok=True)
    return spec


def run(args: argparse.Namespace) -> int:
    folder = Path(args.dir).absolute()
    mnt = folder / "mnt"
    if os.path.ismount(mnt):
        print(f"the demo is already mounted at {mnt}; unmount it with: fusermount3 -u {mnt}")
        return 1
    spec = prepare(folder)
    mount_args = argparse.Namespace(
        spec=str(spec), mountpoint=str(mnt), foreground=False, allow_other=False,
        log_file=str(folder / "fusedisk.log"), debug=False,
    )  # fmt: skip
    status = mount_command.run(mount_args)
    if status != 0:
        return status
    print(
        f"""fusedisk demo mounted at {mnt} (spec: {spec}, log: {folder / 'fusedisk.log'})

  ls -l {mnt}                         the disks: vm0.img, data.img
  ls {mnt}/vm0/nodes/                 each disk's tree of nodes (driver, options/, stats, ...)
  cat {mnt}/vm0/nodes/system/stats    request counters
  mkfs.ext4 -F {mnt}/vm0.img          use a disk like any image (qemu, qemu-io, losetup...)
  qemu-img info {mnt}/vm0.img

Unmount with: fusermount3 -u {mnt}"""
    )
    return 0
