"""The worker's page state (`cache/page_table.py`) and the kernel rows (`attention/rows.py`) without
an engine, against the DMS rule and a dense masked attention in plain torch.

A batch of requests is driven through prompt chunks and decoding steps, mixed in the same steps.
Every key carries its (layer, position, head) in its first element, so the set of positions each
row exposes to vLLM's CPU kernel can be read back from the pages (through the kernel's own page
layout: pairs are written by `cpu_attn_reshape_and_cache`, moved by the page table) and compared
with what DMS says must be visible: every position not judged yet (the window, plus the token
leaving it in this step) and the judged positions whose score clears the threshold. The kernel's
output is compared with softmax attention over exactly those positions. Pages follow the layout
rule, the pool never runs past what the scheduler reserved, and everything returns to the pool.
Pages hold their scores after their values (`page_cell`); the directory's chunks are exercised at
their default size and at two page ids per chunk (rows of many chunks).
"""

from __future__ import annotations

import pytest
import torch

from tests.interpreter import run_in_triton_interpreter
from tests.reference_adakv import reference_keep
from vllm_kvzap.attention.rows import attend_layer
from vllm_kvzap.cache import page_pool, page_table
from vllm_kvzap.cache.page_pool import page_cell
from vllm_kvzap.cache.page_table import PageTable
from vllm_kvzap.cache.step_plan import StepRows

L, H, G, D, NB = 2, 2, 3, 32, 48
# vLLM's CPU kernel: pages of a multiple of 32 slots (`vec`), or of 16 (`vec16`), keys transposed;
# "triton": the CUDA path's kernel (vLLM's Triton `unified_attention`, plain pages), run on CPU
# tensors under TRITON_INTERPRET=1 in a subprocess
LAYOUTS = [(32, "vec"), (16, "vec16")]
TRITON = (16, "triton")


def identity(layer: int, pos: int, head: int) -> float:
    return float(1 + pos + 10_000 * layer + 1_000_000 * head)


class Sim:
    """Requests with fixed scores/keys/values per (layer, position, head)."""

    def __init__(self, prompt_lens, steps, window, seed=0, threshold=0.0, layout=LAYOUTS[0],
                 nb=NB, chunk=None, ratio=None, prefill="dense"):  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        self.bs, self.isa = layout
        self.window, self.threshold = window, threshold
        self.prompt_lens = prompt_lens
        n = max(prompt_lens) + steps + 1
        R = len(prompt_lens)
        self.scores = torch.randn(R, L, n, H, generator=g)
        self.keys = torch.randn(R, L, n, H, D, generator=g) * 0.3
        self.values = torch.randn(R, L, n, H, D, generator=g)
        for r in range(R):
            for layer in range(L):
                for h in range(H):
                    self.keys[r, layer, :, h, 0] = torch.tensor(
                        [identity(layer, p, h) for p in range(n)]
                    )
        self.buf = torch.zeros(L, nb, H, self.bs, page_cell(D, torch.float32))
        key_layout = "plain" if self.isa == "triton" else "transposed"
        self.table = PageTable([self.buf[i] for i in range(L)], window, threshold, 8, 1024,
                               key_layout=key_layout, chunk=chunk, ratio=ratio,
                               prefill=prefill)  # fmt: skip
        self.ratio, self.prefill = ratio, prefill
        if ratio is not None:  # ratio mode (window 0): AdaKV over each prompt, kvpress's rule
            self.prompt_keep = [
                reference_keep(self.scores[r : r + 1, :, :P], [P], ratio, 0.2)[0]
                for r, P in enumerate(prompt_lens)
            ]  # [L, P, H] each

    def kept(self, r: int, layer: int, h: int, p: int) -> bool:
        return bool(self.scores[r, layer, p, h] >= self.threshold)

    def visible(self, r, layer, h, n_written, decoding: bool, computed: int = 0) -> set[int]:
        if not decoding:
            if self.prefill == "dense":
                return set(range(n_written))
            # chunked: the tokens older than the window before this chunk were judged after
            # their chunk; the window before the chunk and the chunk itself are all there
            judged = max(computed - self.window, 0)
            return {p for p in range(judged) if self.kept(r, layer, h, p)} | set(
                range(judged, n_written)
            )
        n = n_written - 1  # the new token's position
        if self.ratio is not None:  # the prompt's AdaKV survivors, and everything generated
            P = self.prompt_lens[r]
            kept = self.prompt_keep[r][layer, :, h]
            return {p for p in range(P) if bool(kept[p])} | set(range(P, n + 1))
        keep = self.scores[r, layer, :, h] >= self.threshold
        return {p for p in range(n + 1) if p >= n - self.window or bool(keep[p])}


