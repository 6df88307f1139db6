"""The KV cache spec that selects the plugin's block manager (vLLM's KV cache spec registry).

The backends return it from `customize_spec` when pruning runs in paged mode. Same layout as
`FullAttentionSpec` (a page is `[block_size, C]` per (layer, block, KV head)), with one change to
its bytes: each slot's cell `C` holds `SCORE_BYTES` more than its key and value, room for the
pair's float32 score (`cache/page_pool.py` keeps the scores after each page's values). vLLM
sizes the KV cache from `page_size_bytes` (`num_blocks = KV budget / (layers x page_size_bytes)`,
`v1/core/kv_cache_utils.py`) and views its one buffer as `[blocks, H_kv, block_size, C]` per layer
from `state_content_size_bytes` (`v1/kv_cache_interface.py` `create_kv_cache_views`, called by
`v1/worker/utils.py` `allocate_kv_cache` for the V1 and V2 model runners alike, CPU and GPU), so
the scores are counted in vLLM's KV budget and live in the same allocation: slightly fewer blocks
(head size 128 in bf16: 4 more bytes on 512, 0.78%) and no allocation after vLLM sized the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvzap.cache.page_pool import SCORE_BYTES
from vllm_kvzap.compat import FullAttentionSpec


@dataclass(frozen=True, kw_only=True)
class KVzapAttentionSpec(FullAttentionSpec):
    @property
    def state_content_size_bytes(self) -> int:
        """Bytes per (head, slot) cell: key, value, and the pair's score."""
        return super().state_content_size_bytes + SCORE_BYTES

    @property
    def dense_page_size_bytes(self) -> int:
        """Bytes of plain vLLM's page of the same shape (no scores), for the statistics."""
        return self.num_heads * self.num_states * super().state_content_size_bytes


def register_spec() -> None:
    from vllm_kvzap.cache.manager import KVzapBlockManager
    from vllm_kvzap.compat import KVCacheSpecRegistry

    # Built-ins first: the registry fills them only while it is empty.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        KVzapAttentionSpec, KVzapBlockManager, uniform_type_base_spec=FullAttentionSpec
    )
