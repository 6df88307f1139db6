"""The project's Triton scoring kernel compiled for a real GPU, against its torch twin, with timings.

    python -m benchmarks.gpu_kernel_check [--out benchmarks/results/gpu_kernels.json]

For a machine with an NVIDIA GPU and no vLLM (imports only ``vllm_kvzap.kernels``, torch and
Triton): Qwen3-8B's surrogate shapes (input 4096, 8 KV heads, MLP hidden 512, and the linear
surrogate), token counts from one decoding step to a long prefill chunk, in bfloat16 and float32
inputs. For each: the largest score difference and the share of differing keep flags against
``score_and_decide_torch`` (float32 math), and the median time of both (CUDA events, after
warm-up). Exits at once with a message when no GPU is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "rows": rows}, indent=1) + "\n")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
