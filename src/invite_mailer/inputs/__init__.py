"""Organiser files in, validated immutable data out; no services."""
