"""The `luks` driver: LUKS encryption of everything below it.

- keyslot_crypto.py what both versions' key slots share: PBKDF2, AF splitter, WrongKey
- luks1_header.py   the LUKS1 on-disk header: layout, parsing, checks, luksDump
- luks1_keyslot.py  LUKS1 key slots: PBKDF2 calibration, open, seal, unlock
- luks1_manage.py   writing LUKS1: format, add a key slot, remove one
- luks2_header.py   LUKS2's two binary header copies: checksums, seqid, writing order
- luks2_json.py     LUKS2's JSON metadata: checked dataclasses, bounds, refusals
- luks2_keyslot.py  LUKS2 key slots: Argon2id/Argon2i/PBKDF2, AF, digests
- luks2_volume.py   a LUKS2 volume: load (copy, metadata, segment) and unlock
- luks2_manage.py   writing LUKS2: format, add a key slot, remove one
- keys.py           passphrase sources: key file, environment (scrubbed), terminal
- describe.py       what `fusedisk info` shows of a LUKS header
- cipher/           sector ciphers as dm-crypt and QEMU apply them, whole requests at once
- node.py           the driver: picks the version, encrypts and decrypts requests
"""

from fusedisk.filters.luks.node import LuksNode

__all__ = ["LuksNode"]