def run_step(sim: Sim, batch: list[tuple[int, int, int, bool]]):
    """batch: (request, num_computed, query_len, is_prefilling). Returns the plan."""
    qlens = torch.tensor([b[2] for b in batch])
    qsl = torch.zeros(len(batch) + 1, dtype=torch.int64)
    qsl[1:] = qlens.cumsum(0)
    rows = StepRows(
        req_keys=torch.tensor([1 + 3 * b[0] for b in batch]),
        num_computed=torch.tensor([b[1] for b in batch]),
        query_lens=qlens,
        is_prefilling=torch.tensor([b[3] for b in batch]),
        query_start_loc=qsl,
    )
    table = sim.table
    plan = table.plan(rows)
    T = int(qlens.sum())
    g = torch.Generator().manual_seed(T)
    query = torch.randn(T, H * G, D, generator=g)
    query[..., 0] = 0  # the keys' identity element takes no part in attention
    for layer in range(L):
        tok = [(r, c + t) for r, c, q, _ in batch for t in range(q)]
        key = torch.stack([sim.keys[r, layer, p] for r, p in tok])
        value = torch.stack([sim.values[r, layer, p] for r, p in tok])
        scores = torch.stack([sim.scores[r, layer, p] for r, p in tok])
        table.write_layer(plan, layer, key, value, scores, sim.isa)
        out = torch.zeros(T, H * G, D)
        if sim.isa == "triton":
            from vllm_kvzap.attention.triton_rows import attend_layer_triton

            attend_layer_triton(table, plan, layer, query, out, D**-0.5)
        else:
            attend_layer(table, plan, layer, query, out, D**-0.5, sim.isa)
        # what each row exposes, read back through the kernel's page layout
        for b, (r, c, q, pre) in enumerate(batch):
            decoding = q == 1 and not pre
            for h in range(H):
                row = b * H + h
                n_res = int(plan.seq_lens[layer, row])
                pages = plan.block_tables[layer][row]
                bs = sim.bs
                slots = torch.arange(n_res)
                ids = table.pool.key_at(pages[slots // bs].long(), slots % bs)[:, 0].tolist()
                positions = sorted(int(i - 1 - 10_000 * layer - 1_000_000 * h) for i in ids)
                assert positions == sorted(sim.visible(r, layer, h, c + q, decoding, c)), (
                    r, layer, h, c, q,
                )  # fmt: skip
                # the kernel's output against dense softmax over exactly those positions
                vis = torch.tensor(positions)
                k, v = sim.keys[r, layer, vis, h], sim.values[r, layer, vis, h]
                q0 = int(qsl[b])
                for t in range(q):
                    limit = c + t  # causal within a prompt chunk
                    m = vis <= limit
                    qt = query[q0 + t, h * G : (h + 1) * G]
                    att = torch.softmax((qt @ k[m].T) * D**-0.5, dim=-1) @ v[m]
                    torch.testing.assert_close(
                        out[q0 + t, h * G : (h + 1) * G], att, atol=2e-5, rtol=1e-4
                    )
    return plan


def check_pool(table: PageTable) -> None:
    BS, K = table.block_size, table.chunk
    held = int(table.rows.num_pages.sum())
    assert table.num_free + held == table.pool.capacity
    live = table.held_page_ids()
    assert live.unique().numel() == live.numel() == held  # no page held twice
    assert not set(live.tolist()) & set(table.pool.free_pages.items[: table.num_free].tolist())
    rows_need = -(-table.rows.seq_len // BS)
    assert bool((table.rows.num_pages == rows_need).all())  # pages follow the layout rule
    # every row holds exactly the chunks its pages need; the rest are free
    assert len(table.free_chunks) + int((-(-table.rows.num_pages // K)).sum()) == table.num_chunks - 1


@pytest.mark.parametrize("layout", LAYOUTS, ids=[isa for _, isa in LAYOUTS])
@pytest.mark.parametrize("window", [0, 1, 5, 32, 40, 200])
def test_rows_expose_exactly_what_dms_keeps(window, layout):
    scenario(window, layout, [3, 45, 130], steps=40)


@pytest.mark.parametrize("window", [0, 5, 40])
def test_rows_of_many_chunks(window):
    """Two page ids per directory chunk: rows span many chunks, which compaction frees and
    decoding allocates one by one."""
    scenario(window, LAYOUTS[1], [3, 45, 130], steps=40, chunk=2)


@pytest.mark.parametrize("window", [0, 5, 40])
def test_work_in_small_pieces(window, monkeypatch):
    """Compactions in pieces of one layer (or a few short prompts), releases in blocks of a few
    chunks, moves a few pairs at a time: the same rows."""
    monkeypatch.setattr(page_table, "WORK_ENTRIES", 48)
    monkeypatch.setattr(page_pool, "MOVE_PAIRS", 5)
    scenario(window, LAYOUTS[1], [3, 4, 45, 130], steps=20, chunk=2)


@pytest.mark.parametrize("work", [48, page_table.WORK_ENTRIES])
def test_ratio_mode_rows_keep_the_adakv_survivors(work, monkeypatch):
    """Ratio mode: each prompt's pairs are judged by AdaKV over each layer's whole prompt (at the
    first decoding step, in pieces of whole prompts), everything generated is kept."""
    monkeypatch.setattr(page_table, "WORK_ENTRIES", work)
    scenario(0, LAYOUTS[1], [3, 45, 130], steps=12, ratio=0.6)


@pytest.mark.parametrize("window", [0, 5, 40])
def test_cuda_path_rows_in_triton_unified_attention(window):
    """The same scenario through the CUDA path's kernel (plain pages, torch writes, vLLM's Triton
    `unified_attention`), on CPU tensors under the interpreter: decode rows and prompt chunks mixed
    (the 2D kernel), decode-only steps (its split-KV variant), GQA groups of 3, ragged lengths,
    windows below and above the sequences."""
    run_in_triton_interpreter(
        "import triton, triton.language as tl, vllm.triton_utils as tu\n"
        "tu.triton, tu.tl, tu.HAS_TRITON = triton, tl, True  # the CPU build hands out placeholders\n"
        "import vllm.v1.attention.ops.triton_unified_attention as tua\n"
        "launch, split_kv = tua.unified_attention, []\n"
        "def counting(**kw):  # the variant the kernel picks: split-KV (3D) on decode-only steps\n"
        "    split_kv.append(kw['max_seqlen_q'] == 1\n"
        "                    and kw['seqused_k'].numel() <= kw['seq_threshold_3D'])\n"
        "    return launch(**kw)\n"
        "tua.unified_attention = counting\n"
        "from tests.test_page_table import scenario, TRITON\n"
        f"scenario({window}, TRITON, [3, 45, 70], steps=12)\n"
        "assert any(split_kv) and not all(split_kv), split_kv  # both variants ran\n"
        "print('OK')\n",
        timeout=600,
    )


def scenario(
    window: int, layout, prompt_lens: list[int], steps: int, chunk=None, ratio=None,
    prefill="dense", prompt_chunk=50,
) -> None:  # fmt: skip
    sim = Sim(prompt_lens, steps, window, seed=window, layout=layout, chunk=chunk, ratio=ratio,
              prefill=prefill)  # fmt: skip
    BS = sim.bs
    chunk = prompt_chunk
    state = {r: 0 for r in range(len(prompt_lens))}  # tokens computed
    total = {r: n + steps for r, n in enumerate(prompt_lens)}
    reports = {}
    while any(state[r] < total[r] for r in state):
        batch = []
        for r, c in state.items():
            if c >= total[r]:
                continue
            P = prompt_lens[r]
            q = min(chunk, P - c) if c < P else 1
            batch.append((r, c, q, c < P))
        plan = run_step(sim, batch)
        del plan
        # a decoding step holds at most what the scheduler reserved from the last report
        # (`cache/manager.py`: at least the dense size on the first one; prompt chunks: dense,
        # or with chunked prefill the compacted pages so far plus the chunk's dense pages)
        pages = sim.table.rows.num_pages.sum((0, 2))
        for r, c, q, pre in batch:
            key = 1 + 3 * r
            held = int(pages[int(sim.table.requests.req_idx_of_key[key])])
            dense_pages = L * H * -(-(c + q) // BS)
            report = reports.get(key)
            if q == 1 and not pre:
                bound = max(report.next_pages, dense_pages) if report.dense else report.next_pages
                assert held <= bound, (r, c, held, report)
            elif report is not None and not report.dense:
                assert held <= report.pages + L * H * -(-q // BS), (r, c, held, report)
            else:
                assert held <= dense_pages
        sim.table.finish_step()  # after the forward pass (the KV connector's worker metadata)
        reports = sim.table.reports()
        if prefill == "chunked":  # prompt rows hold their kept pairs and window, compacted
            for r, c, q, pre in batch:
                if q == 1 and not pre:
                    continue
                n, judged = c + q, max(c + q - window, 0)
                want = sum(
                    -(-(sum(sim.kept(r, layer, h, p) for p in range(judged)) + n - judged) // BS)
                    for layer in range(L)
                    for h in range(H)
                )
                assert reports[1 + 3 * r].pages == want and not reports[1 + 3 * r].dense
        check_pool(sim.table)
        for r, c, q, _ in batch:
            state[r] = c + q
    for r, n in enumerate(prompt_lens):
        pruned, peak, end = sim.table.finished_counts(1 + 3 * r)
        judged = max(0, total[r] - window)
        keep = sim.scores[r, :, :judged] >= 0
        if ratio is not None:
            keep = sim.prompt_keep[r]
        assert pruned == (~keep).sum((1, 2)).tolist()
        assert end <= peak
    sim.table.release([1 + 3 * r for r in range(len(prompt_lens))])
    assert sim.table.num_free == sim.table.pool.capacity
    assert len(sim.table.free_chunks) == sim.table.num_chunks - 1
    assert len(sim.table.requests.free) == 8


def test_preempted_request_restarts_and_a_dense_one_counts_its_prompt():
    sim = Sim([70, 20], 10, window=8, seed=3)
    for c in range(70, 75):  # request 0 decodes a few steps
        if c == 70:
            run_step(sim, [(0, 0, 70, True)])
        run_step(sim, [(0, c, 1, False)])
    free_before = sim.table.num_free
    run_step(sim, [(0, 0, 40, True), (1, 0, 20, True)])  # request 0 recomputes from scratch
    assert sim.table.num_free < free_before
    check_pool(sim.table)
    # request 1 ends in its prompt: tokens older than the window count as judged
    pruned, _, _ = sim.table.finished_counts(1 + 3 * 1)
    keep = sim.scores[1, :, : 20 - 8] >= 0
    assert pruned == (~keep).sum((1, 2)).tolist()
    sim.table.release([1, 4])
    assert sim.table.num_free == sim.table.pool.capacity


def test_pool_refuses_to_overcommit():
    """Two blocks: one usable page per (layer, head). A prompt of two pages per row runs the pool
    dry; the device-side flag raises at the step's next read (its report), and the next plan."""
    sim = Sim([40], 1, window=4, nb=2)
    assert sim.table.pool.capacity == L * H
    rows = StepRows(req_keys=torch.tensor([1]), num_computed=torch.tensor([0]),
                    query_lens=torch.tensor([40]), is_prefilling=torch.tensor([True]),
                    query_start_loc=torch.tensor([0, 40]))  # fmt: skip
    sim.table.plan(rows)
    with pytest.raises(RuntimeError, match="page pool exhausted"):
        sim.table.reports()
    rows = StepRows(req_keys=torch.tensor([1]), num_computed=torch.tensor([40]),
                    query_lens=torch.tensor([1]), is_prefilling=torch.tensor([False]),
                    query_start_loc=torch.tensor([0, 1]))  # fmt: skip
    with pytest.raises(RuntimeError, match="page pool exhausted"):
        sim.table.plan(rows)


def test_a_fitting_prompt_raises_nothing():
    sim = Sim([32], 1, window=4, nb=2, layout=LAYOUTS[1])  # two pages of 16 per row: too many
    sim2 = Sim([16], 1, window=4, nb=2, layout=LAYOUTS[1])  # one page per row: exactly the pool
    run_step(sim2, [(0, 0, 16, True)])
    assert sim2.table.reports()[1].pages == L * H and sim2.table.num_free == 0
    rows = StepRows(req_keys=torch.tensor([1]), num_computed=torch.tensor([0]),
                    query_lens=torch.tensor([32]), is_prefilling=torch.tensor([True]),
                    query_start_loc=torch.tensor([0, 32]))  # fmt: skip
    sim.table.plan(rows)
    with pytest.raises(RuntimeError, match="page pool exhausted"):
        sim.table.reports()


def test_null_block_pages_are_never_handed_out():
    sim = Sim([10], 1, window=4)
    ids = set(sim.table.pool.free_pages.items[: sim.table.pool.capacity].tolist())
    page_elems = sim.bs * page_cell(D, torch.float32)
    null = {
        (sim.buf[layer, 0, h].data_ptr() - sim.buf.data_ptr()) // (4 * page_elems)
        for layer in range(L)
        for h in range(H)
    }
    assert not null & ids
    assert len(ids) == L * (NB - 1) * H


@pytest.mark.parametrize(
    "window,prompt_chunk,layout",
    [(0, 50, LAYOUTS[1]), (5, 50, LAYOUTS[0]), (40, 16, LAYOUTS[1]), (200, 50, LAYOUTS[0])],
    ids=lambda x: x[1] if isinstance(x, tuple) else str(x),
)
def test_chunked_prefill_rows_expose_what_each_chunk_kept(window, prompt_chunk, layout):
    """`prefill: chunked`: after each prompt chunk, the tokens that left the window are judged and
    the pruned ones freed, so the next chunk sees the kept pairs, the window and itself; decoding
    then goes on as with a dense prompt. Chunks that divide prompts (100 / 50, 48 / 16) and that
    do not (130 / 50), with prompts and decoding mixed in steps."""
    scenario(window, layout, [3, 45, 100, 130], steps=30, prefill="chunked",
             prompt_chunk=prompt_chunk)  # fmt: skip


def test_chunked_prefill_in_small_pieces(monkeypatch):
    monkeypatch.setattr(page_table, "WORK_ENTRIES", 48)
    monkeypatch.setattr(page_pool, "MOVE_PAIRS", 5)
    scenario(5, LAYOUTS[1], [3, 45, 130], steps=10, chunk=2, prefill="chunked", prompt_chunk=20)


def test_chunked_prefill_preempted_mid_prompt_restarts():
    """A request preempted mid-prompt gives everything back and recomputes from its first token
    (its slot is stale), compacting chunk by chunk again."""
    sim = Sim([90, 20], 10, window=8, seed=5, prefill="chunked")
    run_step(sim, [(0, 0, 40, True)])
    sim.table.finish_step()
    sim.table.reports()
    run_step(sim, [(0, 40, 30, True)])
    sim.table.finish_step()
    sim.table.reports()
    sim.table.release([1])  # preempted
    check_pool(sim.table)
    assert sim.table.num_free == sim.table.pool.capacity
    for c, q in ((0, 50), (50, 40)):
        run_step(sim, [(0, c, q, True)] + ([(1, 0, 20, True)] if c == 0 else []))
        sim.table.finish_step()
        sim.table.reports()
        check_pool(sim.table)
    run_step(sim, [(0, 90, 1, False), (1, 20, 1, False)])
    pruned, peak, end = sim.table.finished_counts(1)
    keep = sim.scores[0, :, : 91 - 8] >= 0
    assert pruned == (~keep).sum((1, 2)).tolist() and end <= peak
    sim.table.release([1, 4])
    assert sim.table.num_free == sim.table.pool.capacity


def test_chunked_prefill_refuses_ratio_mode():
    with pytest.raises(ValueError, match="prefill"):
        Sim([10], 1, window=0, ratio=0.5, prefill="chunked")
