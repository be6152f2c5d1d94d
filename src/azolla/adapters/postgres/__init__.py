"""Azolla adapters postgres package."""
