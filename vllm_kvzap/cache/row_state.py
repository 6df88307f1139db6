"""The page table's bookkeeping, in vLLM's words: requests by `req_idx`, rows by field name.

A running request holds a *request index* (`req_idx`, like a row of vLLM's `InputBatch`) from its
first step to its release; the scheduler side names it by its *request key* (`req_key`: its first
block id, the first column of vLLM's block table). `Requests` maps keys to indices and holds what
is per request: tokens written, the ring's shift, dense or compacted, peak pages, its threshold
(ratio). `RowState` holds what is per row, i.e. per (layer, req_idx, KV head): the `RowFields`,
packed in one tensor so that a step gathers and scatters them at once, by name. Index `max_reqs`
is a dump for masked writes in both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from vllm_kvzap.cache.page_pool import FreeStack


@dataclass
class RowFields:
    """One value per row, `[l, X, H]` int64 each for the rows of X requests in l layers."""

    num_pages: torch.Tensor  # pages held
    base: torch.Tensor  # kept prompt pairs (the ring starts after them)
    surv: torch.Tensor  # decoding survivors (after the ring)
    seq_len: torch.Tensor  # resident slots in the last step
    pruned: torch.Tensor  # pruned pairs


ROW_FIELDS = tuple(f.name for f in fields(RowFields))


class RowState:
    """`RowFields` of every row, packed `[L, max_reqs + 1, H, len(ROW_FIELDS)]` int64 (allocated
    with the model: `page_table.allocate_directory`); each field is also a `[L, S + 1, H]` view."""

    def __init__(self, packed: torch.Tensor):
        self.packed = packed.zero_()
        for name, view in zip(ROW_FIELDS, packed.unbind(-1)):
            setattr(self, name, view)

    def gather(self, req_idx: torch.Tensor) -> RowFields:
        return RowFields(*self.packed[:, req_idx].unbind(-1))

    def scatter(self, req_idx: torch.Tensor, rows: RowFields) -> None:
        self.packed[:, req_idx] = torch.stack([getattr(rows, f) for f in ROW_FIELDS], -1)

    def clear(self, req_idx: torch.Tensor) -> None:
        self.packed[:, req_idx] = 0


class Requests:
    """Per-request state by `req_idx` (`[max_reqs + 1]`; index -1, no request, lands on the dump)
    and the key -> index map (`[num_blocks + 1]`; entry -1 is the dump). Thresholds compare in
    float32 as kvpress's (a Python float against float32 scores); ratios stay float64
    (`adakv_counts`: 0.3 in float32 is another number)."""

    def __init__(self, max_reqs, num_blocks, default_value: float, ratio_mode: bool, top, short,
                 device):  # fmt: skip
        S, dev = max_reqs, device
        self.num_tokens = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        self.shift = torch.zeros(S + 1, dtype=torch.int64, device=dev)  # ring start's position
        self.dense = torch.ones(S + 1, dtype=torch.bool, device=dev)  # in its prompt, uncompacted
        self.peak_pages = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        # each request's threshold (ratio): the engine's, or its own, which `set_values` parks
        # by key until the request takes an index
        self.default_value = default_value
        vdtype = torch.float64 if ratio_mode else torch.float32
        self.value = torch.full((S + 1,), default_value, dtype=vdtype, device=dev)
        self.req_key = torch.full((S + 1,), -1, dtype=torch.int64, device=dev)
        self.value_of_key = torch.full((num_blocks + 1,), float("nan"), dtype=vdtype, device=dev)
        self.req_idx_of_key = torch.full((num_blocks + 1,), -1, dtype=torch.int64, device=dev)
        items = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        items[:S] = torch.arange(S - 1, -1, -1, dtype=torch.int64, device=dev)
        top.fill_(S)
        self.free = FreeStack(items, top, short)

    def set_values(self, values: dict[int, float]) -> None:
        """Own thresholds (ratios) of requests that take an index in the next plan, by key."""
        if values:
            self.value_of_key[torch.tensor(list(values), device=self.req_key.device)] = (
                torch.tensor(list(values.values()), dtype=self.value.dtype,
                             device=self.req_key.device)
            )  # fmt: skip

    def assign(self, req_keys: torch.Tensor) -> None:
        """Give each new request an index, with its own value if one was parked."""
        req_idx = self.free.pop(torch.ones_like(req_keys, dtype=torch.bool))
        self.req_idx_of_key[req_keys] = req_idx
        self.req_key[req_idx] = req_keys
        own = self.value_of_key[req_keys]
        self.value[req_idx] = torch.where(own.isnan(), self.default_value, own)
        self.value_of_key[req_keys] = float("nan")

    def release(self, req_idx: torch.Tensor) -> None:
        """Forget requests [X] (valid indices) and free their indices."""
        self.num_tokens[req_idx] = 0
        self.shift[req_idx] = 0
        self.dense[req_idx] = True
        self.peak_pages[req_idx] = 0
        self.req_idx_of_key[self.req_key[req_idx]] = -1
        self.req_key[req_idx] = -1
        self.free.push(req_idx, torch.ones_like(req_idx, dtype=torch.bool))
