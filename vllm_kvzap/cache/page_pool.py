"""The page pool: vLLM's KV cache buffer seen as pages, the free-page stack, writes and moves.

vLLM allocates the KV cache as one buffer viewed per layer as `[num_blocks, H_kv, block_size, C]`;
every (layer, block, head) cell is a *page* of `block_size` slots of `C = 2 * head_size +
SCORE_BYTES / element size` elements (`page_cell`; `cache/spec.py` makes vLLM count the score bytes
in its KV budget). A page holds its `block_size` keys, then its `block_size` values (`[block_size,
D]`), then one float32 score per slot (`slot_scores`, a strided view of the same buffer). How the
keys lie in a page is the attention kernel's choice, one class each (the backend names it:
`page_layout` in `attention/cpu_backend.py` and `cuda_backend.py`):
- `TransposedKeyPages`: keys `[D, block_size]`, vLLM's CPU layout for the `vec`/`vec16` ISAs,
  whose kernel the CPU backend calls (`attention/rows.py`);
- `PlainKeyPages`: keys `[block_size, D]`, for vLLM's Triton `unified_attention`
  (`attention/triton_rows.py`), which reads any strides.
Both kernels take the page stride from the tensors, so the scores after the values are invisible
to them. All pages but the null block's form one pool, shared by every layer, head and request.

The page table (`cache/page_table.py`) decides which page holds what; this module only stores:
`FreeStack` hands pages out and takes them back with masks (no host reads), `write` puts a step's
K/V and scores into their slots, `move` copies kept pairs to their new slots.
"""

from __future__ import annotations

import torch

SCORE_BYTES = 4  # a float32 score per slot, in its page after the values
MOVE_PAIRS = 1 << 16  # K/V pairs per gather/scatter of a move


