"""Azolla domain package."""
