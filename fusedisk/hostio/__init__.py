"""The host-I/O layer below the formats: everything that touches a host file.

- files.py         which host files may be images, and the one policy for opening and
                   creating them (regular files and block devices, never blocking)
- host_file.py     `HostFile`: inline when a call cannot block (RWF_NOWAIT), otherwise the
                   ring or the batched workers
- syscalls.py      the blocking calls themselves: full reads and writes, fallocate,
                   O_DIRECT buffers and alignment, one-copy reads
- uring.py         io_uring for host reads, writes and fdatasync
- workers.py       a few threads on one queue: blocking calls without a hand-off per call
- write_behind.py  buffered writes acknowledged when queued, written in order by one thread
- locking.py       image locking as QEMU does it (OFD locks on permission bytes)

Nothing here knows a Node: drivers in formats/ use it, graph/ does not."""
