"""GPU checks without vLLM: the scoring paths and the page table against their CPU twins, timed.

    python -m benchmarks.gpu_kernel_check [--out benchmarks/results/gpu_kernels.json]

For a machine with an NVIDIA GPU and no vLLM (imports only ``vllm_kvzap.kernels``,
``vllm_kvzap.cache.page_table``, torch and Triton):
- scoring, at Qwen3-8B's surrogate shapes (input 4096, 8 KV heads, MLP hidden 512, and the linear
  surrogate), w1 in the inputs' dtype as the ``Surrogate`` keeps it: per token count (one decoding
  step to a long prefill chunk, both sides of ``TRITON_MAX_TOKENS``), the Triton kernel's and the
  torch path's (cuBLAS GEMMs in bf16, fp32 out) GPU time, replayed from a CUDA graph as vLLM runs
  a step, their largest score difference against ``scores_torch`` (float32 math on the
  same bf16-rounded inputs), and which path ``use_triton`` picks; a tile sweep of the MLP kernel
  (to revise ``_launch_config``); and the cost of 36 layers' scoring in one decode step at batch
  64 (one CUDA graph, every layer its own weights, so w1 comes from memory as in a real step) as
  a share of a plain Qwen3-8B decode step, estimated from the H100's memory bandwidth;
- page table (the CUDA path's page state, plain key layout, cells of K, V and score as
  `page_cell`): a batch of requests through a dense prompt step and decoding steps (compaction,
  window, ring, page allocation), every layer's K/V and scores written; on CUDA and on CPU
  from the same inputs, and every step's plan (each layer's block tables up to its rows' lengths,
  lengths, write slots) and the final page state (rows' state, held page ids and their cells, free
  pages) must be equal; then, at Qwen3-8B's shape (36 layers, 8 KV heads of 128, pages of 16) on
  CUDA only, the time of a decoding step's plan, of one layer's writes and of one layer's block
  table gather, per batch size.
Exits at once with a message when no GPU is visible.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import harness, report
from vllm_kvzap import rule
from vllm_kvzap.kernels import surrogate_score as ss

QWEN3_8B = harness.config_shape(harness.QWEN3_8B_CONFIG)
D, H, LAYERS = harness.QWEN3_8B_CONFIG["hidden_size"], QWEN3_8B["kv_heads"], QWEN3_8B["layers"]
N = harness.QWEN3_8B_SURROGATE_HIDDEN  # the surrogate MLP's width
TOKENS = (1, 64, 256, 1024, 2048, 8192)
THRESHOLD = -4.0
MAX_SCORE_DIFF = 2e-3  # Triton vs the twin on the same inputs: fp32 sums in another order only
# A plain Qwen3-8B decode step, from memory traffic: bf16 weights read once, plus the batch's KV.
DECODE_BATCH, CONTEXT = 64, 1024
WEIGHT_BYTES, HBM_BYTES_PER_S = 16.4e9, 3.0e12  # H100 SXM: 3.35 TB/s peak, ~3.0 achieved
KV_BYTES_PER_TOKEN = harness.kv_bytes_per_token(QWEN3_8B, "bfloat16")


def gpu_ms(fn, reps: int = 20, calls: int = 10) -> float:
    """Median GPU milliseconds of one ``fn()``, replayed ``calls`` times from a CUDA graph (as
    vLLM replays a step: no host launch overhead)."""
    side = torch.cuda.Stream()  # warm up (Triton compile, cuBLAS handles) off the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def surrogate_weights(kind: str, gen: torch.Generator, dtype: torch.dtype, layers: int = 1):
    """(w1 in dtype, b1, w2, b2) stacked over layers, float32 but w1, on the GPU."""
    n = N if kind == "mlp" else H
    w1 = (torch.randn(layers, n, D, generator=gen) / D**0.5).to("cuda", dtype)
    b1 = torch.randn(layers, n, generator=gen).cuda() - (0 if kind == "mlp" else 4)
    if kind == "linear":
        return w1, b1, None, None
    w2 = (torch.randn(layers, H, N, generator=gen) / N**0.5).cuda()
    return w1, b1, w2, torch.randn(layers, H, generator=gen).cuda() - 4


def layer(weights, i: int = 0):
    return tuple(None if w is None else w[i] for w in weights)


def check(kind: str, dtype: torch.dtype, tokens: int, gen: torch.Generator) -> dict:
    x = torch.randn(tokens, D, generator=gen).to("cuda", dtype)
    args = layer(surrogate_weights(kind, gen, dtype))
    want = ss.scores_torch(x, *args)
    got = ss.scores_triton(x, *args)
    keep_mismatch = rule.keep(got, THRESHOLD) != rule.keep(want, THRESHOLD)
    torch.cuda.synchronize()
    return {
        "kind": kind, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
        "path": "triton" if ss.use_triton(tokens, kind == "mlp") else "torch",
        "triton_max_abs_diff": float((got - want).abs().max()),
        "torch_max_abs_diff": float((ss.scores_cublas(x, *args) - want).abs().max()),
        "keep_mismatch": float(keep_mismatch.float().mean()),
        "triton_ms": gpu_ms(lambda: ss.scores_triton(x, *args)),
        "torch_ms": gpu_ms(lambda: ss.scores_cublas(x, *args)),
    }  # fmt: skip


def tile_sweep(gen: torch.Generator) -> list[dict]:
    """The bf16 MLP kernel's time per (BLOCK_T, BLOCK_N), BLOCK_D as chosen, around decode sizes."""
    w1, b1, w2, b2 = layer(surrogate_weights("mlp", gen, torch.bfloat16))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for tokens in (1, 64, 256, 1024):
        x = torch.randn(tokens, D, generator=gen).to("cuda", torch.bfloat16)
        chosen = ss._launch_config(tokens, D, N, H, True, 2, sms, None, None, None)[:2]
        for bt in (16, 32, 64):
            for bn in (16, 32, 64):
                ms = gpu_ms(
                    lambda bt=bt, bn=bn: ss.scores_triton(x, w1, b1, w2, b2, block_t=bt, block_n=bn)
                )
                rows.append(dict(tokens=tokens, block_t=bt, block_n=bn, ms=ms, chosen=(bt, bn) == chosen))
    return rows


