"""Offline trainer of KVzap surrogates (not installed with the plugin; run from a checkout)."""
