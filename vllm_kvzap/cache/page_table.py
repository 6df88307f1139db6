"""Worker-side page state of paged mode: persistent tensors indexed by (layer, batch slot, KV head).

vLLM allocates the KV cache as one buffer viewed per layer as `[num_blocks, H_kv, block_size, 2D]`;
every (layer, block, head) cell is a *page* of `block_size` slots, read here as `[2 * block_size,
D]`: keys, then values (`[block_size, D]`). Keys are stored transposed (`[D, block_size]`,
`key_layout="transposed"`) in vLLM's CPU layout for the `vec`/`vec16` ISAs, whose kernel the CPU
backend calls (`attention/rows.py`), or plainly (`[block_size, D]`, `key_layout="plain"`) for vLLM's
Triton `unified_attention` (`attention/triton_rows.py`), which reads any strides. All pages but the
null block's form one pool, shared by every layer, head and request (a free-page stack).

Each (request, layer, KV head) is a *row* of the engine's attention kernel: a page list where
logical slot `j` lives at `pages[j // bs]`, offset `j % bs`, and the row's resident pairs are
exactly slots `0 .. seq_len - 1` (what vLLM's CPU kernel reads with one KV head per row):
- while the prompt is processed (or recomputed after preemption) the row is *dense*: slot = position;
- at the start of its first decoding step the row is *compacted*: the `K` kept prompt tokens older
  than the window move, in order, to slots `0 .. K-1`, the window follows as a ring
  (position `p` at slot `K + (p - shift) mod W`, `shift = max(T - W, 0)`), and the prompt's spare
  pages go back to the pool;
- each decoding step, the token leaving the window (its ring slot is the new token's) is copied to
  the *probation* slot right after the ring and the survivors, `K + W + surv`, so this step's query
  still sees it; the new token takes the ring slot. At the next step's plan the probation token is
  judged from the score it got when it was written: kept -> `surv += 1`, pruned -> its slot is
  reused. With `W = 0` the new token itself is written on probation.
A row therefore holds `ceil((K + W + surv + 1) / bs)` pages: memory follows the kept pairs.

A step is planned once (`plan`, called when the KV connector binds the step, after it released
finished and preempted requests, before the forward pass) with bulk tensor operations over all
rows of all layers: slots for new requests, the previous step's verdicts, compactions, page
allocation and frees, every layer's move of the tokens leaving the window (their K/V were written
in earlier steps), and every layer's kernel arguments (`StepPlan`). A layer then only indexes the
plan (`write_layer`: the step's K/V and scores; `attention/rows.py`: the kernel call). No Python
loop over requests, layers or heads, and no host synchronisation inside a layer's forward; a few
host reads of sizes per step, in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


@dataclass
class StepPlan:
    """Everything a layer needs for this step; leading dim L (layers) where present."""

    num_tokens: int
    block_tables: torch.Tensor  # [L, B * H, P] int32: row (b, h) -> its pages
    seq_lens: torch.Tensor  # [L, B * H] int32: resident slots per row during the step
    row_query_start_loc: torch.Tensor  # [B * H + 1] int32
    query_perm: torch.Tensor | None  # [T * H]: row order -> (token, head) order; None = identity
    write_slots: torch.Tensor  # [L, T * H] int64: physical slot of (token, head)
    max_query_len: int = 1  # longest row query in the step
    max_seq_len: int = 0  # bound on every row's resident slots (block-table width x block size)


# Row state fields: pages held; prompt survivors (the ring starts after them); decoding survivors
# (after the ring); resident slots in the last step; pruned pairs; the probation token's verdict.
ROW_FIELDS = ("num_pages", "base", "surv", "seq_len", "pruned", "pending")
NUM_PAGES, BASE, SURV, SEQ_LEN, PRUNED, PENDING = range(len(ROW_FIELDS))
# `pending`: none; kept; pruned (known at plan time, from the score the token got when written);
# to be read from its score at the next plan (window 0: the token was written in that step)
PEND_NONE, PEND_KEEP, PEND_PRUNE, PEND_SCORE = range(4)
KEY_LAYOUTS = ("transposed", "plain")


def max_pages_per_row(max_model_len: int, block_size: int) -> int:
    return -(-(max_model_len + 1) // block_size)  # + the probation slot


def directory_shapes(num_layers, max_slots, num_heads, max_model_len, block_size) -> list[tuple]:
    """Shapes of the page directory: each row's page ids, and its state (`ROW_FIELDS`, packed so
    that a step gathers and scatters them at once)."""
    rows = (num_layers, max_slots, num_heads)
    return [(*rows, max_pages_per_row(max_model_len, block_size)), (*rows, len(ROW_FIELDS))]


def allocate_directory(num_layers, max_slots, num_heads, max_model_len, block_size, device):
    pages_shape, state_shape = directory_shapes(
        num_layers, max_slots, num_heads, max_model_len, block_size
    )
    return (
        torch.zeros(pages_shape, dtype=torch.int32, device=device),
        torch.zeros(state_shape, dtype=torch.int64, device=device),
    )


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
    ):
        if key_layout not in KEY_LAYOUTS:
            raise ValueError(f"key_layout must be one of {KEY_LAYOUTS}, got {key_layout!r}")
        self.key_layout = key_layout
        first = kv_caches[0]
        self.device = dev = first.device
        num_blocks, num_heads, block_size, two_d = first.shape
        self.num_layers, self.num_heads, self.block_size = len(kv_caches), num_heads, block_size
        self.head_size = two_d // 2
        self.window = window
        self.ratio, self.alpha = ratio, alpha  # ratio mode: AdaKV over the prompt (window 0)
        page_elems = block_size * two_d
        storage = first.untyped_storage()
        num_pages = storage.nbytes() // (page_elems * first.element_size())
        # [num_pages, 2 * bs * D]: the flat page; key_cache/value_cache are the kernel's views
        self.kv_pages = torch.empty(0, dtype=first.dtype, device=first.device).set_(
            storage, 0, (num_pages, page_elems), (page_elems, 1)
        )
        paged = self.kv_pages.view(num_pages, 1, 2 * block_size, self.head_size)
        self.key_cache, self.value_cache = paged.chunk(2, dim=2)  # [pages, 1, bs, D] each
        half = block_size * self.head_size
        if key_layout == "transposed":
            self._keys = self.kv_pages[:, :half].view(num_pages, self.head_size, block_size)
        else:
            self._keys = self.kv_pages[:, :half].view(num_pages, block_size, self.head_size)
        self._values = self.kv_pages[:, half:].view(num_pages, block_size, self.head_size)
        usable = []
        for cache in kv_caches:
            assert cache.shape == first.shape and cache.untyped_storage().data_ptr() == (
                storage.data_ptr()
            ), "kv_pruning expects all layers' KV caches in one buffer"
            assert cache.stride(2) == two_d and cache.stride(3) == 1
            base = cache.storage_offset() // page_elems
            blocks = torch.arange(1, num_blocks)[:, None] * (cache.stride(0) // page_elems)
            heads = torch.arange(num_heads)[None, :] * (cache.stride(1) // page_elems)
            usable.append((base + blocks + heads).reshape(-1))
        self.free_pages = torch.cat(usable).flip(0).to(dev, torch.int32)  # a stack, top at the end
        self.num_free = self.capacity = self.free_pages.numel()
        self.slot_scores = torch.zeros(num_pages * block_size, dtype=torch.float32, device=dev)

        L, S, H = self.num_layers, max_slots, num_heads
        self.max_pages = max_pages_per_row(max_model_len, block_size)
        # the page directory (`directory_shapes`): given when allocated earlier (at model load, so
        # that vLLM's memory profile counts it), else allocated here
        if directory is None or [tuple(t.shape) for t in directory] != directory_shapes(
            L, S, H, max_model_len, block_size
        ):
            directory = allocate_directory(L, S, H, max_model_len, block_size, dev)
        self.pages, self.state = directory  # [L, S, H, P] int32, [L, S, H, fields] int64
        self.pages.zero_()
        self.state.zero_()
        self.num_pages, self.base, self.surv, self.seq_len, self.pruned, self.pending = (
            self.state.unbind(-1)
        )
        self.num_tokens = torch.zeros(S, dtype=torch.int64, device=dev)
        self.shift = torch.zeros(S, dtype=torch.int64, device=dev)
        self.dense = torch.ones(S, dtype=torch.bool, device=dev)
        self.peak_pages = torch.zeros(S, dtype=torch.int64, device=dev)
        # each slot's threshold (ratio in ratio mode): the engine's, or its request's own, which
        # `set_request_values` parks by key until the request takes a slot. Thresholds compare in
        # float32 as kvpress's (a Python float against float32 scores); ratios stay float64
        # (`adakv_counts`: 0.3 in float32 is another number).
        self.default_value = float(threshold if ratio is None else ratio)
        vdtype = torch.float32 if ratio is None else torch.float64
        self.slot_value = torch.full((S,), self.default_value, dtype=vdtype, device=dev)
        self.key_value = torch.full((num_blocks,), float("nan"), dtype=vdtype, device=dev)
        self.key_of_slot = torch.full((S,), -1, dtype=torch.int64, device=dev)
        self.slot_of_key = torch.full((num_blocks,), -1, dtype=torch.int64, device=dev)
        self.free_slots = torch.arange(S - 1, -1, -1, dtype=torch.int64, device=dev)
        self.num_free_slots = S
        self._planned: tuple[StepRows, StepPlan] | None = None
        self._report: tuple[torch.Tensor, ...] | None = None  # the last step's, for `reports`
        self._layer_idx = torch.arange(L, device=dev).view(-1, 1, 1)
        self._head_idx = torch.arange(H, device=dev).view(1, 1, -1)
        self._row_starts = torch.arange(S * H + 1, dtype=torch.int32, device=dev)  # decode rows: one query each

    # ------------------------------------------------------------------ pool
    def _alloc(self, n: int) -> torch.Tensor:
        if n > self.num_free:
            raise RuntimeError(
                f"kv_pruning page pool exhausted: {n} pages wanted, {self.num_free} free "
                "(scheduler accounting and worker pages disagree)"
            )
        self.num_free -= n
        return self.free_pages[self.num_free : self.num_free + n]

    def _free(self, ids: torch.Tensor) -> None:
        n = ids.numel()
        self.free_pages[self.num_free : self.num_free + n] = ids
        self.num_free += n

    def _row_pages(self, slots, upto: torch.Tensor, start: torch.Tensor | None = None):
        """Page ids of the rows [L, X, H] of request slots [X] at columns start .. upto - 1."""
        cols = torch.arange(self.max_pages, device=self.device)
        lo = torch.zeros_like(upto) if start is None else start
        mask = (cols >= lo[..., None]) & (cols < upto[..., None])
        layer, head = self._layer_idx[..., None], self._head_idx[..., None]
        return self.pages[layer, slots.view(1, -1, 1, 1), head, cols][mask]

    def _page_of(self, slot: torch.Tensor, logical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(page ids, offsets) of logical slots [L, X, H, *rest] of request slots [X]."""
        extra = (1,) * (logical.dim() - 3)
        layer = self._layer_idx.view(-1, 1, 1, *extra)
        head = self._head_idx.view(1, 1, -1, *extra)
        col = (logical // self.block_size).clamp_(max=self.max_pages - 1)
        return self.pages[layer, slot.view(1, -1, 1, *extra), head, col], logical % self.block_size

    def _phys(self, slot: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """Physical slots of logical slots [L, X, H, *rest] of request slots [X]."""
        page, offset = self._page_of(slot, logical)
        return page.long() * self.block_size + offset

    # ------------------------------------------------------------------ requests
    def release_keys(self, keys: list[int]) -> None:
        if not keys:
            return
        keys_t = torch.tensor(keys, dtype=torch.int64, device=self.device)
        slots = self.slot_of_key[keys_t]
        self._release_slots(slots[slots >= 0])

    def _release_slots(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        self._free(self._row_pages(slots, self.num_pages[:, slots]))
        self.state[:, slots] = 0
        self.num_tokens[slots] = 0
        self.shift[slots] = 0
        self.dense[slots] = True
        self.peak_pages[slots] = 0
        self.slot_of_key[self.key_of_slot[slots]] = -1
        self.key_of_slot[slots] = -1
        n = slots.numel()
        self.free_slots[self.num_free_slots : self.num_free_slots + n] = slots
        self.num_free_slots += n

    def set_request_values(self, values: dict[int, float]) -> None:
        """Own thresholds (ratios) of requests that take a slot in the next plan, by key."""
        if values:
            self.key_value[torch.tensor(list(values), device=self.device)] = torch.tensor(
                list(values.values()), dtype=self.key_value.dtype, device=self.device
            )

    def _assign_slots(self, keys: torch.Tensor) -> None:
        n = keys.numel()
        if n > self.num_free_slots:
            raise RuntimeError(f"kv_pruning: more running requests than {self.key_of_slot.numel()}")
        self.num_free_slots -= n
        slots = self.free_slots[self.num_free_slots : self.num_free_slots + n].clone()
        self.slot_of_key[keys] = slots
        self.key_of_slot[slots] = keys
        own = self.key_value[keys]
        self.slot_value[slots] = torch.where(own.isnan(), self.default_value, own)
        self.key_value[keys] = float("nan")

    # ------------------------------------------------------------------ verdicts
    def _keep(self, phys: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Keep decisions of the pairs at physical slots [L, X, H, ...] of request slots [X]
        (ratio mode: every generated pair is kept)."""
        if self.ratio is not None:
            return torch.ones(phys.shape, dtype=torch.bool, device=self.device)
        thr = self.slot_value[slots].view(1, -1, *([1] * (phys.dim() - 2)))
        return self.slot_scores[phys] >= thr

    def _prompt_keep(self, phys: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor):
        """Verdicts on the prompt's pairs at physical slots [L, C, H, T] (lengths [C]): the
        threshold, or in ratio mode AdaKV over each layer's whole prompt (`scorers/adakv.py`)."""
        if self.ratio is None:
            return self._keep(phys, slots)
        from vllm_kvzap.scorers.adakv import adakv_keep

        scores = self.slot_scores[phys].permute(1, 0, 3, 2)  # [C, L, T, H]
        keep = adakv_keep(scores, lengths, self.slot_value[slots], self.alpha)
        return keep.permute(1, 0, 3, 2)

    def _settle(self, slots: torch.Tensor) -> torch.Tensor:
        """Apply last step's verdicts on the probation tokens (kept -> survivor, pruned -> its
        slot is reused); returns the rows' state [L, B, H, fields], not yet written back."""
        st = self.state[:, slots]
        pend = st[..., PENDING]
        if self.window == 0:  # judged from the score its own step wrote
            keep = self._keep(self._phys(slots, st[..., BASE] + st[..., SURV]), slots)
            pend = torch.where(pend == PEND_SCORE, PEND_PRUNE - keep.long(), pend)
        st[..., SURV] += pend == PEND_KEEP
        st[..., PRUNED] += pend == PEND_PRUNE
        st[..., PENDING] = PEND_NONE
        return st

    def _compact(self, slots: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """End of the prompt: judge every token older than the window, keep survivors + window."""
        W, bs = self.window, self.block_size
        positions = torch.arange(int(num_tokens.max()), device=self.device)
        shift = (num_tokens - W).clamp(min=0)
        valid = positions[None] < num_tokens[:, None]  # [C, T]
        judged = (positions[None] < shift[:, None])[None, :, None, :]  # [1, C, 1, T]
        phys = self._phys(slots, positions.view(1, 1, 1, -1))  # [L, C, H, T]
        keep = self._prompt_keep(phys, slots, num_tokens)
        kept = keep & judged
        survivors = kept.sum(-1)  # [L, C, H]
        self.pruned[:, slots] += (judged & ~keep & valid[None, :, None, :]).sum(-1)
        in_window = valid[None, :, None, :] & ~judged
        dest = torch.where(
            kept,
            kept.cumsum(-1) - 1,
            torch.where(in_window, survivors[..., None] + positions - shift[None, :, None, None], -1),
        )
        moving = (dest >= 0) & (dest != positions)
        if bool(moving.any()):
            src = phys[moving]
            dst = self._phys(slots, dest.clamp(min=0))[moving]
            self._move(src, dst)
        self.base[:, slots] = survivors
        self.surv[:, slots] = 0
        self.shift[slots] = shift
        self.dense[slots] = False
        # the dense prompt is a request's peak until decoding outgrows it (pages never shrink
        # while decoding: a pruned probation slot is reused)
        self.peak_pages[slots] = self.num_pages[:, slots].sum((0, 2))
        # give back the prompt's spare pages (the step's allocation adds what it needs)
        in_ring = (num_tokens - shift)[None, :, None]
        need = -(-(survivors + in_ring) // bs)
        have = self.num_pages[:, slots]
        self._free(self._row_pages(slots, have, need))
        self.num_pages[:, slots] = torch.minimum(have, need)

    def _move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the pairs and their scores at physical slots src to dst (gather, then scatter)."""
        bs = self.block_size
        self.slot_scores[dst] = self.slot_scores[src]
        self._move_pairs(src // bs, src % bs, dst // bs, dst % bs)

    def key_at(self, page: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The keys [..., D] at (page, offset), in either key layout (a copy)."""
        if self.key_layout == "transposed":
            return self._keys[page, :, offset]
        return self._keys[page, offset]

    def _move_pairs(self, sp, so, dp, do) -> None:
        """Copy the K/V pairs at (page, offset) sp, so to dp, do, in the page layout."""
        keys = self.key_at(sp, so)  # [M, D] (advanced indexing copies)
        values = self._values[sp, so]
        if self.key_layout == "transposed":
            self._keys[dp, :, do] = keys
        else:
            self._keys[dp, do] = keys
        self._values[dp, do] = values

    # ------------------------------------------------------------------ the step
    def plan(self, rows: StepRows) -> StepPlan:
        """The step's plan, made once (the first layer to ask makes it)."""
        if self._planned is not None and self._planned[0] is rows:
            return self._planned[1]
        plan = self._plan(rows)
        self._planned = (rows, plan)
        return plan

    def _plan(self, rows: StepRows) -> StepPlan:
        W, bs, L, H = self.window, self.block_size, self.num_layers, self.num_heads
        dev = self.device
        # sizes known on the host (no device reads); the rest moves to the page state's device
        B = rows.query_lens.numel()
        max_qlen = int(rows.query_lens.max()) if B else 0
        num_step_tokens = int(rows.query_start_loc[-1]) if B else 0
        any_fresh = bool((rows.num_computed == 0).any())
        keys, computed, qlens = (t.to(dev) for t in (rows.keys, rows.num_computed, rows.query_lens))
        is_prefilling, query_start_loc = rows.is_prefilling.to(dev), rows.query_start_loc.to(dev)
        slots = self.slot_of_key[keys]
        fresh = computed == 0
        if any_fresh:  # new, or recomputing after preemption: start afresh
            stale = slots[fresh]
            self._release_slots(stale[stale >= 0])
            self._assign_slots(keys[fresh])
            slots = self.slot_of_key[keys]
        st = self._settle(slots)
        dense = self.dense[slots]  # [B]
        compacting = dense & (qlens == 1) & ~is_prefilling
        if bool(compacting.any()):  # first decoding step: compact the prompt first
            self.state[:, slots] = st
            self._compact(slots[compacting], computed[compacting])
            st, dense = self.state[:, slots], self.dense[slots]
        any_dense = bool(dense.any())
        npg, base, surv = st[..., NUM_PAGES], st[..., BASE], st[..., SURV]

        # this step's logical slots and lengths, per (layer, request, head)
        in_ring = computed - self.shift[slots]  # tokens in the ring before this step
        if W > 0:
            leaving = ~dense & (in_ring >= W)  # [B]: a token leaves the window now
            new_logical = base + (in_ring % W)[None, :, None]  # decoding rows: its ring slot
            seq = base + surv + torch.where(leaving, W + 1, in_ring + 1)[None, :, None]
        else:  # the new token itself goes on probation
            leaving = None
            new_logical = base + surv
            seq = new_logical + 1
        if any_dense:
            seq = torch.where(dense[None, :, None], (computed + qlens)[None, :, None], seq)

        # pages: allocate what the step needs (compaction already gave back the spare ones)
        need = (seq + bs - 1) // bs
        deficit = (need - npg).clamp_(min=0)
        total = int(deficit.sum())
        if total:
            self._grow(slots, npg, deficit.flatten(), total)
        npg = torch.maximum(npg, need)

        # the ring slots the new tokens take, and verdicts for the tokens leaving them
        if W > 0:
            # [L, B, H, 2]: the new token's ring slot (holding the leaving token until this
            # step writes), and the probation slot the leaving token moves to
            page, offset = self._page_of(slots, torch.stack((new_logical, base + W + surv), -1))
            page = page.long()
            phys_new = page[..., 0] * bs + offset[..., 0]
            keep = self._keep(phys_new, slots)
            pend = torch.where(leaving[None, :, None], PEND_PRUNE - keep.long(), PEND_NONE)
            num_leaving = int(leaving.sum())  # one device read for both tests
            if num_leaving:  # all layers' leaving tokens -> their probation slots
                if num_leaving < B:
                    page, offset = page[:, leaving], offset[:, leaving]
                self._move_pairs(page[..., 0], offset[..., 0], page[..., 1], offset[..., 1])
        else:
            phys_new = self._phys(slots, new_logical)  # [L, B, H]
            pend = torch.where(dense, PEND_NONE, PEND_SCORE)[None, :, None].expand(L, B, H)
        self.state[:, slots] = torch.stack((npg, base, surv, seq, st[..., PRUNED], pend), -1)
        held = npg.sum((0, 2))
        next_pages = torch.maximum(npg, (seq + bs) // bs).sum((0, 2))
        self._report = (keys, held, next_pages, dense)

        # writes: (token, head) -> physical slot, in every layer
        T = num_step_tokens
        if not any_dense and max_qlen == 1:
            write_slots = phys_new.reshape(L, B * H)
        else:
            tok_req = torch.repeat_interleave(torch.arange(B, device=dev), qlens, output_size=T)
            tok_pos = computed[tok_req] + torch.arange(T, device=dev) - query_start_loc[:-1][tok_req]
            logical = torch.where(
                dense[tok_req][None, :, None], tok_pos[None, :, None], new_logical[:, tok_req]
            )  # [L, T, H]
            write_slots = self._phys(slots[tok_req], logical).flatten(1)

        # kernel rows: (request, head), each with its own pages and length
        num_cols = max(1, int(need.max())) if B else 1
        block_tables = self.pages[:, slots, :, :num_cols].reshape(L, B * H, num_cols)
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
            block_tables=block_tables,
            seq_lens=seq.reshape(L, B * H).to(torch.int32),
            row_query_start_loc=row_qsl,
            query_perm=perm,
            write_slots=write_slots,
            max_query_len=max(1, max_qlen),
            max_seq_len=num_cols * self.block_size,
        )

    def _grow(self, slots, have: torch.Tensor, deficit: torch.Tensor, total: int) -> None:
        """Append `deficit` fresh pages to each row ([L, B, H] flattened)."""
        L, B, H = have.shape
        layer = self._layer_idx.expand(L, B, H).flatten()
        head = self._head_idx.expand(L, B, H).flatten()
        slot_f = slots[None, :, None].expand(L, B, H).flatten()
        rep = torch.repeat_interleave(
            torch.arange(deficit.numel(), device=self.device), deficit, output_size=total
        )
        start = deficit.cumsum(0) - deficit
        col = have.flatten()[rep] + torch.arange(total, device=self.device) - start[rep]
        self.pages[layer[rep], slot_f[rep], head[rep], col] = self._alloc(total)

    def write_layer(self, plan: StepPlan, layer_idx: int, key, value, scores, isa: str) -> None:
        """Before the layer's attention: write the step's K/V and scores into their slots (vLLM's
        `cpu_attn_reshape_and_cache` for the transposed layout, an index copy for the plain one;
        `isa` is the CPU kernel's)."""
        slots = plan.write_slots[layer_idx]
        T, H, D = plan.num_tokens, self.num_heads, self.head_size
        if self.key_layout == "transposed":
            from vllm import _custom_ops as ops

            ops.cpu_attn_reshape_and_cache(
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
        self.slot_scores[slots] = scores[:T].reshape(-1).float()

    # ------------------------------------------------------------------ reporting
    def reports(self) -> dict[int, ResidentReport]:
        """Per request of the last step (by key): pages held, most pages its next step may hold
        (a row grows by at most one slot per step; a dense one is compacted first, which frees
        before it allocates)."""
        if self._report is None:
            return {}
        keys, held, next_pages, dense = (t.tolist() for t in self._report)
        self._report = None
        return {k: ResidentReport(*r) for k, *r in zip(keys, held, next_pages, dense)}

    def finished_counts(self, key: int) -> tuple[list[int], int, int] | None:
        """(pruned pairs per layer, peak pages, pages now) of a request, or None if unknown."""
        slot = int(self.slot_of_key[key]) if 0 <= key < self.slot_of_key.numel() else -1
        if slot < 0:
            return None
        slots = torch.tensor([slot], device=self.device)
        if bool(self.dense[slot]):
            # ends in its prompt: count tokens older than the window as judged, as DMS does
            n = int(self.num_tokens[slot])
            judged = torch.arange(max(0, n - self.window), device=self.device)
            phys = self._phys(slots, judged.view(1, 1, 1, -1))
            keep = self._prompt_keep(phys, slots, torch.tensor([judged.numel()], device=self.device))
            pruned = (~keep).sum((1, 2, 3))
        else:
            self.state[:, slots] = self._settle(slots)
            pruned = self.pruned[:, slot].sum(-1)
        pages = int(self.num_pages[:, slot].sum())
        return pruned.tolist(), max(int(self.peak_pages[slot]), pages), pages
