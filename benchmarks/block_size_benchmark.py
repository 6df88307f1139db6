"""Which page size serves memory best: concurrency of the plugin per block size, vs plain vLLM.

KV-bound workload at vLLM's defaults otherwise (window 128, prompts of a few hundred tokens, 64
output tokens, greedy, `ignore_eos`) on the tiny model, a fixed KV budget in which plain vLLM
(its own default block size) holds ~8 requests. For each block size the plugin runs at thresholds
calibrated to pruned fractions of ~0.5 and ~0.72 (calibrated on the workload's own prompts with
the surrogate, offline); the figure of merit is

    ratio = (mean running requests, plugin / plain vLLM) / (1 / (1 - p))

over the steps where requests wait for memory, with p the pruned fraction the plugin measured:
1.0 means memory follows the kept pairs exactly. Concurrency does not depend on speed, so the tiny
model is enough. In-process engines (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that the scheduler's
running and waiting queues can be read after every step.

    python -m benchmarks.block_size_benchmark [--block-sizes 16,32,64,128] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks import harness, report

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN, WINDOW = 64, 320, 64, 128
PLAIN_CONCURRENT = 8  # the KV budget, in full requests of plain vLLM


def calibrate(paths, prompts, fractions) -> list[float]:
    """Thresholds pruning about each fraction of the pairs (only tokens older than the window at
    the end of a request are judged: the fraction is over all its pairs)."""
    scores = harness.collect_scores(paths["model"], {"mlp": paths["mlp"]}, prompts[:4])["mlp"]
    total = PROMPT_LEN + OUTPUT_LEN - 1
    judged_share = (total - WINDOW) / total
    return [harness.quantile_threshold(scores.double(), f, judged_share) for f in fractions]


def run(paths, prompts, kv_bytes, block_size=None, threshold=None, stats_path=None) -> dict:
    kwargs = dict(model=str(paths["model"]), dtype="float32", kv_cache_memory_bytes=kv_bytes,
                  max_model_len=PROMPT_LEN + OUTPUT_LEN, distributed_executor_backend="uni", seed=0)
    if threshold is not None:
        pruning = harness.kvzap(paths["mlp"], WINDOW, threshold, stats_path)
        kwargs.update(block_size=block_size, additional_config={"kv_pruning": pruning})
    with harness.engine(**kwargs) as llm:
        engine = llm.llm_engine
        scheduler = engine.engine_core.engine_core.scheduler
        bound = []  # running requests in steps where others wait for memory

        def on_step(_):
            if len(scheduler.waiting):
                bound.append(len(scheduler.running))

        harness.drive(llm, prompts, [OUTPUT_LEN] * len(prompts), on_step=on_step)
        result = dict(block_size=engine.vllm_config.cache_config.block_size,
                      mean_running=sum(bound) / max(len(bound), 1), bound_steps=len(bound))
        if threshold is not None:
            from vllm_kvzap.stats import wait_for_stats

            for _ in range(3):  # finished requests are reported one step later
                engine.step()
            stats = wait_for_stats(stats_path, len(prompts))
            result["pruned_fraction"] = sum(s["pruned_fraction"] for s in stats) / len(stats)
        return result


def plot(rows: list[dict], path: Path) -> None:
    plt = report.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for target in sorted({r["target"] for r in rows}):
        pts = [r for r in rows if r["target"] == target]
        p = sum(r["pruned_fraction"] for r in pts) / len(pts)
        ax.plot([r["block_size"] for r in pts], [r["ratio"] for r in pts], "o-", label=f"p = {p:.2f}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (slots per page)")
    ax.set_ylabel("concurrency gain / (1 / (1 - p))")
    ax.legend()
    report.save_figure(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-sizes", default="16,32,64,128")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    from tools.make_tiny_model import make_tiny_model

    paths = make_tiny_model(Path(".cache/tiny"), seed=0)
    prompts = harness.make_prompts(NUM_REQUESTS, PROMPT_LEN, seed=0)
    pair_bytes = harness.kv_bytes_per_token(harness.model_shape(paths["model"]), "float32")
    kv_bytes = PLAIN_CONCURRENT * (PROMPT_LEN + OUTPUT_LEN + 128) * pair_bytes
    fractions = (0.5, 0.72)
    thresholds = calibrate(paths, prompts, fractions)
    plain = run(paths, prompts, kv_bytes)
    rows = []
    print(f"plain vLLM (block {plain['block_size']}): {plain['mean_running']:.2f} running while "
          f"others wait")  # fmt: skip
    print(f"{'block':>6} {'target':>7} {'pruned':>7} {'mean run':>9} {'gain':>6} {'1/(1-p)':>8} "
          f"{'ratio':>6}")  # fmt: skip
    for bs in (int(b) for b in args.block_sizes.split(",")):
        for target, thr in zip(fractions, thresholds):
            stats_path = args.out / f".block_size_stats_{bs}_{target}.jsonl"
            stats_path.unlink(missing_ok=True)
            r = run(paths, prompts, kv_bytes, bs, thr, stats_path)
            stats_path.unlink(missing_ok=True)
            p = r["pruned_fraction"]
            gain = r["mean_running"] / plain["mean_running"]
            r.update(target=target, threshold=thr, gain=gain, ratio=gain * (1 - p))
            rows.append(r)
            print(f"{bs:>6} {target:>7} {p:>7.3f} {r['mean_running']:>9.2f} {gain:>6.2f} "
                  f"{1 / (1 - p):>8.2f} {r['ratio']:>6.2f}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "block_size.json"
    report.save_json(out, dict(plain=plain, plugin=rows, workload=dict(
        requests=NUM_REQUESTS, prompt=PROMPT_LEN, output=OUTPUT_LEN, window=WINDOW,
        kv_bytes=kv_bytes)))  # fmt: skip
    plot(rows, args.out / "block_size.png")
    print(f"saved {out} and {args.out / 'block_size.png'}")


if __name__ == "__main__":
    main()
