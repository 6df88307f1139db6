"""The plugin's device memory at vLLM's H100 defaults, from the code's own allocations on meta.

Qwen3-8B's attention shape (36 layers, 8 KV heads of 128, 32 query heads, bf16), `vllm serve`'s
H100 defaults (`max_num_seqs` 1024, `max_num_batched_tokens` 8192), `max_model_len` 40960, block
size 16, a 60 GiB KV pool. Nothing here copies a formula: the runtime (`attention/runtime.py`:
score buffer, per-row directory), the KV cache views (vLLM's own `create_kv_cache_views` with the
plugin's `KVzapAttentionSpec`), the page table (`setup_paged`: pool directory, per-slot state) and
worst-case steps (`PageTable.plan`, every layer's block table, `write_layer` and the kernel's row
queries; `release`) all run for real on `torch.device("meta")`, and a dispatch mode counts the
bytes of every storage they allocate, live and at peak. Values do not exist on meta: the page
table's few host reads (`PageTable._read`) are answered with the scenario's worst case, and every
shape the plan makes depends only on host-side sizes, so what is counted is what a GPU would
allocate (bar temporaries inside single kernels).

Required: persistent memory + the worst step's peak <= 2% of the KV pool + 256 MiB. The scores
live in the pool (`KVzapAttentionSpec` adds 4 bytes per slot and head to vLLM's page size, so vLLM
allocates fewer blocks); the test checks that too, and that the per-row and pool directories match
the formula stated in `cache/page_table.py` and the README.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vllm_kvzap.attention.rows import row_queries, scatter_rows
from vllm_kvzap.attention.runtime import PruningRuntime
from vllm_kvzap.attention.triton_rows import split_kv_buffers
from vllm_kvzap.cache.page_pool import cdiv
from vllm_kvzap.cache.page_table import WORK_ENTRIES, PageTable
from vllm_kvzap.cache.step_plan import StepRows
from vllm_kvzap.config import KVPruningConfig

L, H, G, D, BS = 36, 8, 4, 128, 16  # Qwen3-8B: 32 query heads on 8 KV heads
MAX_NUM_SEQS, MAX_TOKENS, MAX_MODEL_LEN = 1024, 8192, 40960
POOL = 60 * 2**30
BUDGET = POOL // 50 + 256 * 2**20
WINDOW = 128
META = torch.device("meta")
MiB = 2**20


class DeviceBytes(TorchDispatchMode):
    """Bytes of the meta storages allocated while active: live now, and the peak."""

    def __init__(self):
        super().__init__()
        self.ignored: set[int] = set()
        self.refs: dict[int, list[int]] = {}
        self.live = self.peak = 0

    def ignore(self, t: torch.Tensor) -> None:
        """Storages that are not the plugin's (the KV pool, the model's activations)."""
        key = t.untyped_storage()._cdata
        self.ignored.add(key)
        if key in self.refs:
            self.live -= self.refs.pop(key)[0]

    def reset_peak(self) -> int:
        self.peak = self.live
        return self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                self._hold(t)
        return out

    def _hold(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        if key in self.ignored or nbytes == 0:
            return
        if key not in self.refs:
            self.refs[key] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key][1] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        ref = self.refs.get(key)
        if ref is None:
            return
        ref[1] -= 1
        if ref[1] == 0:
            self.live -= ref[0]
            del self.refs[key]


def kv_caches(tracker: DeviceBytes):
    """The KV pool as vLLM 0.32 lays it out for the CUDA backend (LBHNC), on meta."""
    from vllm.v1.kv_cache_interface import KVCacheTensor, create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from vllm_kvzap.cache.spec import KVzapAttentionSpec

    spec = KVzapAttentionSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)
    page = spec.page_size_bytes  # one (layer, block): H pages
    num_blocks = POOL // (L * page)
    raw = torch.empty(num_blocks * L * page, dtype=torch.int8, device=META)
    tracker.ignore(raw)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    tensor = KVCacheTensor(size=raw.numel(), layers=names, layer_stride=page * num_blocks,
                           block_stride=page)  # fmt: skip
    views = create_kv_cache_views(raw, spec, num_blocks, KVCacheLayout.LBHNC, tensor)
    return spec, num_blocks, dict(zip(names, views))


class Answers:
    """The page table's host reads on meta, answered with a scenario's worst case."""

    def __init__(self, table: PageTable):
        self.table, self.piece = table, 0
        self.compacting: set[int] = set()  # batch indices of decoding rows that compact
        self.batch: StepRows | None = None
        self.release_pages = 0  # pages per row of released requests
        original = table._compact_piece

        def piece(layers, slots, num_tokens, T):  # every pair of the piece moves (the bound)
            self.piece = layers.numel() * slots.numel() * H * T
            return original(layers, slots, num_tokens, T)

        table._compact_piece = piece
        table._read = self.read

    def read(self, t: torch.Tensor, what: str) -> torch.Tensor:
        n = t.numel()
        if what == "plan":
            fresh = int((self.batch.num_computed == 0).sum())
            rows = self.batch
            decoding = ((rows.query_lens == 1) & ~rows.is_prefilling).nonzero().flatten()
            dense = [int(i) in self.compacting for i in decoding]
            # every kept pair leaving a full ring moves (the bound)
            moves = L * H * sum(
                not d and int(rows.num_computed[i]) > WINDOW for i, d in zip(decoding, dense)
            )
            return torch.tensor([0, 0, 0, 0, moves] + [0] * fresh + dense, dtype=torch.int64)
        if what == "compaction":
            return torch.tensor(self.piece)
        if what == "release":
            X = n // (1 + L * H)
            return torch.tensor([1] * X + [self.release_pages] * (n - X))
        return torch.zeros(n, dtype=torch.int64)  # reports: flags clear, values unused


def batch(rows: list[tuple[int, int, bool]]) -> StepRows:
    """rows: (num_computed, query_len, is_prefilling); keys 1..B."""
    qlens = torch.tensor([r[1] for r in rows])
    qsl = torch.zeros(len(rows) + 1, dtype=torch.int64)
    qsl[1:] = qlens.cumsum(0)
    return StepRows(
        req_keys=torch.arange(1, len(rows) + 1, device=META),
        num_computed=torch.tensor([r[0] for r in rows]),
        query_lens=qlens,
        is_prefilling=torch.tensor([r[2] for r in rows]),
        query_start_loc=qsl,
    )


def run_step(table: PageTable, answers: Answers, tracker: DeviceBytes, rows: StepRows) -> int:
    """One step, as a backend runs it; returns its peak bytes above what was live before."""
    T = int(rows.query_lens.sum())
    # the model's activations are not the plugin's
    key = torch.empty(T, H, D, dtype=torch.bfloat16, device=META)
    query = torch.empty(T, H * G, D, dtype=torch.bfloat16, device=META)
    value, out = torch.empty_like(key), torch.empty_like(query)
    for t in (key, value, query, out, rows.req_keys):  # (keys: a column of vLLM's block table)
        tracker.ignore(t)
    scores = torch.empty(T, H, dtype=torch.float32, device=META)  # the runtime's score buffer
    tracker.ignore(scores)
    answers.batch = rows
    base = tracker.reset_peak()
    plan = table.plan(rows)
    for layer in range(L):
        block_table = plan.block_tables[layer]
        table.write_layer(plan, layer, key, value, scores, None)
        rows_q, out_rows = row_queries(plan, query, out, H)
        scatter_rows(plan, out, out_rows, H)
        del block_table, rows_q, out_rows
    table.reports()
    del plan
    return tracker.peak - base


@pytest.fixture(scope="module")
def measured():
    tracker = DeviceBytes()
    sizes = {}
    with tracker:
        config = KVPruningConfig(method="kvzap-mlp", threshold=-4.0, window=WINDOW)
        runtime = PruningRuntime(config, None, L, H, max_num_seqs=MAX_NUM_SEQS,
                                 max_model_len=MAX_MODEL_LEN, max_num_tokens=MAX_TOKENS,
                                 device=META, key_layout="plain", block_size=BS)  # fmt: skip
        sizes["score buffer"] = runtime.score_buffer.untyped_storage().nbytes()
        sizes["row directory"] = sum(t.untyped_storage().nbytes() for t in runtime.directory)
        assert tracker.live == sizes["score buffer"] + sizes["row directory"]
        spec, num_blocks, caches = kv_caches(tracker)
        before = tracker.live
        runtime.setup_paged(caches)
        table = runtime.pages
        sizes["pool directory and slots"] = tracker.live - before
        before = tracker.live
        split_kv_buffers(G, D, META)  # the Triton kernel's split-KV scratch, allocated once
        sizes["split-KV scratch"] = tracker.live - before
        persistent = tracker.live
        answers = Answers(table)
        short, long = 1000, MAX_MODEL_LEN - 1
        steps = {
            # 1024 decoding rows, one 40k tokens long: the widest block tables
            "decode, one 40k row beside 1023": [(long, 1, False)] + [(short, 1, False)] * 1023,
            # the same with a prefill chunk filling the step to 8192 tokens
            "decode + 7170-token prefill chunk": [(long, 1, False)]
            + [(20000, MAX_TOKENS - 1023, True)]
            + [(short, 1, False)] * 1022,
            # a 40k prompt's compaction (its first decoding step) beside 1023 decoding rows
            "40k prompt compaction": [(long, 1, False)] + [(short, 1, False)] * 1023,
            # 1024 prompts of 400 tokens compacting at once (what fits the pool densely)
            "1024 compactions of 400": [(400, 1, False)] * 1024,
            # 1024 new prompts of 8 tokens
            "1024 fresh prompts": [(0, 8, True)] * 1024,
        }
        peaks = {}
        for name, rows in steps.items():
            answers.compacting = {0} if name == "40k prompt compaction" else set()
            if name == "1024 compactions of 400":
                answers.compacting = set(range(1024))
            peaks[name] = run_step(table, answers, tracker, batch(rows))
            assert tracker.live == persistent, name  # nothing stays behind a step
        # releasing every page of the pool at once (1024 requests, all rows full)
        answers.release_pages = table.pool.capacity // (MAX_NUM_SEQS * L * H)
        base = tracker.reset_peak()
        table.release(list(range(1, MAX_NUM_SEQS + 1)))
        peaks["release of the whole pool"] = tracker.peak - base
    return dict(sizes=sizes, persistent=persistent, peaks=peaks, spec=spec,
                num_blocks=num_blocks, table=table)  # fmt: skip


def test_memory_at_h100_defaults_is_bounded(measured):
    persistent, peaks = measured["persistent"], measured["peaks"]
    worst = max(peaks.values())
    lines = [f"{k}: {v / MiB:.1f} MiB" for k, v in measured["sizes"].items()]
    lines += [f"step '{k}': {v / MiB:.1f} MiB" for k, v in peaks.items()]
    lines.append(f"total {(persistent + worst) / MiB:.1f} MiB <= budget {BUDGET / MiB:.1f} MiB")
    print("\n".join(lines))
    assert persistent + worst <= BUDGET, lines
    # the bound is not vacuous: the old flat directory alone ([L, S, H, P] int32) was 2.8 GiB
    assert 4 * L * MAX_NUM_SEQS * H * cdiv(MAX_MODEL_LEN + 1, BS) > BUDGET


def test_scores_are_counted_in_vllms_kv_budget(measured):
    """vLLM's page size carries 4 bytes per slot and head; the table's scores sit inside the
    pool's buffer (no allocation of their own)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec, table = measured["spec"], measured["table"]
    plain = FullAttentionSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)
    assert spec.page_size_bytes == plain.page_size_bytes + 4 * BS * H
    assert table.pool.slot_scores.untyped_storage()._cdata == table.pool.kv_pages.untyped_storage()._cdata
    assert table.pool.num_pages_total == measured["num_blocks"] * L * H


