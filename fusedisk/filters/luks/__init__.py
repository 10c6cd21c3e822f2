"""The `luks` driver: LUKS encryption of everything below it.

- header.py  the LUKS1 on-disk format: header, key slots, AF splitter, PBKDF2
- cipher.py  sector ciphers as dm-crypt and QEMU apply them, whole requests at once
- node.py    the driver: unlocking, encrypting and decrypting requests
"""

from fusedisk.filters.luks.node import LuksNode

__all__ = ["LuksNode"]
