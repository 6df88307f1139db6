"""Worker-side KV pages: one pool of pages shared by every (layer, KV head) of every request.

vLLM allocates the whole KV cache as one buffer and views it per layer as
`[num_blocks, H_kv, block_size, 2 * head_size]`; each (layer, block, head) cell is a contiguous
*page* of `block_size` slots, read here as `[2, block_size, head_size]` (keys, then values). The
pool hands out any page except those of the null block 0. A request's pages are organised per
(layer, KV head) *stream*:
- dense mode (its prompt, or a recomputation after preemption): tokens in position order, as in
  vLLM; attention is causal over them;
- ring mode (from its first decoding step on): *survivors* (tokens that left the window and were
  kept, in any order: attention does not care) plus a *ring* of `window + 1` slots holding the
  newest tokens (position p in ring slot p mod (window + 1)).
The switch happens at the start of the first decoding step: every token older than the window is
judged from the keep flag the scoring hook gave it when it was written, survivors are copied to
fresh pages and the prompt's pages go back to the pool. Afterwards each step moves the token that
leaves the window to the end of the survivors, writes the new token into its ring slot, attends
(the leaving token is still seen, as DMS wants), then judges the leaving token: pruned -> dropped
from the survivors' end. Pruned pairs therefore stop occupying memory at once, and a request
holds `sum over streams of ceil(survivors / block_size) + ring pages`.
"""

from __future__ import annotations

import torch

NO_PAGE = -1


