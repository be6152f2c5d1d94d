"""Azolla adapters package."""