def cdiv(a, b):
    return -(-a // b)


def page_cell(head_size: int, dtype: torch.dtype) -> int:
    """Elements per slot of a page: its key, its value and its score (`SCORE_BYTES`)."""
    if SCORE_BYTES % dtype.itemsize:
        raise ValueError(f"kv_pruning: no page layout for {dtype} ({dtype.itemsize} bytes)")
    return 2 * head_size + SCORE_BYTES // dtype.itemsize


class FreeStack:
    """Free ids on the device (pages, directory chunks or request indices), pushed and popped with
    masks. `items` has a dump entry at its end for masked writes; `top` (the count) and `short`
    (how far a pop ran dry) are 0-d views into the owner's counters, so one host read checks
    every stack."""

    def __init__(self, items: torch.Tensor, top: torch.Tensor, short: torch.Tensor):
        self.items, self.top, self.short = items, top, short

    def __len__(self) -> int:
        """Free ids (a device read: for tests and tools)."""
        return int(self.top)

    def push(self, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Push `values[valid]` ([M], in order); the others go to the dump entry."""
        v, dump = valid.long(), self.items.numel() - 1
        pos = torch.where(valid, self.top + v.cumsum(0) - v, dump)
        self.items[pos.clamp_(max=dump)] = values.to(self.items.dtype)
        self.top.add_(v.sum())

    def pop(self, valid: torch.Tensor) -> torch.Tensor:
        """One id for each valid entry of `valid` ([M]): the top `sum(valid)` ids, bottom first,
        in entry order; invalid entries get any id. A stack that runs dry sets `short` (checked
        at the owner's next read) and hands out ids it does not have."""
        v = valid.long()
        total = v.sum()
        idx = (self.top - total + v.cumsum(0) - v).clamp_(0, self.items.numel() - 2)
        items = self.items[idx]
        self.short.copy_(torch.maximum(self.short, total - self.top))
        self.top.copy_((self.top - total).clamp(min=0))
        return items


class PagePool:
    """The pages of the KV cache buffer (`kv_caches`: every layer's view, one buffer) and the
    free-page stack (`free_pages`, filled with every page but the null block's). A subclass per
    in-page key layout (`layout` is the name a backend gives)."""

    layout: str

    def __init__(self, kv_caches: list[torch.Tensor], top: torch.Tensor, short: torch.Tensor):
        first = kv_caches[0]
        self.device = dev = first.device
        num_blocks, num_heads, block_size, cell = first.shape
        self.block_size = block_size
        self.head_size = D = (cell - SCORE_BYTES // first.element_size()) // 2
        if D <= 0 or page_cell(D, first.dtype) != cell:
            raise ValueError(
                f"kv_pruning: KV cache cells of {cell} elements are not 2 * head_size + a "
                f"{SCORE_BYTES}-byte score (`page_cell`; caches come from KVzapAttentionSpec)"
            )
        page_elems = block_size * cell
        storage = first.untyped_storage()
        es = first.element_size()
        self.num_pages_total = num_pages = storage.nbytes() // (page_elems * es)
        # [num_pages, page]: the flat page; key_cache/value_cache are the kernel's views
        self.kv_pages = torch.empty(0, dtype=first.dtype, device=dev).set_(
            storage, 0, (num_pages, page_elems), (page_elems, 1)
        )
        half = block_size * D
        paged = self.kv_pages[:, : 2 * half].view(num_pages, 1, 2 * block_size, D)
        self.key_cache, self.value_cache = paged.chunk(2, dim=2)  # [pages, 1, bs, D] each
        self._keys = self._key_view(self.kv_pages[:, :half], D)
        self._values = self.kv_pages[:, half : 2 * half].view(num_pages, block_size, D)
        # the scores: float32 [num_pages, bs] after each page's values (inside vLLM's budget)
        self.slot_scores = torch.empty(0, dtype=torch.float32, device=dev).set_(
            storage, 2 * half * es // 4, (num_pages, block_size), (page_elems * es // 4, 1)
        )
        self._scores_flat = torch.empty(0, dtype=torch.float32, device=dev).set_(
            storage, 0, (storage.nbytes() // 4,), (1,)
        )  # the buffer as float32 elements: `score_index` points into it
        usable = []
        for cache in kv_caches:
            assert cache.shape == first.shape and cache.untyped_storage().data_ptr() == (
                storage.data_ptr()
            ), (
                "kv_pruning expects all layers' KV caches in one buffer (vLLM 0.34's extensible "
                "KV cache splits it: --no-enable-extensible-kv-cache)"
            )
            assert cache.stride(2) == cell and cache.stride(3) == 1
            base = cache.storage_offset() // page_elems
            blocks = torch.arange(1, num_blocks)[:, None] * (cache.stride(0) // page_elems)
            heads = torch.arange(num_heads)[None, :] * (cache.stride(1) // page_elems)
            usable.append((base + blocks + heads).reshape(-1))
        usable = torch.cat(usable).flip(0).to(dev, torch.int32)  # a stack, top at the end
        self.capacity = usable.numel()
        top.fill_(self.capacity)
        items = torch.zeros(num_pages + 1, dtype=torch.int32, device=dev)
        items[: self.capacity] = usable
        self.free_pages = FreeStack(items, top, short)

    # ------------------------------------------------------------------ the layout's part
    def _key_view(self, keys: torch.Tensor, head_size: int) -> torch.Tensor:
        raise NotImplementedError

    def key_at(self, page: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The keys [..., D] at (page, offset) (a copy)."""
        raise NotImplementedError

    def _set_keys(self, page: torch.Tensor, offset: torch.Tensor, keys: torch.Tensor) -> None:
        raise NotImplementedError

    def _write_pairs(self, slots: torch.Tensor, key, value, isa: str) -> None:
        """Keys and values [M, D] into physical slots (page * bs + offset) [M]."""
        page, offset = slots // self.block_size, slots % self.block_size
        self._set_keys(page, offset, key.to(self._keys.dtype))
        self._values[page, offset] = value.to(self._values.dtype)

    # ------------------------------------------------------------------ writes and moves
    def score_index(self, slots: torch.Tensor) -> torch.Tensor:
        """float32 elements of the buffer holding the scores of physical slots `slots`."""
        page, offset = slots // self.block_size, slots % self.block_size
        return page * self.slot_scores.stride(0) + self.slot_scores.storage_offset() + offset

    def write(self, slots, score_index, key, value, scores, isa: str) -> None:
        """A layer's step: K/V [T, H, D] (or [T, H * D]) into physical slots [T * H] ((token, head) order), scores
        [T, H] through their `score_index` (`isa` is the CPU kernel's)."""
        D = self.head_size
        self._write_pairs(slots, key.reshape(-1, D), value.reshape(-1, D), isa)
        self._scores_flat[score_index] = scores.reshape(-1).float()

    def move(self, sp, so, dp, do, scores: bool = True) -> None:
        """Copy the K/V pairs (and their scores) at (page, offset) sp, so to dp, do ([M] each),
        `MOVE_PAIRS` at a time (gather, then scatter: no destination is a later source)."""
        if scores:
            self.slot_scores[dp, do] = self.slot_scores[sp, so]
        for i in range(0, sp.numel(), MOVE_PAIRS):
            s = slice(i, i + MOVE_PAIRS)
            keys = self.key_at(sp[s], so[s])  # [m, D] (advanced indexing copies)
            values = self._values[sp[s], so[s]]
            self._set_keys(dp[s], do[s], keys)
            self._values[dp[s], do[s]] = values


class TransposedKeyPages(PagePool):
    """Keys `[D, block_size]` per page: vLLM's CPU attention layout (`vec`/`vec16`)."""

    layout = "transposed"

    def _key_view(self, keys, head_size):
        return keys.view(keys.shape[0], head_size, self.block_size)

    def key_at(self, page, offset):
        return self._keys[page, :, offset]

    def _set_keys(self, page, offset, keys):
        self._keys[page, :, offset] = keys

    def _write_pairs(self, slots, key, value, isa):
        from vllm_kvzap.compat import cpu_attn_reshape_and_cache

        M, D = key.shape
        cpu_attn_reshape_and_cache(
            key.view(M, 1, D), value.view(M, 1, D), self.key_cache, self.value_cache, slots, isa
        )


class PlainKeyPages(PagePool):
    """Keys `[block_size, D]` per page: what vLLM's Triton `unified_attention` reads."""

    layout = "plain"

    def _key_view(self, keys, head_size):
        return keys.view(keys.shape[0], self.block_size, head_size)

    def key_at(self, page, offset):
        return self._keys[page, offset]

    def _set_keys(self, page, offset, keys):
        self._keys[page, offset] = keys


PAGE_LAYOUTS = {cls.layout: cls for cls in (TransposedKeyPages, PlainKeyPages)}
