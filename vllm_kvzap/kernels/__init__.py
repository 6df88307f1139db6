"""Kernels for KVzap: Triton kernels, their plain-torch twins and torch (cuBLAS) paths (no vLLM
imports).

Data flow: checkpoint on disk -> ``scorers.Surrogate`` -> kernels (scores, keep flags) ->
keep flags consumed by the attention backend.
"""
