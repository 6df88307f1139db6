"""Worker-side page table of paged mode: which pages hold which row's pairs, planned once a step.

The pages themselves, their layouts and the free-page stack are the page pool's
(`cache/page_pool.py`); the per-request and per-row bookkeeping is `cache/row_state.py`; what a
step's layers receive is `cache/step_plan.py`.

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
Bytes (`directory_shapes`, `pool_shapes`; S = max_num_seqs, R = L (S + 1) H_kv rows with request
index S a dump for masked writes, N pages in the buffer, P = ceil((max_model_len + 1) / bs),
K = chunk):

    4 R ceil(P / K) + 40 R                        chunk table, row state (allocated with the model)
  + 4 (K + 1) (1 + L S H + ceil(N / K)) + 4 (N + 1)  chunk pool + its free stack, free-page stack

(Qwen3-8B, S = 1024, max_model_len 40960, a 60 GiB pool: 48 + 12 + 108 + 31 MB; the flat
`[L, S, H, P]` directory this replaces was 3.0 GB.) `tests/test_memory_bound.py` checks it.

A step is planned once (`plan`, called when the KV connector binds the step, after it released
finished and preempted requests, before the forward pass) with bulk tensor operations over all
rows of all layers, in named steps: settle the verdicts on the tokens that left the window in
the previous step, assign indices to new requests, compact rows that start decoding, lay out
the step's slots, grow rows by the pages they need, move the kept pairs (their K/V were written in
earlier steps), then the write slots and the kernel rows (`StepPlan`; block tables are gathered
when the layers ask). A layer then only indexes the plan (`write_layer`: the step's K/V and
scores; `attention/rows.py`: the kernel call). No Python loop over requests, layers or heads, and
no host synchronisation inside a layer. Sizes come from the host copies in `StepRows` and fixed
bounds; free stacks keep their counters on the device and pop and push with masks. Device-to-host
reads all go through `_read`: one per plan (which decoding rows compact, how many kept pairs
move, whether new requests had a stale index, the pools' error flags) and one per `reports`;
compactions and releases add their own (steps where requests start decoding or end). A pool that
runs dry is found at the next read (flags on the device), not before the step's forward pass.

Every per-step tensor has a bound (stated where it is made); the largest are a layer's block table
`[B * H, ceil(P_step / K) * K]` int32 (at most 4 max_num_seqs H_kv ceil(P / K) K bytes), the step's
write slots `[L, T * H]` int64, and passes over at most `WORK_ENTRIES` (layer, row, position)
entries (compaction, release) or `MOVE_PAIRS` K/V pairs (moves, `page_pool.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvzap.cache.page_pool import PAGE_LAYOUTS, FreeStack, cdiv
from vllm_kvzap.cache.row_state import ROW_FIELDS, Requests, RowState
from vllm_kvzap.cache.step_plan import LayerBlockTables, ResidentReport, StepPlan, StepRows
from vllm_kvzap.config import PREFILL_MODES
from vllm_kvzap.rule import keep

WORK_ENTRIES = 1 << 20  # entries per pass of a compaction piece or a release block
# the free stacks' counters (`PageTable._top`) and error flags (`PageTable._short`: a stack ran
# dry by that many; a row grew past its host-side bound)
PAGES, CHUNKS, REQS, BOUND = range(4)


def max_pages_per_row(max_model_len: int, block_size: int) -> int:
    return cdiv(max_model_len + 1, block_size)  # + the token leaving the window (ring: W + 1)


def chunk_pages(max_pages: int) -> int:
    """Page ids per chunk of the directory: the power of two that minimises a row's chunk-table
    entries plus its one partial chunk (`ceil(P / K) + K`), i.e. about sqrt(P)."""
    return min((cdiv(max_pages, 1 << i) + (1 << i), 1 << i) for i in range(17))[1]


def directory_shapes(
    num_layers, max_reqs, num_heads, max_model_len, block_size, chunk: int | None = None
) -> list[tuple]:
    """Shapes of the per-row part of the directory: each row's chunk ids, and its state
    (`row_state.ROW_FIELDS`). Request index `max_reqs` is a dump for masked writes."""
    P = max_pages_per_row(max_model_len, block_size)
    K = chunk or chunk_pages(P)
    rows = (num_layers, max_reqs + 1, num_heads)
    return [(*rows, cdiv(P, K)), (*rows, len(ROW_FIELDS))]


def allocate_directory(
    num_layers, max_reqs, num_heads, max_model_len, block_size, device, chunk: int | None = None
):
    """The per-row part of the directory (chunk table int32, row state int64): allocated with the
    model, where vLLM's memory profile counts it."""
    table_shape, state_shape = directory_shapes(
        num_layers, max_reqs, num_heads, max_model_len, block_size, chunk
    )
    return (
        torch.zeros(table_shape, dtype=torch.int32, device=device),
        torch.zeros(state_shape, dtype=torch.int64, device=device),
    )


