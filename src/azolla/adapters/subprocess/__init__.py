"""Azolla adapters subprocess package."""
