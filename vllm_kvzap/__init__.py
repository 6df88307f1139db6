"""vllm-kvzap: KVzap KV-cache pruning as a vLLM plugin.

Importing this package is cheap and does not import vLLM; `vllm_kvzap.plugin.register` is the
entry point vLLM calls in every process.
"""

__version__ = "0.1.0"
