"""Running fusedisk as a service: the mount.fuse3 command form, sd_notify, unit files.

`systemd/` holds the unit files shipped with the package (docs/service.md).
"""
