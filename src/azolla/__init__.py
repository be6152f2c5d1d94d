"""Azolla: a durable, fast, simple async task platform on PostgreSQL."""
