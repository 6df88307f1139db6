"""Kernels for KVzap: Triton kernels and their plain-torch twins (no vLLM imports).

Data flow: checkpoint on disk -> ``scorers.Surrogate`` -> kernels (scores, keep flags) ->
keep flags consumed by the attention backend.
"""
