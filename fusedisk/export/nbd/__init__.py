"""The NBD export: the graph's disks served to NBD clients (qemu, nbdcopy, other hosts).

protocol.py parses and builds the wire format (no I/O, fuzzable), handshake.py
negotiates, transmission.py serves requests onto the Disk, server.py listens.
"""
