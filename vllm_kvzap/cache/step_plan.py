"""What goes in and out of the page table each step: the step's requests as the metadata builder
describes them (`StepRows`, in), everything a layer needs for its writes and its kernel call
(`StepPlan`, out: built by `PageTable.plan`, read by `attention/paged_step.py`, `rows.py` and
`triton_rows.py`), and per-request resident sizes for the scheduler (`ResidentReport`, out:
through the KV connector to `cache/manager.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_kvzap.cache.page_table import PageTable

BLOCK_TABLE_BYTES = 4 << 20  # block tables gathered at once, for as many layers as fit


@dataclass
class StepRows:
    """The step's requests as the metadata builder sees them, in batch order: cpu tensors (the
    plan reads sizes from them without a device sync), except `req_keys`, which may already be on
    the page table's device (the first column of vLLM's device block table)."""

    req_keys: torch.Tensor  # [B] int64: first block id, names the request's pages on the worker
    num_computed: torch.Tensor  # [B] int64: tokens whose KV is already written
    query_lens: torch.Tensor  # [B] int64
    is_prefilling: torch.Tensor  # [B] bool
    query_start_loc: torch.Tensor  # [B + 1] int64


@dataclass
class ResidentReport:
    pages: int  # pages held after the last step
    next_pages: int  # most pages the next decoding step may hold
    dense: bool  # still in its prompt: the next step is a prefill chunk


class LayerBlockTables:
    """The step's block tables, one layer at a time: `[layer]` is that layer's `[B * H, width]`
    int32 (row (b, h) -> its page ids), gathered from the chunk table when the layer asks, for it
    and the next layers as far as `BLOCK_TABLE_BYTES` allows (layers ask in order: one gather for
    all layers of a small step). `width = ceil(P_step / chunk) * chunk`, where `P_step` is the
    host-side bound on the step's longest row (its request's tokens after the step, in pages);
    at most `max(BLOCK_TABLE_BYTES, max_num_seqs * H_kv * ceil(max_pages / chunk) * chunk * 4)`
    bytes alive. Columns past a row's pages hold ids the kernel never reads (it stops at the
    row's `seq_len`)."""

    def __init__(self, table: PageTable, req_idx: torch.Tensor, num_chunks: int):
        self.table, self.req_idx, self.num_chunks = table, req_idx, num_chunks
        width = num_chunks * table.chunk
        self.group = max(1, BLOCK_TABLE_BYTES // (4 * req_idx.numel() * table.num_heads * width))
        self.first, self.tables = 0, None  # the gathered layers' first, [layers, B * H, width]

    def __len__(self) -> int:
        return self.table.num_layers

    def __getitem__(self, layer: int) -> torch.Tensor:
        if self.tables is None or not 0 <= layer - self.first < self.group:
            t, c = self.table, self.num_chunks
            layers = slice(layer, min(layer + self.group, t.num_layers))
            ids = t.chunk_table[layers, self.req_idx, :, :c]  # [l, B, H, c] chunk ids
            self.first, self.tables = layer, t.chunks[ids].view(ids.shape[0], -1, c * t.chunk)
        return self.tables[layer - self.first]


@dataclass
class StepPlan:
    """Everything a layer needs for this step; leading dim L (layers) where present. Bounds:
    `seq_lens` 4 L B H bytes, `write_slots` and `score_index` 8 L T H each, `query_perm` 8 T H,
    `row_query_start_loc` 4 (B H + 1); `block_tables` as `LayerBlockTables`."""

    num_tokens: int
    block_tables: LayerBlockTables  # [layer] -> [B * H, width] int32: row (b, h) -> its pages
    seq_lens: torch.Tensor  # [L, B * H] int32: resident slots per row during the step
    row_query_start_loc: torch.Tensor  # [B * H + 1] int32
    query_perm: torch.Tensor | None  # [T * H]: row order -> (token, head) order; None = identity
    write_slots: torch.Tensor  # [L, T * H] int64: physical slot of (token, head)
    score_index: torch.Tensor  # [L, T * H] int64: its score's float32 element in the buffer
    max_query_len: int = 1  # longest row query in the step
    max_seq_len: int = 0  # bound on every row's resident slots (a multiple of the block size)
