"""`fusedisk SPEC MOUNTPOINT -o OPTS`: the command form mount.fuse3 runs for fstab lines.

An fstab line `/etc/vm/disks.toml /mnt/disks fuse.fusedisk defaults,allow_other 0 0`
makes mount(8) run mount.fuse3, which runs `fusedisk SPEC MOUNTPOINT -o OPTS` through
/bin/sh.  mount(8) has already dropped its own options (defaults, noauto, nofail,
x-systemd.*, ...), but mount.fuse3 adds the generic flags it was handed as words
(rw, dev, suid, ...).  This module turns that form into the arguments of
`fusedisk mount`; an option fusedisk does not know is refused by name, so a typo in
fstab is not silently ignored.
"""

from __future__ import annotations

from fusedisk.errors import SpecError

#: mount.fuse3 options that map to `fusedisk mount` flags
FLAGS = {"allow_other": "--allow-other", "ro": "--read-only", "debug": "--debug"}
#: fusedisk's own options that take a value: `-o log-file=/var/log/fusedisk.log`
VALUES = {"log-file": "--log-file", "transport": "--transport"}
#: generic mount options that mean nothing to a FUSE daemon (or are the defaults)
IGNORED = frozenset({
    "defaults", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "nodiratime", "diratime", "auto", "noauto",
    "user", "nouser", "users", "owner", "group", "nofail", "_netdev", "sync", "async",
    "dirsync", "lazytime", "nolazytime", "silent", "loud", "iversion", "noiversion",
    "default_permissions", "auto_unmount",
})  # fmt: skip
#: option prefixes left to other programs (systemd, mount(8) comments)
IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=")


def mount_options_to_args(options: list[str]) -> list[str]:
    """`-o` option words (comma lists) -> `fusedisk mount` arguments."""
    args: list[str] = []
    for group in options:
        for word in filter(None, (w.strip() for w in group.split(","))):
            name, eq, value = word.partition("=")
            if word in FLAGS:
                args.append(FLAGS[word])
            elif name in VALUES and eq and value:
                args += [VALUES[name], value]
            elif word in IGNORED or word.startswith(IGNORED_PREFIXES):
                continue
            else:
                known = ", ".join([*FLAGS, *(f"{n}=VALUE" for n in VALUES)])
                raise SpecError(
                    f"mount option '{word}' is not one fusedisk knows ({known}; generic ones "
                    "such as defaults, noauto, nofail, _netdev and x-systemd.* are ignored)"
                )
    return args


def helper_argv(argv: list[str]) -> list[str]:
    """`SPEC MOUNTPOINT [-o OPTS]...` -> `mount [FLAGS] SPEC MOUNTPOINT`.

    mount.fuse3 puts `-o OPTS` after the two positionals; `-oOPTS` and options
    before them are accepted too, as other FUSE programs accept them.
    """
    positionals: list[str] = []
    options: list[str] = []
    flags: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "-o":
            value = next(words, None)
            if value is None:
                raise SpecError("mount option -o needs a value (a comma-separated list)")
            options.append(value)
        elif word.startswith("-o"):
            options.append(word[2:])
        elif word in ("-f", "--foreground"):
            flags.append("-f")
        elif word.startswith("-") and word != "-":
            raise SpecError(f"'{word}' is not an option of `fusedisk SPEC MOUNTPOINT -o OPTS`")
        else:
            positionals.append(word)
    if len(positionals) != 2:
        raise SpecError(
            "expected `fusedisk SPEC MOUNTPOINT [-o OPTIONS]` (the form mount.fuse3 runs), "
            f"or a command; got {' '.join(argv)!r}"
        )
    return ["mount", *flags, *mount_options_to_args(options), *positionals]