def decode_share(kind: str, gen: torch.Generator) -> dict:
    """36 layers' scoring of a batch-64 decode step (the op, as the model calls it) as a share of
    a plain decode step estimated from memory traffic."""
    weights = surrogate_weights(kind, gen, torch.bfloat16, LAYERS)
    x = torch.randn(DECODE_BATCH, D, generator=gen).to("cuda", torch.bfloat16)
    ms = gpu_ms(lambda: [ss.surrogate_scores(x, *layer(weights, i)) for i in range(LAYERS)], calls=1)
    weights_ms = 1e3 * WEIGHT_BYTES / HBM_BYTES_PER_S
    kv_ms = 1e3 * DECODE_BATCH * CONTEXT * KV_BYTES_PER_TOKEN / HBM_BYTES_PER_S
    return dict(kind=kind, batch=DECODE_BATCH, scoring_ms=ms, plain_step_ms_weights_only=weights_ms,
                plain_step_ms_with_kv=weights_ms + kv_ms, context=CONTEXT,
                share_weights_only=ms / weights_ms, share_with_kv=ms / (weights_ms + kv_ms))  # fmt: skip


PT_SHAPE = dict(L=4, H=3, D=64, bs=16, prompt_lens=[5, 40, 130, 257], steps=40, window=16, seed=0)


def sync(device) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def plan_fields(plan, tables: list[torch.Tensor], bs: int) -> dict[str, torch.Tensor]:
    """A step's plan on the host. Block-table columns past a row's resident slots hold ids the
    kernel never reads (stale, or the dump chunk's): -1 here."""
    out = {f: getattr(plan, f).cpu() for f in ("seq_lens", "row_query_start_loc", "write_slots")}
    out["sizes"] = torch.tensor([plan.num_tokens, plan.max_query_len, plan.max_seq_len])
    if plan.query_perm is not None:
        out["query_perm"] = plan.query_perm.cpu()
    for layer, bt in enumerate(tables):
        bt = bt.cpu()
        used = torch.arange(bt.shape[1]) < (out["seq_lens"][layer, :, None] + bs - 1) // bs
        out[f"block_tables[{layer}]"] = torch.where(used, bt, -1)
    return out


def page_state(table) -> dict[str, torch.Tensor]:
    """The final page state on the host: the rows' state (not the dump row's), the pages they
    hold with their K/V and scores (the cells' bits), and the free-page stack's live part."""
    held = table.held_page_ids().long()
    return {
        "state": table.rows.packed[:, : table.max_reqs].cpu(),
        "held_page_ids": held.cpu(),
        "held_pages": table.pool.kv_pages[held].view(torch.int16).cpu(),
        "slot_scores": table.pool.slot_scores[held].cpu(),
        "free_pages": table.pool.free_pages.items[: table.num_free].cpu(),
    }


