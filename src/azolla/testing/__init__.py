"""Azolla testing package."""