class PagePool:
    def __init__(self, kv_caches: list[torch.Tensor]):
        first = kv_caches[0]
        num_blocks, num_heads, block_size, two_d = first.shape
        self.block_size = block_size
        self.head_size = two_d // 2
        self.page_elems = block_size * two_d
        storage = first.untyped_storage()
        num_pages = storage.nbytes() // (self.page_elems * first.element_size())
        self.kv_pages = torch.empty(0, dtype=first.dtype, device=first.device).set_(
            storage, 0, (num_pages, 2, block_size, self.head_size),
            (self.page_elems, block_size * self.head_size, self.head_size, 1),
        )  # fmt: skip
        usable = []
        for cache in kv_caches:
            assert cache.shape == first.shape and cache.untyped_storage().data_ptr() == (
                storage.data_ptr()
            ), "kv_pruning expects all layers' KV caches in one buffer"
            assert cache.stride(2) == two_d and cache.stride(3) == 1
            base = cache.storage_offset() // self.page_elems
            blocks = torch.arange(1, num_blocks)[:, None] * (cache.stride(0) // self.page_elems)
            heads = torch.arange(num_heads)[None, :] * (cache.stride(1) // self.page_elems)
            usable.append((base + blocks + heads).reshape(-1))
        self._free = torch.cat(usable).flip(0).tolist()  # a stack: pops from the end
        self.capacity = len(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> torch.Tensor:
        if n > len(self._free):
            raise RuntimeError(
                f"kv_pruning page pool exhausted: {n} pages wanted, {len(self._free)} free "
                "(scheduler accounting and worker pages disagree)"
            )
        out = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return torch.tensor(out, dtype=torch.long)

    def release(self, pages: torch.Tensor) -> None:
        pages = pages[pages >= 0]
        self._free.extend(pages.tolist())


class LayerStreams:
    """The H_kv streams of one request in one layer."""

    def __init__(self, num_heads: int, window: int, block_size: int):
        self.num_heads, self.window, self.block_size = num_heads, window, block_size
        self.ring_size = window
        self.leaving: torch.Tensor | None = None  # keep flags of the token on probation
        self.dense = True
        self.num_tokens = 0
        self.pages = torch.empty(num_heads, 0, dtype=torch.long)  # dense pages / survivors
        self.keep = torch.empty(num_heads, 0, dtype=torch.bool)  # dense mode: per position
        self.surv_len = torch.zeros(num_heads, dtype=torch.long)
        self.ring_pages = torch.full(
            (num_heads, -(-self.ring_size // block_size)), NO_PAGE, dtype=torch.long
        )
        self.ring_keep = torch.zeros(num_heads, max(self.ring_size, 1), dtype=torch.bool)
        self.pruned = torch.zeros(num_heads, dtype=torch.long)

    # ---- accounting ----
    def num_pages(self) -> int:
        if self.dense:
            return self.pages.shape[1] * self.num_heads
        surv = int((-(-self.surv_len // self.block_size)).sum())
        return surv + int((self.ring_pages >= 0).sum())

    def next_step_pages(self) -> int:
        """Most pages this layer may hold during the next decoding step."""
        if self.dense:
            # compaction frees before it allocates; it can leave a partial survivor page and a
            # partial ring page per stream, and the new token may need one more ring page
            return self.num_pages() + 2 * self.num_heads
        extra = 0
        if self.num_tokens >= self.ring_size:  # a token moves to the survivors
            extra += int((self.surv_len % self.block_size == 0).sum())
        if self.ring_size:
            next_slot = self.num_tokens % self.ring_size
            extra += int((self.ring_pages[:, next_slot // self.block_size] < 0).sum())
        return self.num_pages() + extra

    def pruned_total(self) -> int:
        """Pruned pairs, counting a dense stream's tokens older than the window as judged."""
        total = int(self.pruned.sum())
        if self.dense:
            judged = max(0, self.num_tokens - self.window)
            total += int((~self.keep[:, :judged]).sum())
        return total

    def release(self, pool: PagePool) -> None:
        pool.release(self.pages.reshape(-1))
        pool.release(self.ring_pages.reshape(-1))
        self.pages = self.pages[:, :0]
        self.ring_pages.fill_(NO_PAGE)

    # ---- dense mode ----
    def append_dense(self, pool: PagePool, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve slots for `keep.shape[0]` new tokens; returns their (pages [T, H], offsets [T])."""
        n_new = keep.shape[0]
        positions = torch.arange(self.num_tokens, self.num_tokens + n_new)
        need = -(-(self.num_tokens + n_new) // self.block_size) - self.pages.shape[1]
        if need > 0:
            fresh = pool.alloc(need * self.num_heads).view(self.num_heads, need)
            self.pages = torch.cat([self.pages, fresh], dim=1)
        self.keep = torch.cat([self.keep, keep.t().cpu()], dim=1)
        self.num_tokens += n_new
        return self.pages[:, positions // self.block_size].t(), positions % self.block_size

    def to_ring(self, pool: PagePool, kv_pages: torch.Tensor) -> None:
        """Judge every token older than the window, keep the survivors and the window."""
        n, bs = self.num_tokens, self.block_size
        num_judged = max(0, n - self.window)
        positions = torch.arange(n)
        old_pages = self.pages
        src_page = old_pages[:, positions // bs]  # [H, n]
        src_off = (positions % bs).expand(self.num_heads, n)
        kept = self.keep[:, :num_judged]
        self.pruned += (~kept).sum(dim=1)
        self.surv_len = kept.sum(dim=1)
        ring_positions = positions[num_judged:]
        # Copy what stays out of the pool first, so that compaction never holds more pages than
        # the request already has (plus partial pages): the scheduler budgets exactly that.
        survivors = [
            kv_pages[src_page[h, :num_judged][kept[h]], :, src_off[h, :num_judged][kept[h]]]
            for h in range(self.num_heads)
        ]  # [n_surv, 2, D] per head (advanced indexing copies)
        window = kv_pages[src_page[:, num_judged:], :, src_off[:, num_judged:]]  # [H, n_ring, 2, D]
        pool.release(old_pages.reshape(-1))

        max_surv_pages = int((-(-self.surv_len // bs)).max()) if self.num_heads else 0
        self.pages = torch.full((self.num_heads, max_surv_pages), NO_PAGE, dtype=torch.long)
        for h in range(self.num_heads):
            n_surv = int(self.surv_len[h])
            n_pages = -(-n_surv // bs)
            if n_pages:
                self.pages[h, :n_pages] = pool.alloc(n_pages)
                dst = torch.arange(n_surv)
                kv_pages[self.pages[h, dst // bs], :, dst % bs] = survivors[h]
        if len(ring_positions):
            ring_slots = ring_positions % self.ring_size
            for k in torch.unique(ring_slots // bs).tolist():
                self.ring_pages[:, k] = pool.alloc(self.num_heads)
            for h in range(self.num_heads):
                kv_pages[self.ring_pages[h, ring_slots // bs], :, ring_slots % bs] = window[h]
            self.ring_keep[:, ring_slots] = self.keep[:, num_judged:]
        self.keep = self.keep[:, :0]
        self.dense = False

    # ---- ring mode ----
    def append_ring(self, pool: PagePool, kv_pages: torch.Tensor, keep: torch.Tensor):
        """Before attention: the token leaving the window moves to the survivors (on probation
        until `judge_leaving`, as this step's query must still see it) and the new token takes
        its ring slot. Returns the new token's (pages [H], offset)."""
        n, bs = self.num_tokens, self.block_size
        keep = keep.reshape(-1).cpu()
        self.leaving = None
        if self.ring_size == 0:  # window 0: the new token itself is judged after this step
            self.leaving = keep
            pages, offset = self._append_survivor(pool, torch.ones_like(keep))
            self.num_tokens += 1
            return pages, offset
        slot = n % self.ring_size
        k = slot // bs
        if n >= self.ring_size:  # the slot holds position n - window, which leaves now
            self.leaving = self.ring_keep[:, slot].clone()
            dst_pages, dst_off = self._append_survivor(pool, torch.ones_like(keep))
            kv_pages[dst_pages, :, dst_off] = kv_pages[self.ring_pages[:, k], :, slot % bs]
        missing = (self.ring_pages[:, k] < 0).nonzero().squeeze(1)
        if len(missing):
            self.ring_pages[missing, k] = pool.alloc(len(missing))
        self.ring_keep[:, slot] = keep
        self.num_tokens += 1
        return self.ring_pages[:, k], slot % bs

    def _append_survivor(self, pool: PagePool, heads: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One more survivor slot in every stream; returns (pages [H], offsets [H])."""
        bs = self.block_size
        n = self.surv_len
        need = (n % bs == 0).nonzero().squeeze(1)
        width = int((n // bs).max()) + 1
        if width > self.pages.shape[1]:
            pad = torch.full((self.num_heads, width - self.pages.shape[1]), NO_PAGE)
            self.pages = torch.cat([self.pages, pad], dim=1)
        if len(need):
            self.pages[need, n[need] // bs] = pool.alloc(len(need))
        pages = self.pages[torch.arange(self.num_heads), n // bs]
        self.surv_len = n + 1
        return pages, n % bs

    def judge_leaving(self, pool: PagePool, kv_pages: torch.Tensor) -> None:
        """After attention: a pruned leaving token is dropped from the survivors' end."""
        if self.leaving is None:
            return
        pruned = ~self.leaving
        self.leaving = None
        self.pruned += pruned.long()
        for h in pruned.nonzero().squeeze(1).tolist():
            n = int(self.surv_len[h]) - 1
            self.surv_len[h] = n
            if n % self.block_size == 0:  # its page is empty now
                pool.release(self.pages[h, n // self.block_size : n // self.block_size + 1])
                self.pages[h, n // self.block_size] = NO_PAGE

    def page_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pages [H, P], len_a [H], len_b [H]) in the layout of `head_paged_attention`."""
        if self.dense:
            n = torch.full((self.num_heads,), self.num_tokens, dtype=torch.long)
            return self.pages, n, torch.zeros_like(n)
        bs = self.block_size
        surv_pages = -(-self.surv_len // bs)
        width = int(surv_pages.max()) + self.ring_pages.shape[1]
        table = torch.full((self.num_heads, width), NO_PAGE, dtype=torch.long)
        for h in range(self.num_heads):
            p = int(surv_pages[h])
            table[h, :p] = self.pages[h, :p]
            table[h, p : p + self.ring_pages.shape[1]] = self.ring_pages[h]
        ring_len = torch.full((self.num_heads,), min(self.num_tokens, self.ring_size))
        return table, self.surv_len.clone(), ring_len


class RequestPages:
    """All streams of one request, keyed on the worker by the request's first block id."""

    def __init__(self, num_layers: int, num_heads: int, window: int, block_size: int):
        self.layers = [LayerStreams(num_heads, window, block_size) for _ in range(num_layers)]
        self.peak_pages = 0

    def num_pages(self) -> int:
        return sum(layer.num_pages() for layer in self.layers)

    def next_step_pages(self) -> int:
        return sum(layer.next_step_pages() for layer in self.layers)

    def note_peak(self) -> None:
        self.peak_pages = max(self.peak_pages, self.num_pages())

    def release(self, pool: PagePool) -> None:
        for layer in self.layers:
            layer.release(pool)
