"""hapki: a high-availability PKI platform (CLM registration authority, CARA certificate authority)."""

__version__ = "0.1.0"
