"""The project's GPU code without vLLM: the Triton scoring kernel against its torch twin, and the
page table on CUDA tensors against the same steps on CPU tensors, with timings.

    python -m benchmarks.gpu_kernel_check [--out benchmarks/results/gpu_kernels.json]

For a machine with an NVIDIA GPU and no vLLM (imports only ``vllm_kvzap.kernels``,
``vllm_kvzap.cache.page_table``, torch and Triton):
- scoring: Qwen3-8B's surrogate shapes (input 4096, 8 KV heads, MLP hidden 512, and the linear
  surrogate), token counts from one decoding step to a long prefill chunk, in bfloat16 and float32
  inputs. For each: the largest score difference and the share of differing keep flags against
  ``score_and_decide_torch`` (float32 math), and the median time of both (CUDA events, after
  warm-up);
- page table (the CUDA path's page state, plain key layout): a batch of requests through a dense
  prompt step and decoding steps (compaction, window, probation, page allocation), every layer's
  K/V and scores written; on CUDA and on CPU from the same inputs, and every step's plan (block
  tables, lengths, write slots) and the final pages, state and KV contents must be equal; then, at
  Qwen3-8B's shape (36 layers, 8 KV heads of 128, pages of 16) on CUDA only, the time of a decoding
  step's plan and of one layer's writes, per batch size.
Exits at once with a message when no GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vllm_kvzap.kernels.surrogate_score import score_and_decide_torch, score_and_decide_triton

D, H, N = 4096, 8, 512  # Qwen3-8B: hidden size, KV heads, MLP hidden width of NVIDIA's surrogates
TOKENS = (1, 64, 512, 4096, 16384)
THRESHOLD = -4.0


def timed(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check(kind: str, dtype: torch.dtype, tokens: int, gen: torch.Generator) -> dict:
    dev = "cuda"
    x = (torch.randn(tokens, D, generator=gen) * 2).to(dev, dtype)
    if kind == "mlp":
        w1 = (torch.randn(N, D, generator=gen) / D**0.5).to(dev)
        b1 = torch.zeros(N).to(dev)
        w2 = (torch.randn(H, N, generator=gen) / N**0.5).to(dev)
        b2 = torch.full((H,), THRESHOLD).to(dev)
    else:
        w1 = (torch.randn(H, D, generator=gen) / D**0.5).to(dev)
        b1 = torch.full((H,), THRESHOLD).to(dev)
        w2 = b2 = None
    want_s, want_k = score_and_decide_torch(x, w1, b1, w2, b2, THRESHOLD)
    got_s, got_k = score_and_decide_triton(x, w1, b1, w2, b2, THRESHOLD)
    torch.cuda.synchronize()
    return {
        "kind": kind, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
        "max_abs_diff": float((got_s - want_s).abs().max()),
        "keep_mismatch": float((got_k != want_k).float().mean()),
        "triton_ms": timed(lambda: score_and_decide_triton(x, w1, b1, w2, b2, THRESHOLD)),
        "torch_ms": timed(lambda: score_and_decide_torch(x, w1, b1, w2, b2, THRESHOLD)),
    }  # fmt: skip


def drive_table(device, L, H, D, bs, prompt_lens, steps, window, seed, time_steps=False):
    """Requests through one dense prompt step and `steps` decoding steps on a fresh page table;
    returns the plans (on CPU), the final table, and (time_steps) the decoding steps' plan and
    per-layer write times in ms."""
    from vllm_kvzap.cache.page_table import PageTable, StepRows

    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    longest = max(prompt_lens) + steps + 1
    num_blocks = 2 + sum(-(-(n + steps + 1) // bs) for n in prompt_lens)
    buf = torch.zeros(L, num_blocks, H, bs, 2 * D, dtype=torch.bfloat16, device=device)
    table = PageTable([buf[i] for i in range(L)], window, 0.0, B, longest, key_layout="plain")
    keys = torch.arange(1, B + 1)
    computed = torch.zeros(B, dtype=torch.int64)
    plans, plan_ms, write_ms = [], [], []
    for step in range(steps + 1):
        qlens = torch.tensor(prompt_lens) if step == 0 else torch.ones(B, dtype=torch.int64)
        qsl = torch.zeros(B + 1, dtype=torch.int64)
        qsl[1:] = qlens.cumsum(0)
        rows = StepRows(keys=keys.to(device), num_computed=computed.clone(), query_lens=qlens,
                        is_prefilling=torch.full((B,), step == 0), query_start_loc=qsl)  # fmt: skip
        T = int(qsl[-1])
        inputs = [(torch.randn(T, H, D, generator=g).to(device, torch.bfloat16),
                   torch.randn(T, H, D, generator=g).to(device, torch.bfloat16),
                   torch.randn(T, H, generator=g).to(device)) for _ in range(L)]  # fmt: skip
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        plan = table.plan(rows)
        if device != "cpu":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        for layer, (k, v, scores) in enumerate(inputs):
            table.write_layer(plan, layer, k, v, scores, None)
        if device != "cpu":
            torch.cuda.synchronize()
        if step > 1:  # decoding steps after the compaction
            plan_ms.append(1000 * (t1 - t0))
            write_ms.append(1000 * (time.perf_counter() - t1) / L)
        if not time_steps:
            fields = ("block_tables", "seq_lens", "row_query_start_loc", "write_slots")
            plans.append({f: getattr(plan, f).cpu() for f in fields})
        computed += qlens
    return plans, table, plan_ms, write_ms


def check_page_table() -> dict:
    """The CUDA page table equals the CPU one step by step; then timings at Qwen3-8B's shape."""
    shape = dict(L=4, H=3, D=64, bs=16, prompt_lens=[5, 40, 130, 257], steps=40, window=16, seed=0)
    cpu_plans, cpu_table, _, _ = drive_table("cpu", **shape)
    gpu_plans, gpu_table, _, _ = drive_table("cuda", **shape)
    mismatches = [
        f"step {i} {f}" for i, (a, b) in enumerate(zip(cpu_plans, gpu_plans))
        for f in a if not torch.equal(a[f], b[f])
    ]  # fmt: skip
    for name in ("pages", "state", "slot_scores", "kv_pages", "free_pages"):
        if not torch.equal(getattr(cpu_table, name), getattr(gpu_table, name).cpu()):
            mismatches.append(f"final {name}")
    timings = []
    for batch in (16, 64, 256):
        _, _, plan_ms, write_ms = drive_table(
            "cuda", L=36, H=8, D=128, bs=16, prompt_lens=[512] * batch, steps=12, window=128,
            seed=1, time_steps=True,
        )  # fmt: skip
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        timings.append(dict(batch=batch, plan_ms=med(plan_ms), write_ms_per_layer=med(write_ms)))
    return dict(equal_to_cpu=not mismatches, mismatches=mismatches[:20], shape=shape,
                qwen3_8b_decode_step=timings)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_kernels.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernel_check needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    gen = torch.Generator().manual_seed(0)
    rows = [check(kind, dtype, t, gen) for kind in ("mlp", "linear")
            for dtype in (torch.bfloat16, torch.float32) for t in TOKENS]  # fmt: skip
    head = f"{'kind':>6} {'dtype':>8} {'tokens':>6} {'max |d|':>9} {'keep !=':>8} {'triton ms':>9} {'torch ms':>9}"
    print(head)
    for r in rows:
        print(f"{r['kind']:>6} {r['dtype']:>8} {r['tokens']:>6} {r['max_abs_diff']:9.2e} "
              f"{r['keep_mismatch']:8.5f} {r['triton_ms']:9.3f} {r['torch_ms']:9.3f}")  # fmt: skip
    pages = check_page_table()
    print(f"\npage table on CUDA equals CPU: {pages['equal_to_cpu']} {pages['mismatches'] or ''}")
    print("Qwen3-8B shape, one decoding step: batch, plan ms, writes ms per layer")
    for t in pages["qwen3_8b_decode_step"]:
        print(f"  {t['batch']:>5} {t['plan_ms']:8.3f} {t['write_ms_per_layer']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "rows": rows, "page_table": pages}, indent=1) + "\n")  # fmt: skip
    print(f"wrote {args.out}")
    return 0 if pages["equal_to_cpu"] else 1


if __name__ == "__main__":
    sys.exit(main())