def test_directory_matches_the_stated_formula(measured):
    """The README's and `page_table.py`'s formula, written out independently of the code."""
    sizes, table = measured["sizes"], measured["table"]
    R = L * (MAX_NUM_SEQS + 1) * H
    P = cdiv(MAX_MODEL_LEN + 1, BS)
    K = 64  # about sqrt(P) = 50.6, a power of two
    N = table.pool.num_pages_total
    assert table.chunk == K
    assert sizes["row directory"] == 4 * R * cdiv(P, K) + 40 * R
    rows = L * MAX_NUM_SEQS * H
    pool_dir = 4 * (K + 1) * (1 + rows + cdiv(N, K)) + 4 * (N + 1)
    per_slot = sizes["pool directory and slots"] - pool_dir
    assert 0 <= per_slot < 1 * MiB  # per slot and per key: a few vectors of 1k and 30k entries
    assert sizes["score buffer"] == 4 * L * MAX_TOKENS * H


def test_compaction_pieces_stay_within_their_bound(measured):
    """A 40k prompt is compacted in pieces of whole layers of at most WORK_ENTRIES entries."""
    table = measured["table"]
    pieces = list(table._pieces(torch.tensor([MAX_MODEL_LEN - 1])))
    assert len(pieces) > 1
    for (l0, l1), idx in pieces:
        assert (l1 - l0) * idx.numel() * H * (MAX_MODEL_LEN - 1) <= WORK_ENTRIES
