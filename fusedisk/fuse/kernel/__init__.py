"""Our own FUSE transport: the kernel protocol on /dev/fuse, mounting, the watchdog."""
