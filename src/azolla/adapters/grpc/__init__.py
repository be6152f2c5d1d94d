"""Azolla adapters grpc package."""