def drive_table(device, L, H, D, bs, prompt_lens, steps, window, seed, time_steps=False):
    """Requests through one dense prompt step and `steps` decoding steps on a fresh page table;
    returns the plans (`plan_fields`), the final table, and (time_steps) the decoding steps'
    plan, per-layer write and per-layer block-table gather times in ms."""
    from vllm_kvzap.cache.page_pool import page_cell
    from vllm_kvzap.cache.page_table import PageTable
    from vllm_kvzap.cache.step_plan import StepRows

    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    longest = max(prompt_lens) + steps + 1
    num_blocks = 2 + sum(-(-(n + steps + 1) // bs) for n in prompt_lens)
    # cells of K, V and the score, all layers in one buffer (as KVzapAttentionSpec allocates)
    cell = page_cell(D, torch.bfloat16)
    buf = torch.zeros(L, num_blocks, H, bs, cell, dtype=torch.bfloat16, device=device)
    table = PageTable([buf[i] for i in range(L)], window, 0.0, B, longest, key_layout="plain")
    keys = torch.arange(1, B + 1)
    computed = torch.zeros(B, dtype=torch.int64)
    plans, plan_ms, write_ms, gather_ms = [], [], [], []
    for step in range(steps + 1):
        qlens = torch.tensor(prompt_lens) if step == 0 else torch.ones(B, dtype=torch.int64)
        qsl = torch.zeros(B + 1, dtype=torch.int64)
        qsl[1:] = qlens.cumsum(0)
        rows = StepRows(req_keys=keys.to(device), num_computed=computed.clone(), query_lens=qlens,
                        is_prefilling=torch.full((B,), step == 0), query_start_loc=qsl)  # fmt: skip
        T = int(qsl[-1])
        inputs = [(torch.randn(T, H, D, generator=g).to(device, torch.bfloat16),
                   torch.randn(T, H, D, generator=g).to(device, torch.bfloat16),
                   torch.randn(T, H, generator=g).to(device)) for _ in range(L)]  # fmt: skip
        sync(device)
        t0 = time.perf_counter()
        plan = table.plan(rows)
        sync(device)
        t1 = time.perf_counter()
        for layer, (k, v, scores) in enumerate(inputs):
            table.write_layer(plan, layer, k, v, scores, None)
        sync(device)
        t2 = time.perf_counter()
        # gathered now: they read the directory as it is (the next plan changes it)
        tables = [plan.block_tables[layer] for layer in range(L)]
        sync(device)
        if step > 1:  # decoding steps after the compaction
            plan_ms.append(1000 * (t1 - t0))
            write_ms.append(1000 * (t2 - t1) / L)
            gather_ms.append(1000 * (time.perf_counter() - t2) / L)
        if not time_steps:
            plans.append(plan_fields(plan, tables, bs))
        del tables
        computed += qlens
    return plans, table, (plan_ms, write_ms, gather_ms)


def compare_page_tables(devices=("cuda", "cpu"), shape=PT_SHAPE) -> list[str]:
    """What differs between the page table driven on devices[0] and on devices[1] from the same
    inputs: every step's plan, then the final page state."""
    (plans_a, table_a, _), (plans_b, table_b, _) = (drive_table(d, **shape) for d in devices)
    mismatches = [] if len(plans_a) == len(plans_b) else ["number of steps"]
    for i, (a, b) in enumerate(zip(plans_a, plans_b)):
        mismatches += [f"step {i} {f}" for f in a.keys() | b.keys()
                       if f not in a or f not in b or not torch.equal(a[f], b[f])]  # fmt: skip
    state_a, state_b = page_state(table_a), page_state(table_b)
    mismatches += [f"final {k}" for k in state_a if not torch.equal(state_a[k], state_b[k])]
    return sorted(mismatches)


def check_page_table() -> dict:
    """The CUDA page table equals the CPU one step by step; then timings at Qwen3-8B's shape."""
    mismatches = compare_page_tables()
    timings = []
    for batch in (16, 64, 256):
        _, _, (plan_ms, write_ms, gather_ms) = drive_table(
            "cuda", L=36, H=8, D=128, bs=16, prompt_lens=[512] * batch, steps=12, window=128,
            seed=1, time_steps=True,
        )  # fmt: skip
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        timings.append(dict(batch=batch, plan_ms=med(plan_ms), write_ms_per_layer=med(write_ms),
                            block_table_ms_per_layer=med(gather_ms)))  # fmt: skip
    return dict(equal_to_cpu=not mismatches, mismatches=mismatches[:20], shape=PT_SHAPE,
                qwen3_8b_decode_step=timings)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_kernels.json"))
    ap.add_argument("--self-check-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.self_check_cpu:  # the page-table comparison, CPU against CPU: no GPU needed
        mismatches = compare_page_tables(("cpu", "cpu"))
        print(f"page table on CPU equals CPU: {not mismatches} {mismatches[:20] or ''}")
        return 1 if mismatches else 0
    harness.require_gpu("gpu_kernel_check")
    gen = torch.Generator().manual_seed(0)
    rows = [check(kind, torch.bfloat16, t, gen) for kind in ("mlp", "linear") for t in TOKENS]
    rows += [check(kind, torch.float32, t, gen) for kind in ("mlp", "linear") for t in (1, 256)]
    print("scoring, Qwen3-8B shapes; GPU ms of one call replayed from a CUDA graph (same weights: "
          "L2-resident); |d| = max abs diff vs the float32 twin on the same inputs")  # fmt: skip
    print(f"{'kind':>6} {'dtype':>8} {'tokens':>6} {'path':>6} {'triton ms':>9} {'torch ms':>9} "
          f"{'triton |d|':>10} {'torch |d|':>10} {'keep !=':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['kind']:>6} {r['dtype']:>8} {r['tokens']:>6} {r['path']:>6} {r['triton_ms']:9.4f} "
              f"{r['torch_ms']:9.4f} {r['triton_max_abs_diff']:10.2e} {r['torch_max_abs_diff']:10.2e} "
              f"{r['keep_mismatch']:8.5f}")  # fmt: skip
    sweep = tile_sweep(gen)
    print("\nMLP kernel tiles (bf16), GPU ms; * = _launch_config's choice")
    for r in sweep:
        mark = " *" if r["chosen"] else ""
        print(f"  T={r['tokens']:>5} {r['block_t']:>3}x{r['block_n']:<3} {r['ms']:8.4f}{mark}")
    shares = [decode_share(kind, gen) for kind in ("mlp", "linear")]
    plain = shares[0]
    print(f"\nscoring share of a Qwen3-8B decode step at batch {DECODE_BATCH} ({LAYERS} layers in "
          f"one CUDA graph, each its own weights). Plain step assumed memory-bound: "
          f"{WEIGHT_BYTES / 1e9:.1f} GB of bf16 weights at {HBM_BYTES_PER_S / 1e12:.1f} TB/s = "
          f"{plain['plain_step_ms_weights_only']:.2f} ms; with KV reads of {CONTEXT} tokens per "
          f"sequence ({KV_BYTES_PER_TOKEN // 1024} KiB per token) {plain['plain_step_ms_with_kv']:.2f} "
          "ms. Target <= 2%.")  # fmt: skip
    for r in shares:
        print(f"  {r['kind']:>6}: {r['scoring_ms']:.3f} ms = {100 * r['share_weights_only']:.2f}% "
              f"(weights only), {100 * r['share_with_kv']:.2f}% (with KV)")  # fmt: skip
    scores_ok = all(r["triton_max_abs_diff"] <= MAX_SCORE_DIFF for r in rows)
    print(f"Triton scores within {MAX_SCORE_DIFF} of the twin: {scores_ok}")
    pages = check_page_table()
    print(f"\npage table on CUDA equals CPU: {pages['equal_to_cpu']} {pages['mismatches'] or ''}")
    print("Qwen3-8B shape, one decoding step: batch, plan ms, per layer: writes ms, block table ms")
    for t in pages["qwen3_8b_decode_step"]:
        print(f"  {t['batch']:>5} {t['plan_ms']:8.3f} {t['write_ms_per_layer']:8.3f} "
              f"{t['block_table_ms_per_layer']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report.save_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                "rows": rows, "tile_sweep": sweep, "decode_share": shares,
                                "page_table": pages})  # fmt: skip
    print(f"wrote {args.out}")
    return 0 if pages["equal_to_cpu"] and scores_ok else 1


if __name__ == "__main__":
    sys.exit(main())
