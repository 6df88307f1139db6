"""KVzap attention backend for vLLM's CUDA platform, on vLLM's Triton attention (registered as
`CUSTOM`; `engine_setup` selects it when pruning is on).

Paged mode only (mask mode is the CPU's debugging path). The backend asks for vLLM's `LBHNC` KV
cache layout, in which one (layer, block, KV head) page is `block_size x 2 * head_size`
contiguous elements: the page table (`cache/page_table.py`, plain key layout, state on the GPU)
reads it as `block_size` keys then `block_size` values. The metadata builder records the step's
rows (`paged_step.step_rows`), the KV connector plans them before the forward pass, and each
layer writes its K/V into its rows' pages and attends over them in vLLM's `unified_attention`,
one row per (request, KV head) (`triton_rows.py`). vLLM's own KV write is a no-op here: the page
table writes instead.

CUDA graphs: vLLM's default (FULL_AND_PIECEWISE) falls back to piecewise graphs, since the builder
says it cannot serve full graphs (`AttentionCGSupport.NEVER`: the rows' lengths and block tables
change shape with every step). The attention op runs eagerly between the captured pieces; the
scoring (the Triton kernel as `vllm_kvzap::surrogate_scores` and the copy into the runtime's score
buffer, `scoring_op.py`) is captured inside them and replayed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from vllm_kvzap.attention.paged_step import (
    layer_index,
    paged_forward,
    paged_spec,
    prunes,
    pruning_config,
    step_rows,
    unsupported_features,
)
from vllm_kvzap.attention.runtime import get_runtime
from vllm_kvzap.attention.triton_rows import attend_layer_triton
from vllm_kvzap.cache.step_plan import StepRows
from vllm_kvzap.compat import (
    AttentionCGSupport,
    AttentionType,
    CommonAttentionMetadata,
    KVCacheLayout,
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
    get_current_vllm_config,
    is_quantized_kv_cache,
)


@dataclass
class KVzapTritonAttentionMetadata(TritonAttentionMetadata):
    rows: StepRows | None = None


class KVzapTritonAttentionMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    supports_draft_decode_metadata_update = False

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TritonAttentionMetadata:
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        rows = step_rows(common_attn_metadata)
        runtime = get_runtime()
        if runtime is not None:
            runtime.next_rows = rows  # planned if the connector binds the step
        fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
        return KVzapTritonAttentionMetadata(**fields, rows=rows)


class KVzapTritonAttentionImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pruning = pruning_config(get_current_vllm_config())
        self.layer_idx: int | None = None
        if not self.pruning.paged and self.pruning.enabled:
            raise ValueError("kv_pruning mode 'mask' runs on vLLM's CPU platform only; use 'paged'")
        if self.pruning.enabled and self.attn_type == AttentionType.DECODER:
            unsupported_features(
                self,
                sliding_window=self.sliding_window != (-1, -1) or self.chunk_lookback != -1,
                fp8=is_quantized_kv_cache(self.kv_cache_dtype),
            )

    def fused_rope_kvcache_supported(self):
        return False if prunes(self) else super().fused_rope_kvcache_supported()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if prunes(self):
            return None  # written into the rows' pages in `forward`
        return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        if attn_metadata is None or not prunes(self):
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale, output_block_scale,
            )  # fmt: skip
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kv_pruning does not fuse output quantization")
        layer_idx = layer_index(self, layer)

        def attend(table, plan, layer, q, out):
            attend_layer_triton(table, plan, layer, q, out, self.scale)

        return paged_forward(
            layer_idx, attn_metadata.rows, query, key, value, output,
            attn_metadata.num_actual_tokens, self.num_heads, self.head_size, attend,
        )  # fmt: skip


class KVzapTritonAttentionBackend(TritonAttentionBackend):
    page_key_layout = "plain"  # what `unified_attention` reads (`triton_rows.kv_cache_views`)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # one (layer, block, head) page = [block_size, 2 * head_size] contiguous
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec):
        return paged_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls() -> type[KVzapTritonAttentionImpl]:
        return KVzapTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVzapTritonAttentionMetadataBuilder]:
        return KVzapTritonAttentionMetadataBuilder
