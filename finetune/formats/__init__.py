"""Readers and writers for the adapter file formats other tools use (see shared/formats.md)."""
