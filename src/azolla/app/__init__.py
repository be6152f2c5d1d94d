"""Azolla app package."""
