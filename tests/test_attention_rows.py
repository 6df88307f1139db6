"""`attention/rows.py` on its own: one decode step's rows through vLLM's CPU kernel, layer after
layer, against a softmax attention in plain torch, and the scheduler metadata shared by layers
whose rows are the same (`RowMetadata`) without changing a bit of the output."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_kvzap.attention import rows as rows_mod
from vllm_kvzap.compat import cpu_attn_reshape_and_cache

H, G, D = 3, 3, 64


def make_step(lengths, block_size, dtype, seed=0):
    """A page pool and a decode step's plan over it: lengths [L, B * H] resident slots per row,
    each row on its own random pages, written by vLLM's own op (`vec`/`vec16` page layout)."""
    g = torch.Generator().manual_seed(seed)
    L, R = lengths.shape
    isa = "vec" if block_size % 32 == 0 else "vec16"
    width = -(-int(lengths.max()) // block_size)
    num_pages = L * R * width + 1
    pool = torch.zeros(num_pages, 1, 2 * block_size, D, dtype=dtype)
    key_cache, value_cache = pool.chunk(2, dim=2)
    pages = (torch.randperm(num_pages - 1, generator=g) + 1).view(L, R, width).int()
    keys = torch.randn(L, R, width * block_size, D, generator=g).to(dtype)
    values = torch.randn(L, R, width * block_size, D, generator=g).to(dtype)
    pos = torch.arange(width * block_size)
    slots = pages[..., pos // block_size].long() * block_size + pos % block_size  # [L, R, n]
    cpu_attn_reshape_and_cache(
        keys.reshape(-1, 1, D), values.reshape(-1, 1, D), key_cache, value_cache,
        slots.reshape(-1), isa,
    )  # fmt: skip
    views = SimpleNamespace(key_cache=key_cache, value_cache=value_cache)  # the page pool's
    table = SimpleNamespace(num_heads=H, head_size=D, pool=views)
    plan = SimpleNamespace(
        num_tokens=R // H,
        seq_lens=lengths.to(torch.int32),
        row_query_start_loc=torch.arange(R + 1, dtype=torch.int32),
        query_perm=None,
        block_tables=[pages[layer] for layer in range(L)],
    )
    return table, plan, keys, values, isa


def reference(query, keys, values, lengths, scale):
    """Softmax attention of each row's G query heads over its first `length` pairs (float64)."""
    T = query.shape[0]
    q = query.double().view(T * H, G, D)
    out = torch.empty_like(q)
    for r in range(T * H):
        n = int(lengths[r])
        k, v = keys[r, :n].double(), values[r, :n].double()
        out[r] = torch.softmax(q[r] @ k.T * scale, -1) @ v
    return out.view(T, H * G, D)


def run_layers(table, plan, queries, isa, scale):
    outs = []
    for layer, query in enumerate(queries):
        out = torch.empty_like(query)
        rows_mod.attend_layer(table, plan, layer, query, out, scale, isa)
        outs.append(out)
    return outs


@pytest.mark.parametrize("block_size,dtype", [(16, torch.bfloat16), (32, torch.float32)])
def test_layers_share_metadata_only_for_equal_rows(block_size, dtype, monkeypatch):
    B, scale = 5, D**-0.5
    g = torch.Generator().manual_seed(1)
    same = torch.randint(1, 70, (B * H,), generator=g)
    other = torch.randint(1, 70, (B * H,), generator=g)
    # layers 0-1 and 3 have the same rows (as when nothing was pruned), layer 2 others
    lengths = torch.stack((same, same, other, same))
    table, plan, keys, values, isa = make_step(lengths, block_size, dtype)
    queries = [torch.randn(B, H * G, D, generator=g).to(dtype) for _ in range(len(lengths))]

    built = []
    real = rows_mod.cpu_attn_get_scheduler_metadata

    def counting(**kwargs):
        built.append(kwargs["seq_lens"].clone())
        return real(**kwargs)

    monkeypatch.setattr(rows_mod, "cpu_attn_get_scheduler_metadata", counting)
    monkeypatch.setattr(rows_mod, "_metadata", rows_mod.RowMetadata())
    shared = run_layers(table, plan, queries, isa, scale)
    # built for layer 0, layer 2 (other rows), layer 3 (the rows changed back); reused at 1
    assert len(built) == 3
    assert torch.equal(built[1], other.int())

    # the same step with metadata built for every layer: the same bits
    fresh = []
    for layer, query in enumerate(queries):
        monkeypatch.setattr(rows_mod, "_metadata", rows_mod.RowMetadata())
        out = torch.empty_like(query)
        rows_mod.attend_layer(table, plan, layer, query, out, scale, isa)
        fresh.append(out)
    for a, b in zip(shared, fresh):
        assert torch.equal(a, b)

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for layer, out in enumerate(shared):
        ref = reference(queries[layer], keys[layer], values[layer], lengths[layer], scale)
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_metadata_is_rebuilt_when_query_starts_or_group_change(monkeypatch):
    lengths = torch.full((6,), 40, dtype=torch.int32)
    built = []
    real = rows_mod.cpu_attn_get_scheduler_metadata
    monkeypatch.setattr(
        rows_mod, "cpu_attn_get_scheduler_metadata",
        lambda **kw: built.append(kw) or real(**kw),
    )  # fmt: skip
    cache = rows_mod.RowMetadata()
    q3 = torch.zeros(6, 3, D, dtype=torch.bfloat16)
    q2 = torch.zeros(6, 2, D, dtype=torch.bfloat16)
    qsl = torch.arange(7, dtype=torch.int32)
    first = cache.get(lengths, qsl, q3, "vec16")
    assert cache.get(lengths.clone(), qsl.clone(), q3, "vec16") is first
    cache.get(lengths, torch.tensor([0, 1, 2, 3, 4, 5, 7], dtype=torch.int32), q3, "vec16")
    cache.get(lengths, qsl, q2, "vec16")
    cache.get(lengths, qsl, q2.float(), "vec16")
    assert len(built) == 4