def pool_shapes(num_pages: int, num_rows: int, chunk: int) -> dict[str, tuple]:
    """Shapes of the pool part of the directory, for `num_pages` pages in the buffer and
    `num_rows` rows: the chunk pool (chunk 0 is a dump for masked writes, then one partial chunk
    per row and enough full ones for every page), its free stack and the free-page stack (each
    with a dump entry at the end; the page pool allocates the last)."""
    num_chunks = 1 + num_rows + cdiv(num_pages, chunk)
    return {
        "chunks": (num_chunks, chunk),
        "free_chunks": (num_chunks,),
        "free_pages": (num_pages + 1,),
    }


@dataclass
class RingVerdicts:
    """The step's verdicts on decoding rows' tokens that left the window in the last step, in
    the ring slot the new token takes ([L, B, H] each): where they are, whether kept (False where
    no token left: `over` [B]), and where a kept one moves."""

    page: torch.Tensor
    offset: torch.Tensor
    kept: torch.Tensor
    over: torch.Tensor
    survivor_slot: torch.Tensor


class PageTable:
    def __init__(
        self,
        kv_caches: list[torch.Tensor],
        window: int,
        threshold: float,
        max_reqs: int,
        max_model_len: int,
        ratio: float | None = None,
        alpha: float = 0.2,
        key_layout: str = "transposed",
        directory: tuple[torch.Tensor, torch.Tensor] | None = None,
        chunk: int | None = None,
        heads=None,
        prefill: str = "dense",
    ):
        if key_layout not in PAGE_LAYOUTS:
            raise ValueError(f"key_layout must be one of {tuple(PAGE_LAYOUTS)}, got {key_layout!r}")
        if prefill not in PREFILL_MODES or (prefill == "chunked" and ratio is not None):
            raise ValueError(
                f"prefill must be one of {PREFILL_MODES} (threshold mode), got {prefill!r}"
            )
        # "chunked": prompt rows are compacted after every chunk (`finish_step`), not at the end
        self.chunked_prefill = prefill == "chunked"
        self.device = dev = kv_caches[0].device
        num_blocks, num_heads, block_size, _ = kv_caches[0].shape
        self.num_layers, self.num_heads, self.block_size = len(kv_caches), num_heads, block_size
        self.window = window
        self.ratio, self.alpha = ratio, alpha  # ratio mode: AdaKV over the prompt (window 0)
        # tensor parallelism: this rank's KV heads (`runtime.TensorParallelHeads`), or None
        self.heads = heads
        # the free stacks' counters and error flags, read with the step's reads
        self._top = torch.zeros(3, dtype=torch.int64, device=dev)
        self._short = torch.zeros(4, dtype=torch.int64, device=dev)
        self.pool = PAGE_LAYOUTS[key_layout](kv_caches, self._top[PAGES], self._short[PAGES])

        L, S, H = self.num_layers, max_reqs, num_heads
        self.max_reqs = S
        self.max_pages = max_pages_per_row(max_model_len, block_size)
        self.chunk = K = chunk or chunk_pages(self.max_pages)
        # the per-row directory (`directory_shapes`): given when allocated earlier (at model load,
        # so that vLLM's memory profile counts it), else allocated here
        if directory is None or [tuple(t.shape) for t in directory] != directory_shapes(
            L, S, H, max_model_len, block_size, K
        ):
            directory = allocate_directory(L, S, H, max_model_len, block_size, dev, K)
        self.chunk_table = directory[0].zero_()  # [L, S + 1, H, chunks] int32
        self.rows = RowState(directory[1])
        # the chunk pool (`pool_shapes`) and its free stack; chunk 0 is the dump
        shapes = pool_shapes(self.pool.num_pages_total, L * S * H, K)
        self.chunks = torch.zeros(shapes["chunks"], dtype=torch.int32, device=dev)
        self.num_chunks = self.chunks.shape[0]
        items = torch.zeros(shapes["free_chunks"], dtype=torch.int32, device=dev)
        items[: self.num_chunks - 1] = torch.arange(
            self.num_chunks - 1, 0, -1, dtype=torch.int32, device=dev
        )
        self._top[CHUNKS] = self.num_chunks - 1
        self.free_chunks = FreeStack(items, self._top[CHUNKS], self._short[CHUNKS])
        default_value = float(threshold if ratio is None else ratio)
        self.requests = Requests(S, num_blocks, default_value, ratio is not None,
                                 self._top[REQS], self._short[REQS], dev)  # fmt: skip
        self._report: tuple[torch.Tensor, ...] | None = None  # the last step's, for `reports`
        # chunked prefill: the last step's prompt rows (req_idx, unjudged tokens after the step on
        # the host), compacted by `finish_step`
        self._chunk_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._layer_idx = torch.arange(L, device=dev).view(-1, 1, 1)
        self._head_idx = torch.arange(H, device=dev).view(1, 1, -1)
        self._row_starts = torch.arange(S * H + 1, dtype=torch.int32, device=dev)  # one query each

    # ------------------------------------------------------------------ host reads
    def _read(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Every device-to-host read of the page state goes through here (`what` names it)."""
        return t.cpu()

    def _check(self, short: torch.Tensor) -> None:
        """Raise on the error flags (a host copy of `_short`)."""
        pages, chunks, reqs, bound = (int(x) for x in short)
        if pages:
            raise RuntimeError(
                f"kv_pruning page pool exhausted: {pages} pages more wanted than were free "
                "(scheduler accounting and worker pages disagree)"
            )
        if reqs:
            raise RuntimeError(f"kv_pruning: more running requests than {self.max_reqs}")
        if chunks or bound:
            raise RuntimeError(f"kv_pruning: page directory out of bounds ({chunks}, {bound})")

    @property
    def num_free(self) -> int:
        """Free pages (a device read: for tests and tools)."""
        return len(self.pool.free_pages)

    # ------------------------------------------------------------------ directory lookups
    def _page_of(self, req_idx: torch.Tensor, logical: torch.Tensor, layers=None):
        """(page ids, offsets) of logical slots [l, X, H, *rest] of requests [X], in all layers
        or in `layers` ([l])."""
        extra = (1,) * (logical.dim() - 3)
        layer = (self._layer_idx if layers is None else layers).view(-1, 1, 1, *extra)
        head = self._head_idx.view(1, 1, -1, *extra)
        page = self._page_at(layer, req_idx.view(1, -1, 1, *extra), head, logical)
        return page, logical % self.block_size

    def _page_at(self, layer, req_idx, head, logical) -> torch.Tensor:
        """Page ids of logical slots of rows (layer, req_idx, head): index tensors that broadcast
        together (`_page_of`), or [M] each, one row per entry."""
        col = (logical // self.block_size).clamp(max=self.max_pages - 1)
        chunk = self.chunk_table[layer, req_idx, head, col // self.chunk]
        return self.chunks[chunk, col % self.chunk]

    def _phys(self, req_idx: torch.Tensor, logical: torch.Tensor, layers=None) -> torch.Tensor:
        """Physical slots (page * bs + offset) of logical slots [l, X, H, *rest]."""
        page, offset = self._page_of(req_idx, logical, layers)
        return page.long() * self.block_size + offset

    def held_page_ids(self) -> torch.Tensor:
        """Every page id some row holds (tests and tools; reads the device)."""
        cols = torch.arange(self.max_pages, device=self.device)
        req_idx = torch.arange(self.max_reqs + 1, device=self.device)
        pages, _ = self._page_of(req_idx, cols.view(1, 1, 1, -1) * self.block_size)
        return pages[cols < self.rows.num_pages[..., None]]

    # ------------------------------------------------------------------ requests
    def release(self, req_keys: list[int]) -> None:
        """Give back everything of finished or preempted requests, by key."""
        if not req_keys:
            return
        keys = torch.tensor(req_keys, dtype=torch.int64, device=self.device)
        self._release(self.requests.req_idx_of_key[keys])

    def _release(self, req_idx: torch.Tensor) -> None:
        """Give back the pages, chunks and indices of requests [X] (-1: none). One host read
        (which are requests, and their rows' page counts); then blocks of at most
        `WORK_ENTRIES` page ids."""
        L, H, K = self.num_layers, self.num_heads, self.chunk
        X = req_idx.numel()
        if X == 0:
            return
        npg = self.rows.num_pages[:, req_idx]  # [L, X, H] (the dump row's zeros for -1)
        got = self._read(torch.cat(((req_idx >= 0).long(), npg.flatten())), "release")
        live_h = got[:X].bool()
        if not bool(live_h.any()):
            return
        idx_h = live_h.nonzero().flatten()
        req_idx = req_idx[idx_h.to(self.device)]
        npg_h = got[X:].view(L, X, H)[:, idx_h]  # [L, X', H]
        X = req_idx.numel()
        # the rows' chunks, in (layer, request, head, column) order: the order of the page list
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
            chunk = self.chunk_table[layer, req_idx[x], head, col]  # [m]
            pages = self.chunks[chunk]  # [m, K]
            valid = col[:, None] * K + kcols < npg_rows[row][:, None]
            self.pool.free_pages.push(pages.flatten(), valid.flatten())
            self.free_chunks.push(chunk, torch.ones_like(col, dtype=torch.bool))
        self.rows.clear(req_idx)
        self.requests.release(req_idx)

    def set_request_values(self, values: dict[int, float]) -> None:
        """Own thresholds (ratios) of requests that take an index in the next plan, by key."""
        self.requests.set_values(values)

    # ------------------------------------------------------------------ verdicts
    def _keep(self, page: torch.Tensor, offset: torch.Tensor, req_idx: torch.Tensor):
        """Keep decisions of the pairs at (page, offset) [l, X, H, ...] of requests [X] (ratio
        mode: every generated pair is kept)."""
        if self.ratio is not None:
            return torch.ones(page.shape, dtype=torch.bool, device=self.device)
        thr = self.requests.value[req_idx].view(1, -1, *([1] * (page.dim() - 2)))
        return keep(self.pool.slot_scores[page, offset], thr)

    def _prompt_keep(self, page, offset, req_idx: torch.Tensor, lengths: torch.Tensor):
        """Verdicts on the prompt's pairs at (page, offset) [l, C, H, T] (lengths [C]): the
        threshold, or in ratio mode AdaKV over each layer's whole prompt (`scorers/adakv.py`)."""
        if self.ratio is None:
            return self._keep(page, offset, req_idx)
        from vllm_kvzap.scorers.adakv import adakv_keep

        scores = self.pool.slot_scores[page, offset].permute(1, 0, 3, 2)  # [C, l, T, H]
        if self.heads is not None:  # the rule spans the layer's heads on all ranks
            scores = self.heads.gather(scores)
        kept = adakv_keep(scores, lengths, self.requests.value[req_idx], self.alpha)
        if self.heads is not None:
            kept = self.heads.own(kept)
        return kept.permute(1, 0, 3, 2)

    def _ring_verdicts(self, req_idx, in_ring, over) -> RingVerdicts:
        """Verdicts on the tokens in the ring slot the next token of each decoding request takes
        (`in_ring` [B] tokens in its ring so far; `over` [B]: one left the window in the last
        step)."""
        R = self.window + 1
        base, surv = self.rows.base[:, req_idx], self.rows.surv[:, req_idx]
        ring = (base if self.window else base + surv) + (in_ring % R)[None, :, None]
        page, offset = self._page_of(req_idx, ring)
        kept = self._keep(page, offset, req_idx) & over[None, :, None]
        return RingVerdicts(page, offset, kept, over, base + R + surv)

    # ------------------------------------------------------------------ compaction
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

    def _compact(self, req_idx: torch.Tensor, unjudged_h: torch.Tensor) -> None:
        """Judge the prompt tokens older than the window and keep survivors + window: at the end
        of a dense prompt (its first decoding step), or after each chunk with chunked prefill.
        A row's `unjudged_h` (host, [C]) newest tokens sit in order after its `base` kept ones
        (dense: base 0, every token). In `_pieces` (whole rows, some layers); one host read per
        piece (how many pairs move)."""
        dev, W, reqs = self.device, self.window, self.requests
        unjudged = unjudged_h.to(dev)
        # a prompt's peak is just before a compaction (pages never shrink while decoding: a
        # pruned token's ring slot is reused)
        held = self.rows.num_pages[:, req_idx].sum((0, 2))
        reqs.peak_pages[req_idx] = torch.maximum(reqs.peak_pages[req_idx], held)
        for (l0, l1), idx_h in self._pieces(unjudged_h):
            idx, longest = idx_h.to(dev), int(unjudged_h[idx_h].max())
            layers = torch.arange(l0, l1, device=dev)
            self._compact_piece(layers, req_idx[idx], unjudged[idx], longest)
        reqs.shift[req_idx] += (unjudged - W).clamp(min=0)
        reqs.dense[req_idx] = False

    def _compact_piece(self, layers, req_idx, unjudged, T: int) -> None:
        """Compact rows [l, C, H] (layers `layers`, requests `req_idx`, `unjudged` <= T tokens
        after `base`): temporaries of l C H T entries. Token `i` of the unjudged ones is at
        logical slot `base + i`; those older than the window (`i < unjudged - W`) are judged,
        the kept ones move to `base ..`, the window follows them in order."""
        W, bs, K, H = self.window, self.block_size, self.chunk, self.num_heads
        dev, rows = self.device, self.rows
        at = (layers[:, None, None], req_idx[None, :, None], self._head_idx)  # rows [l, C, H]
        base = rows.base[at]
        i = torch.arange(T, device=dev)
        num_judged = (unjudged - W).clamp(min=0)  # [C]
        valid = i[None] < unjudged[:, None]  # [C, T]
        judged = (i[None] < num_judged[:, None])[None, :, None, :]  # [1, C, 1, T]
        page, offset = self._page_of(req_idx, base[..., None] + i, layers)  # [l, C, H, T]
        verdict = self._prompt_keep(page, offset, req_idx, unjudged)
        kept = verdict & judged
        survivors = kept.sum(-1)  # [l, C, H]
        rows.pruned[at] += (judged & ~verdict).sum(-1)
        in_window = (valid & ~judged[0, :, 0])[None, :, None, :]
        window_slot = survivors[..., None] + i - num_judged[None, :, None, None]
        dest = torch.where(kept, kept.cumsum(-1) - 1, torch.where(in_window, window_slot, -1))
        moving = ((dest >= 0) & (dest != i)).flatten()
        count = int(self._read(moving.sum(), "compaction"))
        if count:
            sel = torch.nonzero_static(moving, size=count).flatten()
            row, C = sel // T, req_idx.numel()  # row = (layer, request, head) of each moving pair
            lay, req, head = layers[row // (C * H)], req_idx[(row // H) % C], row % H
            dst = base.flatten()[row] + dest.flatten()[sel]
            dst_page = self._page_at(lay, req, head, dst)
            self.pool.move(page.flatten()[sel], offset.flatten()[sel], dst_page, dst % bs)
        # give back the spare pages and chunks (the step's allocation adds what it needs); they
        # lie in the columns from base // bs on, at most ceil(T / bs) + 1 of them
        resident = base + survivors + (unjudged - num_judged)[None, :, None]
        need = cdiv(resident, bs)
        have = rows.num_pages[at]  # [l, C, H] <= ceil((base + T) / bs)
        cols = (base // bs)[..., None] + torch.arange(cdiv(T, bs) + 1, device=dev)
        spare = (cols >= need[..., None]) & (cols < have[..., None])
        spare_pages, _ = self._page_of(req_idx, cols * bs, layers)
        self.pool.free_pages.push(spare_pages.flatten(), spare.flatten())
        num_ccols = cdiv(cdiv(T, bs) + 1, K) + 1
        ccols = (base // bs // K)[..., None] + torch.arange(num_ccols, device=dev)
        spare = (ccols >= cdiv(need, K)[..., None]) & (ccols < cdiv(have, K)[..., None])
        ccols = ccols.clamp(max=self.chunk_table.shape[-1] - 1)
        spare_chunks = self.chunk_table[(*(a[..., None] for a in at), ccols)]
        self.free_chunks.push(spare_chunks.flatten(), spare.flatten())
        rows.num_pages[at] = torch.minimum(have, need)
        rows.base[at] = base + survivors
        rows.surv[at] = 0
        rows.seq_len[at] = resident

    # ------------------------------------------------------------------ page allocation
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

    def _grow(self, req_idx, have: torch.Tensor, need: torch.Tensor, bound_h: torch.Tensor):
        """Rows [L, B, H] grow from `have` to `need` pages (no more than `bound_h` [B], host):
        chunks first, then pages, popped with masks over L H sum(bound) entries."""
        L, B, H = have.shape
        K, S = self.chunk, self.max_reqs
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
        ids = self.free_chunks.pop(valid)
        layer, b, head = row // (B * H), (row // H) % B, row % H
        req = torch.where(valid, req_idx[b], S)  # the dump row for the others
        col = torch.where(valid, c_have[row] + j, 0)
        self.chunk_table[layer, req, head, col] = ids
        # pages: columns have .. need - 1
        row, j = self._entries((L, B, H), bound_h)
        valid = j < deficit.flatten()[row]
        ids = self.pool.free_pages.pop(valid)
        layer, b, head = row // (B * H), (row // H) % B, row % H
        col = (have.flatten()[row] + j).clamp(max=self.max_pages - 1)
        chunk = self.chunk_table[layer, req_idx[b], head, col // K]
        target = torch.where(valid, chunk.long() * K + col % K, 0)  # chunk 0: the dump
        self.chunks.view(-1)[target] = ids

    # ------------------------------------------------------------------ the step
    def plan(self, step: StepRows) -> StepPlan:
        """The step's plan (made once per step: `runtime.bind_step` keeps it for the layers)."""
        W, bs, L, H, K = self.window, self.block_size, self.num_layers, self.num_heads, self.chunk
        dev, reqs = self.device, self.requests
        # host-side sizes (StepRows' cpu tensors: no device reads)
        qlens_h, computed_h = step.query_lens, step.num_computed
        B = qlens_h.numel()
        decoding_h = (qlens_h == 1) & ~step.is_prefilling
        fresh_h = computed_h == 0
        max_qlen = int(qlens_h.max()) if B else 0
        T = int(step.query_start_loc[-1]) if B else 0
        longest = int((computed_h + qlens_h).max()) if B else 0  # tokens of the longest request
        req_keys, computed, qlens = (t.to(dev) for t in (step.req_keys, computed_h, qlens_h))
        query_start_loc = step.query_start_loc.to(dev)
        R = W + 1

        req_idx = reqs.req_idx_of_key[req_keys]  # -1 for new requests
        verdicts = self._settle_ring(req_idx, step, decoding_h, fresh_h, computed)
        req_idx, moves, compacting_h = self._assign(
            req_keys, req_idx, verdicts, decoding_h, fresh_h
        )
        if bool(compacting_h.any()):  # first decoding step: compact the prompt first
            comp_h = compacting_h.nonzero().flatten()
            self._compact(req_idx[comp_h.to(dev)], computed_h[comp_h])
        rows = self.rows.gather(req_idx)
        if verdicts is not None:  # rows judged above neither compacted nor started afresh
            rows.surv = rows.surv + verdicts.kept
            rows.pruned = rows.pruned + (verdicts.over[None, :, None] & ~verdicts.kept)

        # this step's logical slots and lengths, per (layer, request, head): a decoding row is
        # `base` kept prompt pairs, the ring of R = W + 1 slots (the window and the token
        # leaving it, which this step's query still sees), then the survivors; with W = 0 the
        # ring is its one slot after the survivors
        decoding = decoding_h.to(dev)  # [B]; the others are prompt rows
        in_ring = computed - reqs.shift[req_idx]  # tokens in the ring before this step
        ring_start = rows.base if W else rows.base + rows.surv
        new_logical = ring_start + (in_ring % R)[None, :, None]
        seq = rows.base + rows.surv + (in_ring + 1).clamp(max=R)[None, :, None]
        # prompt rows (dense, or compacted after an earlier chunk: `base` kept pairs, then the
        # tokens from `shift` on in order): the chunk follows the resident slots
        prompt_start = rows.base - reqs.shift[req_idx][None, :, None]  # slot of position 0
        prompt_seq = prompt_start + (computed + qlens)[None, :, None]
        rows.seq_len = torch.where(decoding[None, :, None], seq, prompt_seq)

        # pages: allocate what the step needs (compaction already gave back the spare ones);
        # a row grows by at most ceil(query_len / bs) pages (one in a decoding step)
        need = cdiv(rows.seq_len, bs)
        self._grow(req_idx, rows.num_pages, need, cdiv(qlens_h, bs))
        rows.num_pages = torch.maximum(rows.num_pages, need)
        if moves:
            self._move_kept(req_idx, verdicts, moves)
        phys_new = self._phys(req_idx, new_logical)  # [L, B, H]
        self.rows.scatter(req_idx, rows)
        self._report = (req_keys, req_idx)
        self._chunk_rows = None
        if self.chunked_prefill and not bool(decoding_h.all()):
            prompt_h = (~decoding_h).nonzero().flatten()
            # tokens not judged yet after this step: the window before it and its chunk
            unjudged_h = computed_h.clamp(max=W) + qlens_h
            self._chunk_rows = (req_idx[prompt_h.to(dev)], unjudged_h[prompt_h])

        # writes: (token, head) -> physical slot, in every layer
        if max_qlen == 1 and bool(decoding_h.all()):
            write_slots = phys_new.reshape(L, B * H)
        else:
            write_slots = self._prompt_write_slots(
                req_idx, computed, qlens, query_start_loc, decoding, new_logical, prompt_start, T
            )
        num_cols = max(1, cdiv(longest, bs))  # bounds every row's pages this step
        row_qsl, perm = self._kernel_rows(qlens, query_start_loc, B, T, max_qlen)
        reqs.num_tokens[req_idx] = computed + qlens
        return StepPlan(
            num_tokens=T,
            block_tables=LayerBlockTables(self, req_idx, cdiv(num_cols, K)),
            seq_lens=rows.seq_len.reshape(L, B * H).to(torch.int32),
            row_query_start_loc=row_qsl,
            query_perm=perm,
            write_slots=write_slots,
            score_index=self.pool.score_index(write_slots),
            max_query_len=max(1, max_qlen),
            max_seq_len=num_cols * bs,
        )

    def _settle_ring(self, req_idx, step, decoding_h, fresh_h, computed) -> RingVerdicts | None:
        """Decoding rows whose ring is full: the ring slot the new token takes holds the token
        that left the window in the last step, judged now (before the plan's read, which counts
        the kept ones: they move to the survivors; the pruned ones are overwritten). Host-side
        superset: in_ring = computed - shift >= R needs computed >= R."""
        R = self.window + 1
        if not bool((decoding_h & ~fresh_h & (step.num_computed >= R)).any()):
            return None
        in_ring = computed - self.requests.shift[req_idx]
        decoding = decoding_h.to(self.device)
        over = decoding & ~self.requests.dense[req_idx] & (in_ring >= R)  # [B]
        return self._ring_verdicts(req_idx, in_ring, over)

    def _assign(self, req_keys, req_idx, verdicts, decoding_h, fresh_h):
        """The plan's one read (the pools' flags, how many kept pairs move, new requests' stale
        indices, which decoding rows compact); a fresh start for requests that had an index
        (recomputing after preemption), indices for new ones. Returns (req_idx [B], moves,
        compacting_h [B] host: decoding rows that are still dense)."""
        dev, reqs = self.device, self.requests
        num_moves = torch.zeros(1, dtype=torch.int64, device=dev)
        if verdicts is not None and self.window:
            num_moves = verdicts.kept.sum().view(1)
        fresh_idx_h, dec_idx_h = fresh_h.nonzero().flatten(), decoding_h.nonzero().flatten()
        compacting_h = decoding_h & fresh_h
        moves = 0
        if fresh_idx_h.numel() or dec_idx_h.numel():
            fresh_idx, dec_idx = fresh_idx_h.to(dev), dec_idx_h.to(dev)
            stale = (req_idx[fresh_idx] >= 0).long()
            dense = reqs.dense[req_idx[dec_idx]].long()
            got = self._read(torch.cat((self._short, num_moves, stale, dense)), "plan")
            self._check(got[:4])
            moves, nf = int(got[4]), fresh_idx_h.numel()
            stale_h, dense_h = got[5 : 5 + nf].bool(), got[5 + nf :].bool()
            compacting_h[dec_idx_h[dense_h]] = True
            if bool(stale_h.any()):  # new, or recomputing after preemption: start afresh
                self._release(req_idx[fresh_idx_h[stale_h].to(dev)])
            if nf:
                reqs.assign(req_keys[fresh_idx])
                req_idx = reqs.req_idx_of_key[req_keys]
        return req_idx, moves, compacting_h

    def _move_kept(self, req_idx, verdicts: RingVerdicts, moves: int) -> None:
        """The kept tokens leaving the ring -> the survivors' next slot (all layers at once;
        their scores stay behind: a survivor is never judged again)."""
        B, H = req_idx.numel(), self.num_heads
        sel = torch.nonzero_static(verdicts.kept.flatten(), size=moves).flatten()
        layer, b, head = sel // (B * H), (sel // H) % B, sel % H
        dst = verdicts.survivor_slot.flatten()[sel]
        dst_page = self._page_at(layer, req_idx[b], head, dst)
        self.pool.move(
            verdicts.page.flatten()[sel], verdicts.offset.flatten()[sel], dst_page,
            dst % self.block_size, scores=False,
        )  # fmt: skip

    def _prompt_write_slots(
        self, req_idx, computed, qlens, query_start_loc, decoding, new_logical, prompt_start, T
    ) -> torch.Tensor:
        """Physical slots [L, T * H] of a step with prompt tokens: a decoding request's token
        takes its ring slot, a prompt's token at position p its slot `prompt_start + p`."""
        dev, B = self.device, req_idx.numel()
        tok_req = torch.repeat_interleave(torch.arange(B, device=dev), qlens, output_size=T)
        tok_pos = computed[tok_req] + torch.arange(T, device=dev) - query_start_loc[:-1][tok_req]
        logical = torch.where(
            decoding[tok_req][None, :, None],
            new_logical[:, tok_req],
            prompt_start[:, tok_req] + tok_pos[None, :, None],
        )  # [L, T, H]
        return self._phys(req_idx[tok_req], logical).flatten(1)

    def _kernel_rows(self, qlens, query_start_loc, B: int, T: int, max_qlen: int):
        """Kernel rows are (request, head), each with its own pages and length: their query
        start locations [B * H + 1] and the permutation from row order to (token, head) order
        [T * H] (None when every row has one query)."""
        H, dev = self.num_heads, self.device
        if max_qlen == 1:
            return self._row_starts[: B * H + 1], None
        # entry e of row r = (b, h): token qsl[b] + e - row_qsl[r], head h
        row_qlens = qlens.repeat_interleave(H)
        row_qsl = torch.zeros(B * H + 1, dtype=torch.int32, device=dev)
        row_qsl[1:] = row_qlens.cumsum(0)
        row = torch.repeat_interleave(torch.arange(B * H, device=dev), row_qlens, output_size=T * H)
        t = torch.arange(T * H, device=dev) - row_qsl[:-1].long()[row]
        return row_qsl, (query_start_loc[row // H] + t) * H + row % H

    def write_layer(self, plan: StepPlan, layer_idx: int, key, value, scores, isa: str) -> None:
        """Before the layer's attention: write the step's K/V and scores into their slots."""
        T = plan.num_tokens
        self.pool.write(plan.write_slots[layer_idx], plan.score_index[layer_idx],
                        key[:T], value[:T], scores[:T], isa)  # fmt: skip

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
        req_keys, req_idx = self._report
        self._report = None
        npg, seq = self.rows.num_pages[:, req_idx], self.rows.seq_len[:, req_idx]  # [L, B, H]
        held = npg.sum((0, 2))
        next_pages = torch.maximum(npg, (seq + self.block_size) // self.block_size).sum((0, 2))
        dense = self.requests.dense[req_idx].long()
        got = self._read(torch.cat((self._short, req_keys, held, next_pages, dense)), "reports")
        self._check(got[:4])
        req_keys, held, next_pages, dense = got[4:].view(4, -1).tolist()
        return {
            k: ResidentReport(h, n, bool(d))
            for k, h, n, d in zip(req_keys, held, next_pages, dense)
        }

    def finished_counts(self, req_key: int) -> tuple[list[int], int, int] | None:
        """(pruned pairs per layer, peak pages, pages now) of a request, or None if unknown."""
        reqs, rows = self.requests, self.rows
        n_keys = reqs.req_idx_of_key.numel() - 1
        idx = int(reqs.req_idx_of_key[req_key]) if 0 <= req_key < n_keys else -1
        if idx < 0:
            return None
        req_idx = torch.tensor([idx], device=self.device)
        if bool(reqs.dense[idx]):
            # ends in its prompt: count tokens older than the window as judged, as DMS does
            n = max(0, int(reqs.num_tokens[idx]) - self.window)
            pruned = torch.zeros(self.num_layers, dtype=torch.int64, device=self.device)
            lengths = torch.tensor([n])
            for (l0, l1), _ in (self._pieces(lengths) if n else ()):
                layers = torch.arange(l0, l1, device=self.device)
                positions = torch.arange(n, device=self.device).view(1, 1, 1, -1)
                page, offset = self._page_of(req_idx, positions, layers)
                verdict = self._prompt_keep(page, offset, req_idx, lengths.to(self.device))
                pruned[l0:l1] = (~verdict).sum((1, 2, 3))
        else:  # the token that left the window in the last step is judged here
            in_ring = reqs.num_tokens[req_idx] - reqs.shift[req_idx]
            v = self._ring_verdicts(req_idx, in_ring, in_ring > self.window)
            pruned = (rows.pruned[:, req_idx] + (v.over[None, :, None] & ~v.kept)).sum((1, 2))
        pages = int(rows.num_pages[:, idx].sum())
        return pruned.tolist(), max(int(reqs.peak_pages[idx]), pages), pages
