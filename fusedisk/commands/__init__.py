"""Sub-commands of the `fusedisk` CLI, one module each (see fusedisk.cli)."""
