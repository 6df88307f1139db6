"""The page table's own cost per decoding step, outside the engine: `PageTable.plan`, every
layer's `write_layer` and `reports`, on a model shape, with scores drawn so that a chosen fraction
of the pairs leaving the window is kept.

No vLLM engine runs: a KV buffer in the plugin's page layout (`page_cell`) is allocated directly,
`--requests` prompts are prefilled in chunks, then decoding steps are timed (mean over `--steps`
after warm-up). What an engine adds around it (metadata builders, the connector, the block
manager, the model) is not here: `throughput_benchmark.py` profiles that in-engine.

    python -m benchmarks.page_table_microbenchmark [--shape smollm2|tiny] [--requests 32]
        [--kept 0.27] [--threads 1] [--steps 50]

Prints ms per step (plan + writes + reports, and plan + reports alone) and the number of
top-level tensor ops in one plan + reports (the fixed cost a small model feels).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.profiling import top_level_ops
from vllm_kvzap.cache.page_pool import page_cell
from vllm_kvzap.cache.page_table import PageTable
from vllm_kvzap.cache.step_plan import StepRows

# (layers, KV heads, head size, dtype)
SHAPES = {
    "smollm2": (30, 3, 64, torch.bfloat16),  # SmolLM2-135M
    "tiny": (4, 2, 32, torch.float32),  # the test model (`tools.make_tiny_model`)
}
BLOCK_SIZE, WINDOW, PROMPT, CHUNK = 16, 128, 512, 128
SCORE_MEAN = -3.5  # scores ~ N(-3.5, 1); the threshold follows from --kept


def rows(keys: torch.Tensor, computed: int, query_len: int, prefill: bool) -> StepRows:
    B = keys.numel()
    qsl = torch.zeros(B + 1, dtype=torch.int64)
    qsl[1:] = torch.full((B,), query_len).cumsum(0)
    return StepRows(
        req_keys=keys,
        num_computed=torch.full((B,), computed),
        query_lens=torch.full((B,), query_len),
        is_prefilling=torch.full((B,), prefill),
        query_start_loc=qsl,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--kept", type=float, default=0.27, help="share of leaving pairs kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    L, H, D, dtype = SHAPES[args.shape]
    B = args.requests
    threshold = SCORE_MEAN + torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - args.kept))
    tokens = PROMPT + WINDOW + 10 + 2 * args.steps + 1  # the most a request reaches
    pages_needed = L * H * B * (tokens // BLOCK_SIZE + 2)
    num_blocks = pages_needed // (L * H) + 2
    buf = torch.zeros(L, num_blocks, H, BLOCK_SIZE, page_cell(D, dtype), dtype=dtype)
    table = PageTable([buf[i] for i in range(L)], WINDOW, float(threshold), B, 4096)
    keys = torch.arange(1, B + 1)
    gen = torch.Generator().manual_seed(0)

    def step(computed: int, query_len: int, prefill: bool, write: bool = True) -> None:
        plan = table.plan(rows(keys, computed, query_len, prefill))
        if write:
            T = B * query_len
            k = torch.randn(T, H, D, generator=gen).to(dtype)
            scores = torch.randn(T, H, generator=gen) + SCORE_MEAN
            for layer in range(L):
                table.write_layer(plan, layer, k, k, scores, "vec16")
        table.finish_step()
        table.reports()

    for c in range(0, PROMPT, CHUNK):
        step(c, CHUNK, True)
    n = PROMPT
    for _ in range(WINDOW + 10):  # past the window: tokens leave it every step
        step(n, 1, False)
        n += 1
    timings = {}
    for label, write in (("plan + writes + reports", True), ("plan + reports", False)):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(n, 1, False, write)
            n += 1
        timings[label] = (time.perf_counter() - t0) / args.steps * 1e3
    ops = top_level_ops(lambda: step(n, 1, False, write=False))
    print(
        f"{args.shape}: {L} layers, {H} KV heads x {D}, {B} decoding requests, "
        f"{args.kept:.2f} of the leaving pairs kept, {args.threads} thread(s)"
    )
    for label, ms in timings.items():
        print(f"  {label:<24} {ms:7.2f} ms per step")
    print(f"  top-level tensor ops in plan + reports: {sum(ops.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
