"""Attention side of the plugin: scoring hooks, per-slot keep flags, and the attention backend."""
