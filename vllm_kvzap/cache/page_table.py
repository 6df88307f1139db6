"""Worker-side page state of paged mode: persistent tensors indexed by (layer, batch slot, KV head).

vLLM allocates the KV cache as one buffer viewed per layer as `[num_blocks, H_kv, block_size, C]`;
every (layer, block, head) cell is a *page* of `block_size` slots of `C = 2 * head_size +
SCORE_BYTES / element size` elements (`page_cell`; `cache/spec.py` makes vLLM count the score bytes
in its KV budget). A page holds its `block_size` keys, then its `block_size` values (`[block_size,
D]`), then one float32 score per slot (`slot_scores`, a strided view of the same buffer). Keys are
stored transposed (`[D, block_size]`, `key_layout="transposed"`) in vLLM's CPU layout for the
`vec`/`vec16` ISAs, whose kernel the CPU backend calls (`attention/rows.py`), or plainly
(`[block_size, D]`, `key_layout="plain"`) for vLLM's Triton `unified_attention`
(`attention/triton_rows.py`), which reads any strides. Both kernels take the page stride from the
tensors, so the scores after the values are invisible to them. All pages but the null block's
form one pool, shared by every layer, head and request (a free-page stack).

Each (request, layer, KV head) is a *row* of the engine's attention kernel: a page list where
logical slot `j` lives at `pages[j // bs]`, offset `j % bs`, and the row's resident pairs are
exactly slots `0 .. seq_len - 1` (what vLLM's CPU kernel reads with one KV head per row):
- while the prompt is processed (or recomputed after preemption) the row is *dense*: slot = position;
- at the start of its first decoding step the row is *compacted*: the `K` kept prompt tokens older
  than the window move, in order, to slots `0 .. K-1`, the window follows in order (position `p`
  at slot `K + p - shift`, `shift = max(T - W, 0)`), and the prompt's spare pages go back to the
  pool;
- with chunked prefill (`prefill="chunked"`) the same compaction runs after every prompt chunk
  (`finish_step`, after the forward pass): the chunk's tokens and the window before it are judged
  as far as they left the window, so the next chunk goes after `K` kept pairs and the `W` newest
  tokens (slot `K + p - shift`), and a prompt holds about kept + window + one chunk, not its dense
  size; its first decoding step then starts from a compacted row;
- while decoding, the window and the token leaving it (this step's query still sees it) form a
  *ring* of `R = W + 1` slots after the kept prompt pairs, position `p` at slot `K + (p - shift)
  mod R`, and the decoding survivors follow the ring (`K + R + j`, `j < surv`). The new token takes
  the ring slot of the token that left the window in the previous step, which the step's plan
  judges from the score it got when written: kept, it moves to slot `K + R + surv` (`surv += 1`);
  pruned, it is overwritten. Only kept pairs move. With `W = 0` the ring is the one slot after the
  survivors (`K + surv`): a kept token stays there and the new token goes after it.
A row therefore holds `ceil((K + W + surv + 1) / bs)` pages: memory follows the kept pairs.

The page directory is two-level, so that its size follows the pool, not `max_num_seqs x
max_model_len`: a row's page list is cut in *chunks* of `chunk` page ids (`chunk_pages`, about the
square root of the longest row's pages), drawn from a chunk pool; the row's chunk table says which
chunk holds its columns `c * chunk .. (c + 1) * chunk - 1`. Rows hold `ceil(pages / chunk)` chunks,
so the chunk pool needs `ceil(pool pages / chunk)` full chunks plus one partial chunk per row.
Bytes (`directory_shapes`, `pool_shapes`; S = max_num_seqs, R = L (S + 1) H_kv rows with slot S
a dump row for masked writes, N pages in the buffer, P = ceil((max_model_len + 1) / bs), K = chunk):

    4 R ceil(P / K) + 40 R                        chunk table, row state (allocated with the model)
  + 4 (K + 1) (1 + L S H + ceil(N / K)) + 4 (N + 1)  chunk pool + its free stack, free-page stack

(Qwen3-8B, S = 1024, max_model_len 40960, a 60 GiB pool: 48 + 12 + 108 + 31 MB; the flat
`[L, S, H, P]` directory this replaces was 3.0 GB.) `tests/test_memory_bound.py` checks it.

A step is planned once (`plan`, called when the KV connector binds the step, after it released
finished and preempted requests, before the forward pass) with bulk tensor operations over all
rows of all layers: slots for new requests, the verdicts on the tokens that left the window in
the previous step, compactions, page allocation and frees, every layer's move of the kept ones
(their K/V were written in earlier steps), and the kernel arguments (`StepPlan`; block tables are
gathered when the layers ask). A layer then only indexes the plan (`write_layer`: the step's K/V
and scores; `attention/rows.py`: the kernel call). No Python loop over requests, layers or heads,
and no host synchronisation inside a layer. Sizes come from the host copies in `StepRows` and fixed bounds;
free stacks keep their counters on the device and pop and push with masks. Device-to-host reads
all go through `_read`: one per plan (which decoding rows compact, how many kept pairs move,
whether new rows had a stale slot, the pools' error flags) and one per `reports`; compactions and
releases add their own (steps where requests start decoding or end). A pool that runs dry is
found at the next read (flags on the device), not before the step's forward pass.

Every per-step tensor has a bound (stated where it is made); the largest are a layer's block table
`[B * H, ceil(P_step / K) * K]` int32 (at most 4 max_num_seqs H_kv ceil(P / K) K bytes), the step's
write slots `[L, T * H]` int64, and passes over at most `WORK_ENTRIES` (layer, row, position)
entries (compaction, release) or `MOVE_PAIRS` K/V pairs (moves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvzap.config import PREFILL_MODES
from vllm_kvzap.rule import keep

SCORE_BYTES = 4  # a float32 score per slot, in its page after the values
WORK_ENTRIES = 1 << 20  # entries per pass of a compaction piece or a release block
MOVE_PAIRS = 1 << 16  # K/V pairs per gather/scatter of a move
BLOCK_TABLE_BYTES = 4 << 20  # block tables gathered at once, for as many layers as fit


def cdiv(a, b):
    return -(-a // b)


@dataclass
class ResidentReport:
    pages: int  # pages held after the last step
    next_pages: int  # most pages the next decoding step may hold
    dense: bool  # still in its prompt: the next step is a prefill chunk


@dataclass
class StepRows:
    """The step's requests as the metadata builder sees them, in batch order: cpu tensors (the
    plan reads sizes from them without a device sync), except `keys`, which may already be on
    the page state's device (the first column of vLLM's device block table)."""

    keys: torch.Tensor  # [B] int64: first block id, names the request's pages on the worker
    num_computed: torch.Tensor  # [B] int64: tokens whose KV is already written
    query_lens: torch.Tensor  # [B] int64
    is_prefilling: torch.Tensor  # [B] bool
    query_start_loc: torch.Tensor  # [B + 1] int64


class LayerBlockTables:
    """The step's block tables, one layer at a time: `[layer]` is that layer's `[B * H, width]`
    int32 (row (b, h) -> its page ids), gathered from the chunk table when the layer asks, for it
    and the next layers as far as `BLOCK_TABLE_BYTES` allows (layers ask in order: one gather for
    all layers of a small step). `width = ceil(P_step / chunk) * chunk`, where `P_step` is the
    host-side bound on the step's longest row (its request's tokens after the step, in pages);
    at most `max(BLOCK_TABLE_BYTES, max_num_seqs * H_kv * ceil(max_pages / chunk) * chunk * 4)`
    bytes alive. Columns past a row's pages hold ids the kernel never reads (it stops at the
    row's `seq_len`)."""

    def __init__(self, table: PageTable, slots: torch.Tensor, num_chunks: int):
        self.table, self.slots, self.num_chunks = table, slots, num_chunks
        width = num_chunks * table.chunk
        self.group = max(1, BLOCK_TABLE_BYTES // (4 * slots.numel() * table.num_heads * width))
        self.first, self.tables = 0, None  # the gathered layers' first, [layers, B * H, width]

    def __len__(self) -> int:
        return self.table.num_layers

    def __getitem__(self, layer: int) -> torch.Tensor:
        if self.tables is None or not 0 <= layer - self.first < self.group:
            t, c = self.table, self.num_chunks
            layers = slice(layer, min(layer + self.group, t.num_layers))
            ids = t.chunk_table[layers, self.slots, :, :c]  # [l, B, H, c] chunk ids
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


# Row state fields: pages held; prompt survivors (the ring starts after them); decoding survivors
# (after the ring); resident slots in the last step; pruned pairs.
ROW_FIELDS = ("num_pages", "base", "surv", "seq_len", "pruned")
NUM_PAGES, BASE, SURV, SEQ_LEN, PRUNED = range(len(ROW_FIELDS))
KEY_LAYOUTS = ("transposed", "plain")
# the free stacks (counters in `PageTable._top`) and the error flags (`PageTable._short`)
PAGES, CHUNKS, SLOTS, BOUND = range(4)


def page_cell(head_size: int, dtype: torch.dtype) -> int:
    """Elements per slot of a page: its key, its value and its score (`SCORE_BYTES`)."""
    if SCORE_BYTES % dtype.itemsize:
        raise ValueError(f"kv_pruning: no page layout for {dtype} ({dtype.itemsize} bytes)")
    return 2 * head_size + SCORE_BYTES // dtype.itemsize


def max_pages_per_row(max_model_len: int, block_size: int) -> int:
    return cdiv(max_model_len + 1, block_size)  # + the token leaving the window (ring: W + 1)


def chunk_pages(max_pages: int) -> int:
    """Page ids per chunk of the directory: the power of two that minimises a row's chunk-table
    entries plus its one partial chunk (`ceil(P / K) + K`), i.e. about sqrt(P)."""
    return min((cdiv(max_pages, 1 << i) + (1 << i), 1 << i) for i in range(17))[1]


def directory_shapes(
    num_layers, max_slots, num_heads, max_model_len, block_size, chunk: int | None = None
) -> list[tuple]:
    """Shapes of the per-row part of the directory: each row's chunk ids, and its state
    (`ROW_FIELDS`, packed so that a step gathers and scatters them at once). Slot `max_slots` is
    a dump row for masked writes."""
    P = max_pages_per_row(max_model_len, block_size)
    K = chunk or chunk_pages(P)
    rows = (num_layers, max_slots + 1, num_heads)
    return [(*rows, cdiv(P, K)), (*rows, len(ROW_FIELDS))]


def allocate_directory(
    num_layers, max_slots, num_heads, max_model_len, block_size, device, chunk: int | None = None
):
    """The per-row part of the directory (chunk table int32, row state int64): allocated with the
    model, where vLLM's memory profile counts it."""
    table_shape, state_shape = directory_shapes(
        num_layers, max_slots, num_heads, max_model_len, block_size, chunk
    )
    return (
        torch.zeros(table_shape, dtype=torch.int32, device=device),
        torch.zeros(state_shape, dtype=torch.int64, device=device),
    )


def pool_shapes(num_pages: int, num_rows: int, chunk: int) -> dict[str, tuple]:
    """Shapes of the pool part of the directory, for `num_pages` pages in the buffer and
    `num_rows` rows: the chunk pool (chunk 0 is a dump for masked writes, then one partial chunk
    per row and enough full ones for every page), its free stack and the free-page stack (each
    with a dump entry at the end)."""
    num_chunks = 1 + num_rows + cdiv(num_pages, chunk)
    return {
        "chunks": (num_chunks, chunk),
        "free_chunks": (num_chunks,),
        "free_pages": (num_pages + 1,),
    }


def allocate_pool(num_pages: int, num_rows: int, chunk: int, device) -> dict[str, torch.Tensor]:
    """The pool part of the directory (int32), allocated once the KV cache exists."""
    return {
        name: torch.zeros(shape, dtype=torch.int32, device=device)
        for name, shape in pool_shapes(num_pages, num_rows, chunk).items()
    }


class PageTable:
    def __init__(
        self,
        kv_caches: list[torch.Tensor],
        window: int,
        threshold: float,
        max_slots: int,
        max_model_len: int,
        ratio: float | None = None,
        alpha: float = 0.2,
        key_layout: str = "transposed",
        directory: tuple[torch.Tensor, torch.Tensor] | None = None,
        chunk: int | None = None,
        heads=None,
        prefill: str = "dense",
    ):
        if key_layout not in KEY_LAYOUTS:
            raise ValueError(f"key_layout must be one of {KEY_LAYOUTS}, got {key_layout!r}")
        if prefill not in PREFILL_MODES or (prefill == "chunked" and ratio is not None):
            raise ValueError(
                f"prefill must be one of {PREFILL_MODES} (threshold mode), got {prefill!r}"
            )
        # "chunked": prompt rows are compacted after every chunk (`finish_step`), not at the end
        self.chunked_prefill = prefill == "chunked"
        self.key_layout = key_layout
        first = kv_caches[0]
        self.device = dev = first.device
        num_blocks, num_heads, block_size, cell = first.shape
        self.num_layers, self.num_heads, self.block_size = len(kv_caches), num_heads, block_size
        self.head_size = D = (cell - SCORE_BYTES // first.element_size()) // 2
        if D <= 0 or page_cell(D, first.dtype) != cell:
            raise ValueError(
                f"kv_pruning: KV cache cells of {cell} elements are not 2 * head_size + a "
                f"{SCORE_BYTES}-byte score (`page_cell`; caches come from KVzapAttentionSpec)"
            )
        self.window = window
        self.ratio, self.alpha = ratio, alpha  # ratio mode: AdaKV over the prompt (window 0)
        # tensor parallelism: this rank's KV heads (`runtime.TensorParallelHeads`), or None
        self.heads = heads
        page_elems = block_size * cell
        storage = first.untyped_storage()
        es = first.element_size()
        num_pages = storage.nbytes() // (page_elems * es)
        self.num_pages_total = num_pages
        # [num_pages, page]: the flat page; key_cache/value_cache are the kernel's views
        self.kv_pages = torch.empty(0, dtype=first.dtype, device=dev).set_(
            storage, 0, (num_pages, page_elems), (page_elems, 1)
        )
        half = block_size * D
        paged = self.kv_pages[:, : 2 * half].view(num_pages, 1, 2 * block_size, D)
        self.key_cache, self.value_cache = paged.chunk(2, dim=2)  # [pages, 1, bs, D] each
        if key_layout == "transposed":
            self._keys = self.kv_pages[:, :half].view(num_pages, D, block_size)
        else:
            self._keys = self.kv_pages[:, :half].view(num_pages, block_size, D)
        self._values = self.kv_pages[:, half : 2 * half].view(num_pages, block_size, D)
        # the scores: float32 [num_pages, bs] after each page's values (inside vLLM's budget)
        self.slot_scores = torch.empty(0, dtype=torch.float32, device=dev).set_(
            storage, 2 * half * es // 4, (num_pages, block_size), (page_elems * es // 4, 1)
        )
        self._scores_flat = torch.empty(0, dtype=torch.float32, device=dev).set_(
            storage, 0, (storage.nbytes() // 4,), (1,)
        )  # the buffer as float32 elements: `StepPlan.score_index` points into it
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

        L, S, H = self.num_layers, max_slots, num_heads
        self.max_slots = S
        self.max_pages = max_pages_per_row(max_model_len, block_size)
        self.chunk = K = chunk or chunk_pages(self.max_pages)
        # the per-row directory (`directory_shapes`): given when allocated earlier (at model load,
        # so that vLLM's memory profile counts it), else allocated here; slot S is a dump row
        if directory is None or [tuple(t.shape) for t in directory] != directory_shapes(
            L, S, H, max_model_len, block_size, K
        ):
            directory = allocate_directory(L, S, H, max_model_len, block_size, dev, K)
        self.chunk_table, self.state = directory  # [L, S+1, H, chunks] int32, [.., fields] int64
        self.chunk_table.zero_()
        self.state.zero_()
        self.num_pages, self.base, self.surv, self.seq_len, self.pruned = (
            self.state.unbind(-1)
        )
        # the pool part: chunks of page ids, and the free stacks (`pool_shapes`)
        pool = allocate_pool(num_pages, L * S * H, K, dev)
        self.chunks, self.free_chunks, self.free_pages = (
            pool["chunks"], pool["free_chunks"], pool["free_pages"]
        )  # fmt: skip
        self.num_chunks = self.chunks.shape[0]
        self.free_pages[: self.capacity] = usable
        self.free_chunks[: self.num_chunks - 1] = torch.arange(
            self.num_chunks - 1, 0, -1, dtype=torch.int32, device=dev
        )  # chunk 0 is the dump
        # per slot (slot S: the dump row); index -1 (no slot) lands on it
        self.num_tokens = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        self.shift = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        self.dense = torch.ones(S + 1, dtype=torch.bool, device=dev)
        self.peak_pages = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        # each slot's threshold (ratio in ratio mode): the engine's, or its request's own, which
        # `set_request_values` parks by key until the request takes a slot. Thresholds compare in
        # float32 as kvpress's (a Python float against float32 scores); ratios stay float64
        # (`adakv_counts`: 0.3 in float32 is another number).
        self.default_value = float(threshold if ratio is None else ratio)
        vdtype = torch.float32 if ratio is None else torch.float64
        self.slot_value = torch.full((S + 1,), self.default_value, dtype=vdtype, device=dev)
        self.key_of_slot = torch.full((S + 1,), -1, dtype=torch.int64, device=dev)
        # per key (a block id; entry num_blocks: the dump for key -1)
        self.key_value = torch.full((num_blocks + 1,), float("nan"), dtype=vdtype, device=dev)
        self.slot_of_key = torch.full((num_blocks + 1,), -1, dtype=torch.int64, device=dev)
        self.free_slots = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        self.free_slots[:S] = torch.arange(S - 1, -1, -1, dtype=torch.int64, device=dev)
        # the free stacks' tops (pages, chunks, slots) and error flags (a stack ran dry by that
        # many; a row grew past its host-side bound), read with the step's reads
        self._top = torch.tensor(
            [self.capacity, self.num_chunks - 1, S], dtype=torch.int64, device=dev
        )
        self._short = torch.zeros(4, dtype=torch.int64, device=dev)
        self._report: tuple[torch.Tensor, ...] | None = None  # the last step's, for `reports`
        # chunked prefill: the last step's prompt rows (slots, unjudged tokens after the step on
        # the host), compacted by `finish_step`
        self._chunk_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._layer_idx = torch.arange(L, device=dev).view(-1, 1, 1)
        self._head_idx = torch.arange(H, device=dev).view(1, 1, -1)
        self._row_starts = torch.arange(S * H + 1, dtype=torch.int32, device=dev)  # decode rows: one query each

    # ------------------------------------------------------------------ host reads
    def _read(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Every device-to-host read of the page state goes through here (`what` names it)."""
        return t.cpu()

    def _check(self, short: torch.Tensor) -> None:
        """Raise on the error flags (a host copy of `_short`)."""
        pages, chunks, slots, bound = (int(x) for x in short)
        if pages:
            raise RuntimeError(
                f"kv_pruning page pool exhausted: {pages} pages more wanted than were free "
                "(scheduler accounting and worker pages disagree)"
            )
        if slots:
            raise RuntimeError(f"kv_pruning: more running requests than {self.max_slots}")
        if chunks or bound:
            raise RuntimeError(f"kv_pruning: page directory out of bounds ({chunks}, {bound})")

    @property
    def num_free(self) -> int:
        """Free pages (a device read: for tests and tools)."""
        return int(self._top[PAGES])

    @property
    def num_free_chunks(self) -> int:
        return int(self._top[CHUNKS])

    @property
    def num_free_slots(self) -> int:
        return int(self._top[SLOTS])

    # ------------------------------------------------------------------ stacks (no host reads)
    def _push(self, which: int, stack: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
        """Push `values[valid]` ([M], in order) onto a free stack; the others go to its dump."""
        v = valid.long()
        top = self._top[which]
        pos = torch.where(valid, top + v.cumsum(0) - v, stack.numel() - 1)
        stack[pos.clamp_(max=stack.numel() - 1)] = values.to(stack.dtype)
        self._top[which] = top + v.sum()

    def _pop(self, which: int, stack: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One item of a free stack for each valid entry of `valid` ([M]): the top `sum(valid)`
        items, bottom first, in entry order; invalid entries get any item. A stack that runs dry
        sets its error flag (checked at the next read) and hands out items it does not have."""
        v = valid.long()
        top, total = self._top[which], v.sum()
        idx = (top - total + v.cumsum(0) - v).clamp_(0, stack.numel() - 2)
        items = stack[idx]
        self._short[which] = torch.maximum(self._short[which], total - top)
        self._top[which] = (top - total).clamp(min=0)
        return items

    # ------------------------------------------------------------------ directory lookups
    def _page_of(self, slot: torch.Tensor, logical: torch.Tensor, layers=None):
        """(page ids, offsets) of logical slots [l, X, H, *rest] of request slots [X], in all
        layers or in `layers` ([l])."""
        extra = (1,) * (logical.dim() - 3)
        layer = (self._layer_idx if layers is None else layers).view(-1, 1, 1, *extra)
        head = self._head_idx.view(1, 1, -1, *extra)
        page = self._page_at(layer, slot.view(1, -1, 1, *extra), head, logical)
        return page, logical % self.block_size

    def _page_at(self, layer, slot, head, logical) -> torch.Tensor:
        """Page ids of logical slots of rows (layer, request slot, head): index tensors that
        broadcast together (`_page_of`), or [M] each, one row per entry."""
        col = (logical // self.block_size).clamp(max=self.max_pages - 1)
        return self.chunks[self.chunk_table[layer, slot, head, col // self.chunk], col % self.chunk]

    def _phys(self, slot: torch.Tensor, logical: torch.Tensor, layers=None) -> torch.Tensor:
        """Physical slots (page * bs + offset) of logical slots [l, X, H, *rest]."""
        page, offset = self._page_of(slot, logical, layers)
        return page.long() * self.block_size + offset

    def held_page_ids(self) -> torch.Tensor:
        """Every page id some row holds (tests and tools; reads the device)."""
        cols = torch.arange(self.max_pages, device=self.device)
        slots = torch.arange(self.max_slots + 1, device=self.device)
        pages, _ = self._page_of(slots, cols.view(1, 1, 1, -1) * self.block_size)
        return pages[cols < self.num_pages[..., None]]

    # ------------------------------------------------------------------ requests
    def release_keys(self, keys: list[int]) -> None:
        if not keys:
            return
        keys_t = torch.tensor(keys, dtype=torch.int64, device=self.device)
        self._release_slots(self.slot_of_key[keys_t])

    def _release_slots(self, slots: torch.Tensor) -> None:
        """Give back the pages, chunks and slots of request slots [X] (-1: none). One host read
        (which are slots, and their rows' page counts); then blocks of at most `WORK_ENTRIES`
        page ids."""
        L, H, K = self.num_layers, self.num_heads, self.chunk
        X = slots.numel()
        if X == 0:
            return
        npg = self.num_pages[:, slots]  # [L, X, H] (the dump row's zeros for -1)
        got = self._read(torch.cat(((slots >= 0).long(), npg.flatten())), "release")
        live_h = got[:X].bool()
        if not bool(live_h.any()):
            return
        idx_h = live_h.nonzero().flatten()
        slots = slots[idx_h.to(self.device)]
        npg_h = got[X:].view(L, X, H)[:, idx_h]  # [L, X', H]
        X = slots.numel()
        # the rows' chunks, in (layer, slot, head, column) order: the order of the old page list
        held_h = cdiv(npg_h, K).flatten()
        M = int(held_h.sum())
        row_h = torch.repeat_interleave(torch.arange(held_h.numel()), held_h)
        col_h = torch.arange(M) - (held_h.cumsum(0) - held_h)[row_h]
        npg_rows = npg_h.flatten().to(self.device)
        block = max(1, WORK_ENTRIES // K)
        kcols = torch.arange(K, device=self.device)
        for start in range(0, M, block):
            row = row_h[start : start + block].to(self.device)
            col = col_h[start : start + block].to(self.device)
            layer, x, head = row // (X * H), (row // H) % X, row % H
            chunk = self.chunk_table[layer, slots[x], head, col]  # [m]
            pages = self.chunks[chunk]  # [m, K]
            valid = col[:, None] * K + kcols < npg_rows[row][:, None]
            self._push(PAGES, self.free_pages, pages.flatten(), valid.flatten())
            self._push(CHUNKS, self.free_chunks, chunk, torch.ones_like(col, dtype=torch.bool))
        self.state[:, slots] = 0
        self.num_tokens[slots] = 0
        self.shift[slots] = 0
        self.dense[slots] = True
        self.peak_pages[slots] = 0
        self.slot_of_key[self.key_of_slot[slots]] = -1
        self.key_of_slot[slots] = -1
        self._push(SLOTS, self.free_slots, slots, torch.ones_like(slots, dtype=torch.bool))

    def set_request_values(self, values: dict[int, float]) -> None:
        """Own thresholds (ratios) of requests that take a slot in the next plan, by key."""
        if values:
            self.key_value[torch.tensor(list(values), device=self.device)] = torch.tensor(
                list(values.values()), dtype=self.key_value.dtype, device=self.device
            )

    def _assign_slots(self, keys: torch.Tensor) -> None:
        slots = self._pop(SLOTS, self.free_slots, torch.ones_like(keys, dtype=torch.bool))
        self.slot_of_key[keys] = slots
        self.key_of_slot[slots] = keys
        own = self.key_value[keys]
        self.slot_value[slots] = torch.where(own.isnan(), self.default_value, own)
        self.key_value[keys] = float("nan")

    # ------------------------------------------------------------------ verdicts
    def _keep(self, page: torch.Tensor, offset: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Keep decisions of the pairs at (page, offset) [l, X, H, ...] of request slots [X]
        (ratio mode: every generated pair is kept)."""
        if self.ratio is not None:
            return torch.ones(page.shape, dtype=torch.bool, device=self.device)
        thr = self.slot_value[slots].view(1, -1, *([1] * (page.dim() - 2)))
        return keep(self.slot_scores[page, offset], thr)

    def _prompt_keep(self, page, offset, slots: torch.Tensor, lengths: torch.Tensor):
        """Verdicts on the prompt's pairs at (page, offset) [l, C, H, T] (lengths [C]): the
        threshold, or in ratio mode AdaKV over each layer's whole prompt (`scorers/adakv.py`)."""
        if self.ratio is None:
            return self._keep(page, offset, slots)
        from vllm_kvzap.scorers.adakv import adakv_keep

        scores = self.slot_scores[page, offset].permute(1, 0, 3, 2)  # [C, l, T, H]
        if self.heads is not None:  # the rule spans the layer's heads on all ranks
            scores = self.heads.gather(scores)
        keep = adakv_keep(scores, lengths, self.slot_value[slots], self.alpha)
        if self.heads is not None:
            keep = self.heads.own(keep)
        return keep.permute(1, 0, 3, 2)

    def _overwritten(self, slots, in_ring, base, surv, over):
        """The token in the ring slot the next token of each decoding row takes (`in_ring` [B]
        tokens in its ring so far, `base`, `surv` [L, B, H]): its (page, offset) [L, B, H] and,
        where `over` ([B]: it left the window in the last step), its verdict (else False)."""
        R = self.window + 1
        ring = (base if self.window else base + surv) + (in_ring % R)[None, :, None]
        page, offset = self._page_of(slots, ring)
        return page, offset, self._keep(page, offset, slots) & over[None, :, None]

    def _pieces(self, lengths_h: torch.Tensor):
        """Split work over prompts of `lengths_h` (host, [C]) into (layers, request indices)
        pieces of at most `WORK_ENTRIES` (layer, request, head, position) entries (prompts padded
        to the piece's longest), or one layer of one prompt when that alone is more. Host only."""
        L, H = self.num_layers, self.num_heads
        order = torch.argsort(lengths_h, descending=True, stable=True)
        i, C = 0, order.numel()
        while i < C:
            per_layer = H * max(1, int(lengths_h[order[i]]))
            if per_layer * L <= WORK_ENTRIES:
                n = min(C - i, WORK_ENTRIES // (per_layer * L))
                yield (0, L), order[i : i + n]
                i += n
            else:
                group = max(1, WORK_ENTRIES // per_layer)
                for l0 in range(0, L, group):
                    yield (l0, min(L, l0 + group)), order[i : i + 1]
                i += 1

    def _compact(self, slots: torch.Tensor, unjudged_h: torch.Tensor) -> None:
        """Judge the prompt tokens older than the window and keep survivors + window: at the end
        of a dense prompt (its first decoding step), or after each chunk with chunked prefill.
        A row's `unjudged_h` (host, [C]) newest tokens sit in order after its `base` kept ones
        (dense: base 0, every token). In `_pieces` (whole rows, some layers); one host read per
        piece (how many pairs move)."""
        dev, W = self.device, self.window
        unjudged = unjudged_h.to(dev)
        # a prompt's peak is just before a compaction (pages never shrink while decoding: a
        # pruned token's ring slot is reused)
        held = self.num_pages[:, slots].sum((0, 2))
        self.peak_pages[slots] = torch.maximum(self.peak_pages[slots], held)
        for (l0, l1), idx_h in self._pieces(unjudged_h):
            idx, longest = idx_h.to(dev), int(unjudged_h[idx_h].max())
            layers = torch.arange(l0, l1, device=dev)
            self._compact_piece(layers, slots[idx], unjudged[idx], longest)
        self.shift[slots] += (unjudged - W).clamp(min=0)
        self.dense[slots] = False

    def _compact_piece(self, layers, slots, unjudged, T: int) -> None:
        """Compact rows [l, C, H] (layers `layers`, request slots `slots`, `unjudged` <= T tokens
        after `base`): temporaries of l C H T entries. Token `i` of the unjudged ones is at
        logical slot `base + i`; those older than the window (`i < unjudged - W`) are judged,
        the kept ones move to `base ..`, the window follows them in order."""
        W, bs, K, H = self.window, self.block_size, self.chunk, self.num_heads
        dev = self.device
        lsel, ssel = layers[:, None, None], slots[None, :, None]
        base = self.base[lsel, ssel, self._head_idx]  # [l, C, H]
        i = torch.arange(T, device=dev)
        num_judged = (unjudged - W).clamp(min=0)  # [C]
        valid = i[None] < unjudged[:, None]  # [C, T]
        judged = (i[None] < num_judged[:, None])[None, :, None, :]  # [1, C, 1, T]
        page, offset = self._page_of(slots, base[..., None] + i, layers)  # [l, C, H, T]
        keep = self._prompt_keep(page, offset, slots, unjudged)
        kept = keep & judged
        survivors = kept.sum(-1)  # [l, C, H]
        self.pruned[lsel, ssel, self._head_idx] += (judged & ~keep).sum(-1)
        in_window = (valid & ~judged[0, :, 0])[None, :, None, :]
        window_slot = survivors[..., None] + i - num_judged[None, :, None, None]
        dest = torch.where(kept, kept.cumsum(-1) - 1, torch.where(in_window, window_slot, -1))
        moving = ((dest >= 0) & (dest != i)).flatten()
        count = int(self._read(moving.sum(), "compaction"))
        if count:
            sel = torch.nonzero_static(moving, size=count).flatten()
            row, C = sel // T, slots.numel()  # row = (layer, request, head) of each moving pair
            lay, req, head = layers[row // (C * H)], slots[(row // H) % C], row % H
            dst = base.flatten()[row] + dest.flatten()[sel]
            dst_page = self._page_at(lay, req, head, dst)
            self._move(page.flatten()[sel], offset.flatten()[sel], dst_page, dst % bs)
        # give back the spare pages and chunks (the step's allocation adds what it needs); they
        # lie in the columns from base // bs on, at most ceil(T / bs) + 1 of them
        resident = base + survivors + (unjudged - num_judged)[None, :, None]
        need = cdiv(resident, bs)
        have = self.num_pages[lsel, ssel, self._head_idx]  # [l, C, H] <= ceil((base + T) / bs)
        cols = (base // bs)[..., None] + torch.arange(cdiv(T, bs) + 1, device=dev)
        spare = (cols >= need[..., None]) & (cols < have[..., None])
        spare_pages, _ = self._page_of(slots, cols * bs, layers)
        self._push(PAGES, self.free_pages, spare_pages.flatten(), spare.flatten())
        num_ccols = cdiv(cdiv(T, bs) + 1, K) + 1
        ccols = (base // bs // K)[..., None] + torch.arange(num_ccols, device=dev)
        spare = (ccols >= cdiv(need, K)[..., None]) & (ccols < cdiv(have, K)[..., None])
        ccols = ccols.clamp(max=self.chunk_table.shape[-1] - 1)
        heads = self._head_idx[..., None]
        spare_chunks = self.chunk_table[lsel[..., None], ssel[..., None], heads, ccols]
        self._push(CHUNKS, self.free_chunks, spare_chunks.flatten(), spare.flatten())
        self.num_pages[lsel, ssel, self._head_idx] = torch.minimum(have, need)
        self.base[lsel, ssel, self._head_idx] = base + survivors
        self.surv[lsel, ssel, self._head_idx] = 0
        self.seq_len[lsel, ssel, self._head_idx] = resident

    def _move(self, sp, so, dp, do) -> None:
        """Copy the pairs and their scores at (page, offset) sp, so to dp, do."""
        self.slot_scores[dp, do] = self.slot_scores[sp, so]
        self._move_pairs(sp, so, dp, do)

    def key_at(self, page: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The keys [..., D] at (page, offset), in either key layout (a copy)."""
        if self.key_layout == "transposed":
            return self._keys[page, :, offset]
        return self._keys[page, offset]

    def _move_pairs(self, sp, so, dp, do) -> None:
        """Copy the K/V pairs at (page, offset) sp, so to dp, do ([M] each), in the page layout,
        `MOVE_PAIRS` at a time (gather, then scatter: no destination is a later source)."""
        for i in range(0, sp.numel(), MOVE_PAIRS):
            s = slice(i, i + MOVE_PAIRS)
            keys = self.key_at(sp[s], so[s])  # [m, D] (advanced indexing copies)
            values = self._values[sp[s], so[s]]
            if self.key_layout == "transposed":
                self._keys[dp[s], :, do[s]] = keys
            else:
                self._keys[dp[s], do[s]] = keys
            self._values[dp[s], do[s]] = values

    # ------------------------------------------------------------------ the step
    def plan(self, rows: StepRows) -> StepPlan:
        """The step's plan (made once per step: `runtime.bind_step` keeps it for the layers)."""
        W, bs, L, H, K = self.window, self.block_size, self.num_layers, self.num_heads, self.chunk
        dev = self.device
        # host-side sizes (StepRows' cpu tensors: no device reads)
        qlens_h, computed_h = rows.query_lens, rows.num_computed
        B = qlens_h.numel()
        decoding_h = (qlens_h == 1) & ~rows.is_prefilling
        fresh_h = computed_h == 0
        max_qlen = int(qlens_h.max()) if B else 0
        T = int(rows.query_start_loc[-1]) if B else 0
        longest = int((computed_h + qlens_h).max()) if B else 0  # tokens of the longest request
        keys, computed, qlens = (t.to(dev) for t in (rows.keys, computed_h, qlens_h))
        query_start_loc = rows.query_start_loc.to(dev)
        slots = self.slot_of_key[keys]

        # decoding rows whose ring is full: the ring slot the new token takes holds the token
        # that left the window in the last step, judged now (before the read, which counts the
        # kept ones: they move to the survivors; the pruned ones are overwritten). Host-side
        # superset: in_ring = computed - shift >= R needs computed >= R.
        R = W + 1
        cand_h = decoding_h & ~fresh_h & (computed_h >= R)
        decoding = decoding_h.to(dev)  # [B]; the others are prompt rows
        keep = None  # [L, B, H]: the overwritten token is kept (a survivor now)
        num_moves = torch.zeros(1, dtype=torch.int64, device=dev)
        if bool(cand_h.any()):
            base0, surv0 = self.base[:, slots], self.surv[:, slots]
            in_ring0 = computed - self.shift[slots]
            over = decoding & ~self.dense[slots] & (in_ring0 >= R)  # [B]
            page_o, offset_o, keep = self._overwritten(slots, in_ring0, base0, surv0, over)
            survivor_slot = base0 + R + surv0  # where a kept one moves
            if W:
                num_moves = keep.sum().view(1)

        # the plan's one read: the pools' flags, the pairs that move, new rows' stale slots,
        # which decoding rows compact
        fresh_idx_h, dec_idx_h = fresh_h.nonzero().flatten(), decoding_h.nonzero().flatten()
        compacting_h = decoding_h & fresh_h
        moves = 0
        if fresh_idx_h.numel() or dec_idx_h.numel():
            fresh_idx, dec_idx = fresh_idx_h.to(dev), dec_idx_h.to(dev)
            stale, dense = (slots[fresh_idx] >= 0).long(), self.dense[slots[dec_idx]].long()
            got = self._read(torch.cat((self._short, num_moves, stale, dense)), "plan")
            self._check(got[:4])
            moves, nf = int(got[4]), fresh_idx_h.numel()
            stale_h, dense_h = got[5 : 5 + nf].bool(), got[5 + nf :].bool()
            compacting_h[dec_idx_h[dense_h]] = True
            if bool(stale_h.any()):  # new, or recomputing after preemption: start afresh
                self._release_slots(slots[fresh_idx_h[stale_h].to(dev)])
            if nf:
                self._assign_slots(keys[fresh_idx])
                slots = self.slot_of_key[keys]
        if bool(compacting_h.any()):  # first decoding step: compact the prompt first
            comp_h = compacting_h.nonzero().flatten()
            self._compact(slots[comp_h.to(dev)], computed_h[comp_h])
        st = self.state[:, slots]
        npg, base, surv, pruned = st[..., NUM_PAGES], st[..., BASE], st[..., SURV], st[..., PRUNED]
        if keep is not None:  # rows judged above neither compacted nor started afresh
            surv = surv + keep
            pruned = pruned + (over[None, :, None] & ~keep)

        # this step's logical slots and lengths, per (layer, request, head): a decoding row is
        # `base` kept prompt pairs, the ring of R = W + 1 slots (the window and the token
        # leaving it, which this step's query still sees), then the survivors; with W = 0 the
        # ring is its one slot after the survivors
        in_ring = computed - self.shift[slots]  # tokens in the ring before this step
        ring_start = base if W else base + surv
        new_logical = ring_start + (in_ring % R)[None, :, None]
        seq = base + surv + (in_ring + 1).clamp(max=R)[None, :, None]
        # prompt rows (dense, or compacted after an earlier chunk: `base` kept pairs, then the
        # tokens from `shift` on in order): the chunk follows the resident slots
        prompt_start = base - self.shift[slots][None, :, None]  # [L, B, H]: slot of position 0
        prompt_seq = prompt_start + (computed + qlens)[None, :, None]
        seq = torch.where(decoding[None, :, None], seq, prompt_seq)

        # pages: allocate what the step needs (compaction already gave back the spare ones);
        # a row grows by at most ceil(query_len / bs) pages (one in a decoding step)
        need = (seq + bs - 1) // bs
        self._grow(slots, npg, need, cdiv(qlens_h, bs))
        npg = torch.maximum(npg, need)

        # the kept tokens leaving the ring -> the survivors' next slot (all layers at once)
        if moves:
            sel = torch.nonzero_static(keep.flatten(), size=moves).flatten()
            layer, b, head = sel // (B * H), (sel // H) % B, sel % H
            dst = survivor_slot.flatten()[sel]
            dst_page = self._page_at(layer, slots[b], head, dst)
            self._move_pairs(
                page_o.flatten()[sel], offset_o.flatten()[sel], dst_page, dst % bs
            )
        phys_new = self._phys(slots, new_logical)  # [L, B, H]
        self.state[:, slots] = torch.stack((npg, base, surv, seq, pruned), -1)
        self._report = (keys, slots)
        self._chunk_rows = None
        if self.chunked_prefill and not bool(decoding_h.all()):
            prompt_h = (~decoding_h).nonzero().flatten()
            # tokens not judged yet after this step: the window before it and its chunk
            unjudged_h = computed_h.clamp(max=W) + qlens_h
            self._chunk_rows = (slots[prompt_h.to(dev)], unjudged_h[prompt_h])

        # writes: (token, head) -> physical slot, in every layer
        if max_qlen == 1 and bool(decoding_h.all()):
            write_slots = phys_new.reshape(L, B * H)
        else:
            tok_req = torch.repeat_interleave(torch.arange(B, device=dev), qlens, output_size=T)
            tok_pos = computed[tok_req] + torch.arange(T, device=dev) - query_start_loc[:-1][tok_req]
            logical = torch.where(
                decoding[tok_req][None, :, None],
                new_logical[:, tok_req],
                prompt_start[:, tok_req] + tok_pos[None, :, None],
            )  # [L, T, H]
            write_slots = self._phys(slots[tok_req], logical).flatten(1)

        # kernel rows: (request, head), each with its own pages and length
        num_cols = max(1, cdiv(longest, bs))  # bounds every row's pages this step
        perm = None
        if max_qlen == 1:
            row_qsl = self._row_starts[: B * H + 1]
        else:  # entry e of row r = (b, h): token qsl[b] + e - row_qsl[r], head h
            row_qlens = qlens.repeat_interleave(H)
            row_qsl = torch.zeros(B * H + 1, dtype=torch.int32, device=dev)
            row_qsl[1:] = row_qlens.cumsum(0)
            row = torch.repeat_interleave(torch.arange(B * H, device=dev), row_qlens, output_size=T * H)
            t = torch.arange(T * H, device=dev) - row_qsl[:-1].long()[row]
            perm = (query_start_loc[row // H] + t) * H + row % H

        self.num_tokens[slots] = computed + qlens
        return StepPlan(
            num_tokens=T,
            block_tables=LayerBlockTables(self, slots, cdiv(num_cols, K)),
            seq_lens=seq.reshape(L, B * H).to(torch.int32),
            row_query_start_loc=row_qsl,
            query_perm=perm,
            write_slots=write_slots,
            score_index=self._score_index(write_slots),
            max_query_len=max(1, max_qlen),
            max_seq_len=num_cols * bs,
        )

    def _entries(self, shape, bound_h: torch.Tensor):
        """Entries (row, j) for j < bound of each row of rows [L, B, H] (flattened), with a
        host-side bound per request (bound_h [B]): L H sum(bound_h) entries, in row order."""
        L, B, H = shape
        if B and bool((bound_h == bound_h[0]).all()):  # the same bound (decoding: 1) everywhere
            n = int(bound_h[0])
            row = torch.arange(L * B * H, device=self.device).repeat_interleave(n)
            return row, torch.arange(n, device=self.device).repeat(L * B * H)
        per_row = bound_h.to(self.device)[None, :, None].expand(L, B, H).flatten()
        total = L * H * int(bound_h.sum())
        row = torch.repeat_interleave(
            torch.arange(L * B * H, device=self.device), per_row, output_size=total
        )
        j = torch.arange(total, device=self.device) - (per_row.cumsum(0) - per_row)[row]
        return row, j

    def _grow(self, slots, have: torch.Tensor, need: torch.Tensor, bound_h: torch.Tensor) -> None:
        """Rows [L, B, H] grow from `have` to `need` pages (no more than `bound_h` [B], host):
        chunks first, then pages, popped with masks over L H sum(bound) entries."""
        L, B, H = have.shape
        K, S = self.chunk, self.max_slots
        if B == 0:
            return
        deficit = (need - have).clamp(min=0)
        over = deficit - bound_h.to(self.device)[None, :, None]
        self._short[BOUND] = torch.maximum(self._short[BOUND], over.max())
        # chunks: columns ceil(have / K) .. ceil(need / K) - 1
        c_have = cdiv(have, K).flatten()
        c_deficit = (cdiv(need, K).flatten() - c_have).clamp(min=0)
        row, j = self._entries((L, B, H), cdiv(bound_h, K))
        valid = j < c_deficit[row]
        ids = self._pop(CHUNKS, self.free_chunks, valid)
        layer, b, head = row // (B * H), (row // H) % B, row % H
        slot = torch.where(valid, slots[b], S)  # the dump row for the others
        col = torch.where(valid, c_have[row] + j, 0)
        self.chunk_table[layer, slot, head, col] = ids
        # pages: columns have .. need - 1
        row, j = self._entries((L, B, H), bound_h)
        valid = j < deficit.flatten()[row]
        ids = self._pop(PAGES, self.free_pages, valid)
        layer, b, head = row // (B * H), (row // H) % B, row % H
        col = (have.flatten()[row] + j).clamp(max=self.max_pages - 1)
        chunk = self.chunk_table[layer, slots[b], head, col // K]
        target = torch.where(valid, chunk.long() * K + col % K, 0)  # chunk 0: the dump
        self.chunks.view(-1)[target] = ids

    def _score_index(self, phys: torch.Tensor) -> torch.Tensor:
        """float32 elements of `_scores_flat` holding the scores of physical slots `phys`."""
        page, offset = phys // self.block_size, phys % self.block_size
        return page * self.slot_scores.stride(0) + self.slot_scores.storage_offset() + offset

    def write_layer(self, plan: StepPlan, layer_idx: int, key, value, scores, isa: str) -> None:
        """Before the layer's attention: write the step's K/V and scores into their slots (vLLM's
        `cpu_attn_reshape_and_cache` for the transposed layout, an index copy for the plain one;
        `isa` is the CPU kernel's); scores through the plan's `score_index`."""
        slots = plan.write_slots[layer_idx]
        T, H, D = plan.num_tokens, self.num_heads, self.head_size
        if self.key_layout == "transposed":
            from vllm_kvzap.compat import cpu_attn_reshape_and_cache

            cpu_attn_reshape_and_cache(
                key[:T].reshape(T * H, 1, D),
                value[:T].reshape(T * H, 1, D),
                self.key_cache,
                self.value_cache,
                slots,
                isa,
            )
        else:
            page, offset = slots // self.block_size, slots % self.block_size
            self._keys[page, offset] = key[:T].reshape(T * H, D).to(self._keys.dtype)
            self._values[page, offset] = value[:T].reshape(T * H, D).to(self._values.dtype)
        self._scores_flat[plan.score_index[layer_idx]] = scores[:T].reshape(-1).float()

    def finish_step(self) -> None:
        """After the step's forward pass (its K/V and scores are written), with chunked prefill:
        judge the prompt tokens of the step's prompt rows that left the window and give the
        pruned ones' pages back, so the next chunk attends to kept pairs + window + itself and
        the step's report already holds the compacted size."""
        rows, self._chunk_rows = self._chunk_rows, None
        if rows is not None:
            self._compact(*rows)

    # ------------------------------------------------------------------ reporting
    def reports(self) -> dict[int, ResidentReport]:
        """Per request of the last step (by key): pages held, most pages its next step may hold
        (a row grows by at most one slot per step; a dense one is compacted first, which frees
        before it allocates). One host read, which also checks the pools' error flags."""
        if self._report is None:
            return {}
        keys, slots = self._report
        self._report = None
        npg, seq = self.num_pages[:, slots], self.seq_len[:, slots]  # [L, B, H]
        held = npg.sum((0, 2))
        next_pages = torch.maximum(npg, (seq + self.block_size) // self.block_size).sum((0, 2))
        values = torch.stack((keys, held, next_pages, self.dense[slots].long())).flatten()
        got = self._read(torch.cat((self._short, values)), "reports")
        self._check(got[:4])
        keys, held, next_pages, dense = got[4:].view(4, -1).tolist()
        return {
            k: ResidentReport(h, n, bool(d)) for k, h, n, d in zip(keys, held, next_pages, dense)
        }

    def finished_counts(self, key: int) -> tuple[list[int], int, int] | None:
        """(pruned pairs per layer, peak pages, pages now) of a request, or None if unknown."""
        slot = int(self.slot_of_key[key]) if 0 <= key < self.slot_of_key.numel() - 1 else -1
        if slot < 0:
            return None
        slots = torch.tensor([slot], device=self.device)
        if bool(self.dense[slot]):
            # ends in its prompt: count tokens older than the window as judged, as DMS does
            n = max(0, int(self.num_tokens[slot]) - self.window)
            pruned = torch.zeros(self.num_layers, dtype=torch.int64, device=self.device)
            lengths = torch.tensor([n])
            for (l0, l1), _ in (self._pieces(lengths) if n else ()):
                layers = torch.arange(l0, l1, device=self.device)
                positions = torch.arange(n, device=self.device).view(1, 1, 1, -1)
                page, offset = self._page_of(slots, positions, layers)
                keep = self._prompt_keep(page, offset, slots, lengths.to(self.device))
                pruned[l0:l1] = (~keep).sum((1, 2, 3))
        else:  # the token that left the window in the last step is judged here
            in_ring = self.num_tokens[slots] - self.shift[slots]
            over = in_ring > self.window
            _, _, keep = self._overwritten(
                slots, in_ring, self.base[:, slots], self.surv[:, slots], over
            )
            pruned = (self.pruned[:, slots] + (over[None, :, None] & ~keep)).sum((1, 2))
        pages = int(self.num_pages[:, slot].sum())
        return pruned.tolist(), max(int(self.peak_pages[slot]), pages), pages
