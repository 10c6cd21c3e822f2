"""`fusedisk demo [DIR]`: make demo images and a spec in DIR, and mount them.

The quickest way to see fusedisk: it writes nothing outside DIR, reuses the
images if they exist, and prints how to use and unmount the result.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fusedisk.commands import mount as mount_command
from fusedisk.errors import SpecError
from fusedisk.formats.qcow2.create import create_qcow2
from fusedisk.fuse.kernel import ring
from fusedisk.hostio.files import write_new_file

DEMO_SPEC = """\
# The fusedisk demo: the seed tree -- a throttled, encrypted quorum of three
# qcow2 images -- and a plain raw scratch disk beside it.

[throttle-groups.demo]
iops-total = 5000
bps-total = "200M"

[nodes.thr]
driver = "throttle"
file = "crypt"
throttle-group = "demo"

[nodes.crypt]
driver = "luks"
file = "q"
key-file = "demo.key"
format = true            # formats the quorum on first mount; never over existing data
iter-time = 200

[nodes.q]
driver = "quorum"
children = ["d0", "d1", "d2"]
vote-threshold = 2
rewrite-corrupted = true

[nodes.d0]
driver = "qcow2"
filename = "images/d0.qcow2"

[nodes.d1]
driver = "qcow2"
filename = "images/d1.qcow2"

[nodes.d2]
driver = "qcow2"
filename = "images/d2.qcow2"

[nodes.scratch]
driver = "raw"
filename = "images/scratch.img"

[disks.vm0]
node = "thr"

[disks.scratch]
node = "scratch"
detect-zeroes = "unmap"  # zero writes punch holes in scratch.img
"""

QCOW2_IMAGES = ("d0.qcow2", "d1.qcow2", "d2.qcow2")
DISK_SIZE = 256 << 20


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
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for f in (folder, images):  # a folder someone else made in /tmp could hold their symlinks
        if f.stat().st_uid != os.geteuid():
            raise SpecError(f"{f}: not a folder of this user's; choose another demo folder")
    for name in QCOW2_IMAGES:
        if not (images / name).exists():
            create_qcow2(images / name, DISK_SIZE)
    scratch = images / "scratch.img"
    if not scratch.exists():
        write_new_file(scratch, b"", 0o644, replace=False)
        os.truncate(scratch, DISK_SIZE)
    key = folder / "demo.key"
    if not key.exists():
        write_new_file(key, os.urandom(32), 0o600, replace=False)
    spec = folder / "demo.toml"
    write_new_file(spec, DEMO_SPEC.encode(), 0o644, replace=True)
    (folder / "mnt").mkdir(exist_ok=True)
    return spec


def _mount_args(spec: Path, mnt: Path, log_file: Path) -> argparse.Namespace:
    """`fusedisk mount`'s own parser and defaults, so a new mount option needs nothing here."""
    parser = argparse.ArgumentParser()
    mount_command.register(parser.add_subparsers())
    return parser.parse_args(["mount", "--log-file", str(log_file), str(spec), str(mnt)])


def run(args: argparse.Namespace) -> int:
    folder = Path(args.dir).absolute()
    mnt = folder / "mnt"
    if os.path.ismount(mnt):
        print(f"the demo is already mounted at {mnt}; unmount it with: fusermount3 -u {mnt}")
        return 1
    spec = prepare(folder)
    ring.turn_on()  # the demo shows the fastest transport this kernel has (docs/mount.md)
    status = mount_command.run(_mount_args(spec, mnt, folder / "fusedisk.log"))
    if status != 0:
        return status
    print(
        f"""fusedisk demo mounted at {mnt}
spec: {spec}   log: {folder / "fusedisk.log"}

vm0.img is throttle -> luks -> quorum -> 3 x qcow2; scratch.img is a raw image.

  ls -l {mnt}
  ls {mnt}/vm0/nodes/                        every node: driver, options/, children/, stats...
  cat {mnt}/vm0/nodes/q/status               the quorum's children
  mkfs.ext4 -F {mnt}/vm0.img                 use a disk like any image
  echo s1 > {mnt}/vm0/snapshot               qcow2 overlays go in below the quorum
  ls -l {mnt}/vm0/nodes/q/children/
  echo 1000 > {mnt}/throttle-groups/demo/options/iops-total

Unmount with: fusermount3 -u {mnt}"""
    )
    return 0
