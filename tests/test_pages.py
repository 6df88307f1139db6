"""The worker's page layout (`vllm_kvzap/cache/pages.py`) without vLLM, against the DMS rule.

Each token's key holds its own position, so the set of positions a stream exposes to attention can
be read back from the pages and compared with what DMS says must be visible at that step:
every position not judged yet (the window, plus the token leaving it in this step) and the judged
positions whose keep flag is set. Pages must match the layout rule and all go back to the pool.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvzap.cache.pages import LayerStreams, PagePool

H, BS, D, NB, L = 2, 4, 8, 40, 2


def make_pool() -> PagePool:
    buf = torch.zeros(L, NB, H, BS, 2 * D)
    return PagePool([buf[0], buf[1]])


def visible_positions(stream: LayerStreams, kv_pages: torch.Tensor, head: int) -> set[int]:
    table, len_a, len_b = stream.page_table()
    pages_a = -(-int(len_a[head]) // BS)
    slots = list(range(int(len_a[head]))) + [pages_a * BS + j for j in range(int(len_b[head]))]
    return {int(kv_pages[table[head, j // BS], 0, j % BS, 0]) for j in slots}


def write(kv_pages, pages, offsets, positions):
    for h in range(H):
        kv_pages[pages[:, h], 0, offsets] = positions[:, None].float().expand(-1, D)


@pytest.mark.parametrize("window", [0, 1, 3, 4, 9, 100])
@pytest.mark.parametrize("prompt_len", [1, 6, 13])
def test_stream_exposes_exactly_what_dms_keeps(window, prompt_len):
    pool = make_pool()
    kv_pages = pool.kv_pages
    capacity = pool.num_free
    g = torch.Generator().manual_seed(window * 31 + prompt_len)
    steps = 25
    keep = torch.rand(prompt_len + steps, H, generator=g) < 0.5  # [positions, H]
    stream = LayerStreams(H, window, BS)

    pages, offsets = stream.append_dense(pool, keep[:prompt_len])
    write(kv_pages, pages, offsets, torch.arange(prompt_len))
    for h in range(H):  # the prompt is attended densely
        assert visible_positions(stream, kv_pages, h) == set(range(prompt_len))

    peak = [0]
    alloc = pool.alloc

    def tracked_alloc(k):  # the stream is the pool's only user: held pages = capacity - free
        out = alloc(k)
        peak[0] = max(peak[0], capacity - pool.num_free)
        return out

    pool.alloc = tracked_alloc
    for n in range(prompt_len, prompt_len + steps):
        bound = stream.next_step_pages()  # what the scheduler reserves for this step
        peak[0] = capacity - pool.num_free
        if stream.dense:
            stream.to_ring(pool, kv_pages)
        pages, offset = stream.append_ring(pool, kv_pages, keep[n : n + 1])
        assert peak[0] <= bound, (n, peak[0], bound)
        for h in range(H):
            kv_pages[pages[h], 0, offset if isinstance(offset, int) else offset[h]] = float(n)
        for h in range(H):
            expected = {p for p in range(n + 1) if p >= n - window or keep[p, h]}
            assert visible_positions(stream, kv_pages, h) == expected, (n, h)
        stream.judge_leaving(pool, kv_pages)

    total = prompt_len + steps
    judged = max(0, total - window)
    for h in range(H):
        kept = int(keep[:judged, h].sum())
        assert int(stream.surv_len[h]) == kept
        assert int(stream.pruned[h]) == judged - kept
    # pages: survivors rounded up per head, plus the ring pages touched
    ring_positions = range(max(0, prompt_len - window), total)
    ring_pages = len({(p % window) // BS for p in ring_positions}) if window else 0
    survivor_pages = sum(-(-int(keep[:judged, h].sum()) // BS) for h in range(H))
    assert stream.num_pages() == survivor_pages + H * ring_pages
    assert stream.pruned_total() == int((~keep[:judged]).sum())
    stream.release(pool)
    assert pool.num_free == capacity


def test_dense_stream_counts_prompt_judgements_it_never_applied():
    pool = make_pool()
    keep = torch.tensor([[True, False], [False, False], [True, True], [False, True]])
    stream = LayerStreams(H, 1, BS)
    stream.append_dense(pool, keep)
    # a request that ends right after its prompt: positions < 4 - 1 count as judged
    assert stream.pruned_total() == int((~keep[:3]).sum())


def test_pool_refuses_to_overcommit():
    pool = make_pool()
    pool.alloc(pool.num_free)
    with pytest.raises(RuntimeError, match="page pool exhausted"):
        pool.alloc(1)


def test_null_block_pages_are_never_handed_out():
    buf = torch.zeros(L, NB, H, BS, 2 * D)
    pool = PagePool([buf[0], buf[1]])
    pages = pool.alloc(pool.num_free)
    page_elems = BS * 2 * D
    null_pages = {(l * NB * H * page_elems + h * page_elems) // page_elems for l in range(L) for h in range(H)}
    assert not null_pages & set(pages.tolist())
    assert len(set(pages.tolist())) == L * (NB - 1) * H
