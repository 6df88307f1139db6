"""Paged attention with per-(slot, KV head) pruning masks, plain torch (no vLLM import).

Consumed by the attention backend once some of a batch's tokens have left the protected window.
Cache layout (vLLM's CPU layout): `key_cache`/`value_cache` are `[num_blocks, H_kv, block_size, D]`
views; `keep` is `[num_blocks * block_size, H_kv]` bool, one row per slot. A key at position `p` of
request `i` is visible to that request's queries when it is causal and either `p >= judged_upto[i]`
(not judged yet) or its keep flag is set. Mask mode only: vLLM's CPU kernel reads every slot of a
row up to its length and has no per-slot mask, so hiding pruned pairs in place (without moving
them, as paged mode does) needs this attention of the project's own.
"""

from __future__ import annotations

import torch

from vllm_kvzap.cache.page_pool import cdiv


def paged_attention_masked_torch(
    query: torch.Tensor,  # [T, H_q, D]
    key_cache: torch.Tensor,  # [NB, H_kv, BS, D]
    value_cache: torch.Tensor,  # [NB, H_kv, BS, D]
    keep: torch.Tensor,  # [NB * BS, H_kv] bool
    block_table: torch.Tensor,  # [B, max_blocks] int
    query_start_loc: torch.Tensor,  # [B + 1] int (cpu)
    seq_lens: torch.Tensor,  # [B] int (cpu)
    judged_upto: torch.Tensor,  # [B] int (cpu)
    scale: float,
    out: torch.Tensor,  # [T, H_q, D]
) -> torch.Tensor:
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    qsl = query_start_loc.tolist()
    for i, (seq_len, judged) in enumerate(zip(seq_lens.tolist(), judged_upto.tolist())):
        q0, q1 = qsl[i], qsl[i + 1]
        q_len = q1 - q0
        if q_len <= 0:
            continue
        num_blocks = cdiv(seq_len, block_size)
        blocks = block_table[i, :num_blocks].long()
        # [H_kv, n, D]
        k = key_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :seq_len]
        v = value_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :seq_len]
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:seq_len]
        positions = torch.arange(seq_len)
        visible = keep[slots.to(keep.device)].t() | (positions >= judged).to(keep.device)  # [H_kv, n]
        q_pos = seq_len - q_len + torch.arange(q_len)
        causal = (positions[None, :] <= q_pos[:, None]).to(keep.device)  # [q, n]
        mask = visible[:, None, None, :] & causal[None, None]  # [H_kv, 1, q, n]
        q = query[q0:q1].view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        logits = torch.matmul(q.float(), k.float()[:, None].transpose(-1, -2)) * scale
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        o = torch.matmul(probs, v.float()[:, None])  # [H_kv, G, q, D]
        out[q0:q1] = o.permute(2, 0, 1, 3).reshape(q_len, num_q_heads, head_dim).to(out.dtype)
    return out
