"""Experiments that are not part of the plugin (run from a checkout)."""
