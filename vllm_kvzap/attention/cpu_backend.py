"""KVzap attention backend for vLLM's CPU platform (registered in place of CPU_ATTN).

Without `kv_pruning` it is vLLM's CPU backend unchanged. With pruning on, the step's keep flags
come from the scoring hook (`runtime.py`), and:
- paged mode (default): the metadata builder records each request's key (first block id), computed
  tokens, query length and prefill state (`StepRows`); the page table plans the step
  (`cache/page_table.py`) when the KV connector binds it, after releasing finished and preempted
  requests and before the forward pass (forwards that are not scheduled steps are never bound
  and touch no pages: `runtime.bind_step`), and every layer then writes its K/V and scores
  into the rows' pages and attends in vLLM's own CPU kernel, one row per (request, KV head)
  (`rows.py`). The backend's `customize_spec` selects the plugin's block manager (`cache/`).
  vLLM's AMX page packing is not supported: with pruning the `vec` layout is used instead.
- mask mode: the builder adds `judged_upto[i]` (0 while request `i` is in its prompt, chunked or
  not, else `num_computed_tokens - window`: the tokens that left the window in earlier steps; a
  token judged in this step is still seen by this step's queries); the impl writes K/V itself,
  scatters the keep flags into a per-layer keep cache by slot and attends with
  `kernels/paged_attention.py`, hiding judged pairs whose flag is unset.
KV cache layout: vLLM's CPU shape `[num_blocks, H_kv, block_size, 2 * head_size]`, read as
`[num_blocks, H_kv, 2 * block_size, head_size]`: keys in the first `block_size` rows of each
(block, head), values in the rest, row-major (vLLM's own CPU op packs keys per ISA instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvzap.attention.paged_step import (
    layer_index,
    paged_forward,
    paged_spec,
    prunes,
    pruning_config,
    step_rows,
    unsupported_features,
)
from vllm_kvzap.attention.rows import SUPPORTED_ISAS, attend_layer
from vllm_kvzap.attention.runtime import get_runtime
from vllm_kvzap.cache.step_plan import StepRows
from vllm_kvzap.compat import (
    AttentionType,
    CommonAttentionMetadata,
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
    MultipleOf,
    get_current_vllm_config,
    is_quantized_kv_cache,
)
from vllm_kvzap.kernels.paged_attention import paged_attention_masked_torch


@dataclass
class KVzapCPUAttentionMetadata(CPUAttentionMetadata):
    judged_upto: torch.Tensor | None = None  # mask mode: [num_reqs] int64, cpu
    rows: StepRows | None = None  # paged mode


class KVzapCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.pruning = pruning_config(vllm_config)
        if self.pruning.paged and self.isa not in SUPPORTED_ISAS:
            if self.isa != "amx":
                raise ValueError(
                    f"kv_pruning paged mode supports vLLM's CPU attention ISAs "
                    f"{list(SUPPORTED_ISAS)}, not {self.isa!r} (this CPU); use mode 'mask'"
                )
            # the page moves follow the `vec` page layout; vLLM's kernel reads it with any dtype
            self.isa = "vec"
            self._set_isa_to_layers(layer_names)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> CPUAttentionMetadata:
        if not self.pruning.enabled:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        rows = step_rows(cm)
        if self.pruning.paged:
            # the kernel's own metadata is built per layer from the rows (`rows.py`)
            runtime = get_runtime()
            if runtime is not None:
                runtime.next_rows = rows  # planned if the connector binds the step
            return KVzapCPUAttentionMetadata(
                num_actual_tokens=cm.num_actual_tokens,
                max_query_len=cm.max_query_len,
                query_start_loc=cm.query_start_loc,
                max_seq_len=cm.max_seq_len,
                seq_lens=cm.seq_lens,
                block_table=cm.block_table_tensor,
                slot_mapping=cm.slot_mapping,
                scheduler_metadata=None,
                rows=rows,
            )
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if rows is None:  # not a scheduled step: vLLM's own attention, nothing hidden
            return meta
        fields = {f: getattr(meta, f) for f in CPUAttentionMetadata.__dataclass_fields__}
        judged_upto = (rows.num_computed - self.pruning.window).clamp(min=0)
        judged_upto[rows.is_prefilling] = 0
        return KVzapCPUAttentionMetadata(**fields, judged_upto=judged_upto)


class KVzapCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pruning = pruning_config(get_current_vllm_config())
        self.layer_idx: int | None = None
        if self.pruning.enabled and self.attn_type == AttentionType.DECODER:
            unsupported_features(
                self, self.sliding_window != -1, is_quantized_kv_cache(self.kv_cache_dtype)
            )

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not prunes(self):
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.pruning.paged:
            return  # paged mode writes K/V into the request's pages in `forward`
        key_cache, value_cache = _split_kv_cache(kv_cache)
        block_size = key_cache.shape[2]
        n = min(slot_mapping.shape[0], key.shape[0])
        slots = slot_mapping[:n].long()
        valid = slots >= 0
        slots = slots[valid]
        blocks, offsets = slots // block_size, slots % block_size
        key_cache[blocks, :, offsets] = key[:n][valid].to(key_cache.dtype)
        value_cache[blocks, :, offsets] = value[:n][valid].to(value_cache.dtype)

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
        if attn_metadata is None or not prunes(self) or type(attn_metadata) is CPUAttentionMetadata:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale, output_block_scale,
            )  # fmt: skip
        layer_idx = layer_index(self, layer)
        runtime = get_runtime()
        n = attn_metadata.num_actual_tokens
        if self.pruning.paged:
            isa = layer.isa

            def attend(table, plan, layer, q, out):
                attend_layer(table, plan, layer, q, out, self.scale, isa)

            return paged_forward(
                layer_idx, attn_metadata.rows, query, key, value, output, n,
                self.num_heads, self.head_size, attend, isa,
            )  # fmt: skip
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        keep_cache = runtime.keep_cache(
            layer_idx, num_blocks * block_size, num_kv_heads, kv_cache.device
        )
        keep = runtime.keep_flags(layer_idx, key[:n])
        keep_cache[attn_metadata.slot_mapping[:n].long()] = keep[:n]
        key_cache, value_cache = _split_kv_cache(kv_cache)
        paged_attention_masked_torch(
            query[:n],
            key_cache,
            value_cache,
            keep_cache,
            attn_metadata.block_table,
            attn_metadata.query_start_loc.cpu(),
            attn_metadata.seq_lens.cpu(),
            attn_metadata.judged_upto,
            self.scale,
            output[:n].view(n, self.num_heads, self.head_size),
        )
        return output


def _split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[NB, H_kv, BS, 2D] -> key and value views, each [NB, H_kv, BS, D]."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    return kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)


class KVzapCPUAttentionBackend(CPUAttentionBackend):
    page_key_layout = "transposed"  # vLLM's `vec`/`vec16` page layout (`cache/page_pool.py`)

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        # paged mode reads pages of 16 slots too (vLLM's `vec16` kernel, `rows.py`); vLLM's own
        # backend asks for multiples of 32
        runtime = get_runtime()
        if runtime is not None and runtime.config.paged:
            return [MultipleOf(16)]
        return CPUAttentionBackend.get_supported_kernel_block_sizes(kv_cache_spec)

    @classmethod
    def customize_spec(cls, spec):
        return paged_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls() -> type[KVzapCPUAttentionBackendImpl]:
        return KVzapCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type[KVzapCPUAttentionMetadataBuilder]:
        return KVzapCPUAttentionMetadataBuilder
