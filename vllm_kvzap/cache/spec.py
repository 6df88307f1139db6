"""The KV cache spec that selects the plugin's block manager (vLLM's KV cache spec registry).

Same layout and byte accounting as `FullAttentionSpec`; only the manager differs. The attention
backend returns it from `customize_spec` when pruning runs in paged mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.kv_cache_interface import FullAttentionSpec


@dataclass(frozen=True, kw_only=True)
class KVzapAttentionSpec(FullAttentionSpec):
    pass


def register_spec() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_kvzap.cache.manager import KVzapBlockManager

    # Built-ins first: the registry fills them only while it is empty.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        KVzapAttentionSpec, KVzapBlockManager, uniform_type_base_spec=FullAttentionSpec
    )
