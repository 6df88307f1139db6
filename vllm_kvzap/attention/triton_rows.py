"""Paged-mode attention of one layer in vLLM's Triton `unified_attention`, one row per (request,
KV head): the kernel call of the CUDA path (any NVIDIA GPU; on CPU tensors under
`TRITON_INTERPRET=1`, which is how the tests run it).

The page table (`cache/page_table.py`, pages in `PlainKeyPages`) plans the step exactly as for
the CPU kernel: row `r` reads slots `0 .. seq_lens[r] - 1` of its pages `block_tables[r]`. Here a page is
`[block_size, D]` keys then `[block_size, D]` values, so the pool is two strided views
`[num_pages, block_size, 1, D]`, which `unified_attention` takes as K and V caches with one KV head;
each row's query is its KV head's GQA group (`[q_len, G, D]`, regrouped as in `attention/rows.py`),
`cu_seqlens_q` the rows' query starts and `seqused_k` their lengths. Nothing here reads the GPU
back: the plan's host-side bounds (`max_query_len`, `max_seq_len`) size the launch.

Steps with few rows (at most vLLM's `MIN_LAUNCH_GRID_SIZE_2D`: the 2D grid would leave most of
the GPU idle) may use the kernel's split-KV (3D) variant, as vLLM's own backend does, with segment
buffers for that many query tokens allocated once: decode-only steps in vLLM 0.32, also rows of
up to 8 query tokens since 0.33 (the kernel falls back to 2D when a step has more query tokens
than the buffers have rows).
"""

from __future__ import annotations

import functools

import torch

from vllm_kvzap.attention.rows import row_queries, scatter_rows
from vllm_kvzap.cache.page_pool import PlainKeyPages
from vllm_kvzap.cache.page_table import PageTable
from vllm_kvzap.cache.step_plan import StepPlan


def kv_cache_views(table: PageTable) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches ``[num_pages, block_size, 1, D]`` over the page pool (plain key layout)."""
    if not isinstance(table.pool, PlainKeyPages):
        raise ValueError("unified_attention reads keys in the plain page layout (PlainKeyPages)")
    return table.pool.key_cache.transpose(1, 2), table.pool.value_cache.transpose(1, 2)


@functools.cache
def split_kv_buffers(group: int, head_size: int, device: torch.device) -> tuple:
    """(rows threshold, segments, output, max, expsum) for the split-KV variant: scratch that the
    layers' kernel calls reuse one after another, allocated once per shape and device."""
    from vllm_kvzap.compat import (
        MIN_LAUNCH_GRID_SIZE_2D,
        NUM_PAR_SOFTMAX_SEGMENTS,
        next_power_of_2,
    )

    rows, segs = MIN_LAUNCH_GRID_SIZE_2D, NUM_PAR_SOFTMAX_SEGMENTS  # one KV head per row
    f32 = dict(dtype=torch.float32, device=device)
    return (
        rows,
        segs,
        torch.empty(rows, group, segs, next_power_of_2(head_size), **f32),
        torch.empty(rows, group, segs, **f32),
        torch.empty(rows, group, segs, **f32),
    )


def attend_layer_triton(
    table: PageTable,
    plan: StepPlan,
    layer_idx: int,
    query: torch.Tensor,  # [T, H_q, D]
    out: torch.Tensor,  # [T, H_q, D], contiguous
    scale: float,
) -> None:
    from vllm_kvzap.compat import unified_attention

    rows_q, out_rows = row_queries(plan, query, out, table.num_heads)
    k_cache, v_cache = kv_cache_views(table)
    threshold, segments, segm_out, segm_max, segm_expsum = split_kv_buffers(
        rows_q.shape[1], rows_q.shape[2], rows_q.device
    )
    unified_attention(
        q=rows_q,
        k=k_cache,
        v=v_cache,
        out=out_rows,
        cu_seqlens_q=plan.row_query_start_loc,
        max_seqlen_q=plan.max_query_len,
        seqused_k=plan.seq_lens[layer_idx],
        max_seqlen_k=plan.max_seq_len,
        softmax_scale=scale,
        causal=True,
        window_size=(-1, -1),
        block_table=plan.block_tables[layer_idx],
        softcap=0,
        q_descale=None,
        k_descale=None,
        v_descale=None,
        # split-KV for decode-only steps of at most `threshold` rows (the kernel decides)
        seq_threshold_3D=threshold,
        num_par_softmax_segments=segments,
        softmax_segm_output=segm_out,
        softmax_segm_max=segm_max,
        softmax_segm_expsum=segm_expsum,
    )
    scatter_rows(plan, out, out_rows, table.num_heads)
