"""Azolla adapters memory package."""
