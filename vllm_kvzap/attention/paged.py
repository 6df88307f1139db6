"""Paged mode on the worker: each layer's attention step over per-(layer, KV head) pages.

Called by the attention backend once per layer and step. Requests are keyed by their first block
id (stable while they run: the block manager never frees it, and only a request's first
allocation reaches the worker). Requests that finished or were preempted are released when the
KV connector binds the next step's metadata, which happens before the forward pass; a request
seen with no computed tokens starts afresh (new, or recomputing after preemption).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvzap.cache.pages import PagePool, RequestPages
from vllm_kvzap.kernels.head_paged_attention import paged_attention_heads

NO_CAUSAL_LIMIT = 2**40


@dataclass
class StepRows:
    """Per-request facts of one step, built by the metadata builder (cpu tensors)."""

    keys: list[int]
    num_computed: list[int]
    query_lens: list[int]
    is_prefilling: list[bool]
    query_start_loc: torch.Tensor


class PagedKV:
    def __init__(self, kv_caches: list[torch.Tensor], num_layers: int, window: int):
        self.pool = PagePool(kv_caches)
        self.num_layers = num_layers
        self.window = window
        self.num_heads = kv_caches[0].shape[1]
        self.requests: dict[int, RequestPages] = {}

    def release(self, key: int) -> RequestPages | None:
        req = self.requests.pop(key, None)
        if req is not None:
            req.release(self.pool)
        return req

    def _request(self, key: int, num_computed: int) -> RequestPages:
        req = self.requests.get(key)
        if req is None or num_computed == 0:
            if req is not None:
                req.release(self.pool)
            req = RequestPages(self.num_layers, self.num_heads, self.window, self.pool.block_size)
            self.requests[key] = req
        return req

    def forward_layer(
        self,
        layer_idx: int,
        rows: StepRows,
        query: torch.Tensor,  # [T, H_q, D]
        key: torch.Tensor,  # [T, H_kv, D]
        value: torch.Tensor,
        keep: torch.Tensor,  # [T, H_kv] bool
        scale: float,
        out: torch.Tensor,  # [T, H_q, D]
    ) -> None:
        kv_pages = self.pool.kv_pages
        qsl = rows.query_start_loc.tolist()
        streams, tables = [], []
        causal_base = []
        for i, req_key in enumerate(rows.keys):
            q0, q1 = qsl[i], qsl[i + 1]
            num_computed = rows.num_computed[i]
            req = self._request(req_key, num_computed) if layer_idx == 0 else self.requests[req_key]
            layer = req.layers[layer_idx]
            assert layer.num_tokens == num_computed, "worker pages out of step with the scheduler"
            decode = q1 - q0 == 1 and not rows.is_prefilling[i]
            if decode and layer.dense:
                layer.to_ring(self.pool, kv_pages)
            if layer.dense:
                pages, offsets = layer.append_dense(self.pool, keep[q0:q1])  # [q, H], [q]
                kv_pages[pages, 0, offsets[:, None]] = key[q0:q1].to(kv_pages.dtype)
                kv_pages[pages, 1, offsets[:, None]] = value[q0:q1].to(kv_pages.dtype)
                causal_base.append(num_computed)
            else:
                pages, offset = layer.append_ring(self.pool, kv_pages, keep[q0:q1])
                kv_pages[pages, 0, offset] = key[q0].to(kv_pages.dtype)
                kv_pages[pages, 1, offset] = value[q0].to(kv_pages.dtype)
                causal_base.append(NO_CAUSAL_LIMIT)
            streams.append(layer)
            tables.append(layer.page_table())

        width = max((t[0].shape[1] for t in tables), default=0)
        page_table = torch.full((len(tables), self.num_heads, max(width, 1)), 0, dtype=torch.int32)
        for i, (table, _, _) in enumerate(tables):
            page_table[i, :, : table.shape[1]] = table.clamp(min=0).to(torch.int32)
        len_a = torch.stack([t[1] for t in tables]).to(torch.int32)
        len_b = torch.stack([t[2] for t in tables]).to(torch.int32)
        device = query.device
        paged_attention_heads(
            query,
            kv_pages,
            page_table.to(device),
            len_a.to(device),
            len_b.to(device),
            rows.query_start_loc.to(device=device, dtype=torch.int32),
            torch.tensor(causal_base, dtype=torch.int64, device=device),
            scale,
            out,
        )
        for layer in streams:
            if not layer.dense:
                layer.judge_leaving(self.pool, kv_pages)
        if layer_idx == self.num_layers - 1:
            for req_key in rows.keys:
                self.requests[req_key].note_peak()
