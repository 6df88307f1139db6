"""Kernels for KVzap: Triton kernels, their plain-torch twins and torch (cuBLAS) paths (no vLLM
imports).

Data flow: checkpoint on disk -> ``scorers.Surrogate`` -> kernels (scores ``[T, H_kv]`` float32)
-> the attention backend, which stores each score with its pair and prunes by ``rule.keep`` (or
ranks the scores in ratio mode).
"""
