"""Paged-mode attention of one layer in vLLM's own CPU kernel, one row per (request, KV head).

`cache/page_table.py` plans the step: each row is a page list whose resident pairs are slots
`0 .. seq_len - 1`, in vLLM's CPU page layout. vLLM's `cpu_attention_with_kv_cache` reads exactly
that with `num_kv_heads = 1`: the row's query is the GQA group of its KV head (`[q_len, G, D]`),
its block table the row's pages in the pool viewed as `[num_pages, 1, block_size, D]`. Decode
rows are a zero-copy view of the query (`[T * H_kv, G, D]`, row = token x KV head); multi-token
rows (prompt chunks) are regrouped with the plan's permutation and the output scattered back.
The kernel's scheduler metadata depends on the rows' lengths (its work items carry them), so it
is built per layer, except where a layer's rows are those of the last one built (`RowMetadata`):
every layer of a prompt step and of a step where nothing was pruned, as vLLM's own backend
shares one metadata among all layers of a step.
"""

from __future__ import annotations

import torch

from vllm_kvzap.cache.page_table import PageTable
from vllm_kvzap.cache.step_plan import StepPlan
from vllm_kvzap.compat import (
    cpu_attention_with_kv_cache,
    cpu_attn_get_scheduler_metadata,
    envs,
)

# ISAs whose in-page layout `PageTable` moves pairs in (keys transposed per page, values plain)
SUPPORTED_ISAS = ("vec", "vec16")


def attend_layer(
    table: PageTable,
    plan: StepPlan,
    layer_idx: int,
    query: torch.Tensor,  # [T, H_q, D]
    out: torch.Tensor,  # [T, H_q, D], contiguous
    scale: float,
    isa: str,
) -> None:
    rows_q, out_rows = row_queries(plan, query, out, table.num_heads)
    seq_lens = plan.seq_lens[layer_idx]
    metadata = _metadata.get(seq_lens, plan.row_query_start_loc, rows_q, isa)
    cpu_attention_with_kv_cache(
        query=rows_q,
        key_cache=table.pool.key_cache,
        value_cache=table.pool.value_cache,
        output=out_rows,
        query_start_loc=plan.row_query_start_loc,
        seq_lens=seq_lens,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=plan.block_tables[layer_idx],
        softcap=0.0,
        scheduler_metadata=metadata,
        s_aux=None,
    )
    scatter_rows(plan, out, out_rows, table.num_heads)


class RowMetadata:
    """vLLM's CPU scheduler metadata for the rows, rebuilt only when the rows change.

    The metadata (work items per thread, with each row's length) is a function of the row
    lengths, the rows' query starts, the query-head count, head size, dtype, ISA, split-KV flag and
    the thread count (fixed in a process); the kernel only reads it (vLLM's backend passes one
    metadata to every layer of a step). So a layer whose rows equal the last built ones (compared
    on the host: CPU tensors, ~1 us each) reuses it: the op call costs ~20-40 us on 2 cores.
    The split-KV flag is read once (vLLM reads it when it builds its metadata)."""

    def __init__(self) -> None:
        self.key = None
        self.seq_lens = self.query_start_loc = self.metadata = None
        self.split_kv = bool(envs.VLLM_CPU_ATTN_SPLIT_KV)

    def get(self, seq_lens, query_start_loc, rows_q, isa: str) -> torch.Tensor:
        key = (rows_q.shape[1], rows_q.shape[2], rows_q.dtype, isa)
        if (
            key == self.key
            and torch.equal(seq_lens, self.seq_lens)
            and torch.equal(query_start_loc, self.query_start_loc)
        ):
            return self.metadata
        self.metadata = cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.numel(),
            num_heads=key[0],
            num_kv_heads=1,
            head_dim=key[1],
            seq_lens=seq_lens,
            dtype=key[2],
            query_start_loc=query_start_loc,
            causal=True,
            sliding_window_size=-1,
            isa=isa,
            enable_kv_split=self.split_kv,
        )
        # copies: the plan's tensors are not promised to stay as they are after the step
        self.key, self.seq_lens = key, seq_lens.clone()
        self.query_start_loc = query_start_loc.clone()
        return self.metadata


_metadata = RowMetadata()  # one per process: a worker runs one model

def row_queries(plan: StepPlan, query: torch.Tensor, out: torch.Tensor, num_kv_heads: int):
    """The step's queries as kernel rows ``[rows, G, D]`` (row = token x KV head for decode steps,
    a zero-copy view; regrouped by the plan's permutation for prompt chunks), and where the kernel
    writes their output (a view of ``out``, or a buffer for `scatter_rows`)."""
    T, H = plan.num_tokens, num_kv_heads
    G, D = query.shape[1] // H, query.shape[2]
    rows_q = query[:T].reshape(T * H, G, D)
    out_rows = out[:T].view(T * H, G, D)
    if plan.query_perm is not None:
        rows_q = rows_q[plan.query_perm]
        out_rows = torch.empty_like(rows_q)
    elif not rows_q.is_contiguous():
        rows_q = rows_q.contiguous()
    return rows_q, out_rows


def scatter_rows(plan: StepPlan, out: torch.Tensor, out_rows: torch.Tensor, num_kv_heads: int):
    """Rows' outputs back to ``out [T, H_q, D]`` (a no-op when they were written in place)."""
    if plan.query_perm is not None:
        T = plan.num_tokens
        out[:T].view(T * num_kv_heads, *out_rows.shape[1:])[plan.query_perm] = out_rows
