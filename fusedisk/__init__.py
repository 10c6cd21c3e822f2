"""fusedisk: a user-space block layer, served through FUSE."""

__version__ = "0.1.0"
