"""Helpers shared by hapki's tests (CSR and key factories)."""
