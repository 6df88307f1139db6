"""More requests in the same KV memory: plain vLLM vs vllm-kvzap (paged mode), same run, same machine.

A KV-memory-bound workload (long prompts, long outputs, a fixed `kv_cache_memory_bytes`) on the
tiny model, through the public surface only: `LLM`, `LLMEngine.step`, `LLM.get_metrics` (running
requests, preemptions) and the plugin's statistics lines (pruned fraction, resident KV). Thresholds
are calibrated on the surrogate's scores of the workload's own prompts to pruned fractions of about
0.5 and 0.72. Prints a side-by-side table and saves JSON and a plot.

    python -m benchmarks.concurrency_benchmark [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

TARGET_FRACTIONS = (0.5, 0.72)


def make_prompts(num: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 900, (length,), generator=g).tolist() for _ in range(num)]


def calibrate_thresholds(model_dir: Path, surrogate_dir: Path, prompts, fractions, window, total_len):
    """Thresholds whose pruned fraction, with the window never pruned, is about each target."""
    from transformers import AutoModelForCausalLM

    from tools.make_tiny_model import capture_attention_inputs
    from vllm_kvzap.scorers import load_surrogate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    surrogate = load_surrogate(surrogate_dir)
    scores = []
    for prompt in prompts[:4]:
        inputs = capture_attention_inputs(model, torch.tensor([prompt]))
        for layer_idx, x in enumerate(inputs):
            scores.append(surrogate.score(x.reshape(-1, x.shape[-1]), layer_idx).reshape(-1))
    scores = torch.cat(scores)
    judged_share = max(1e-6, (total_len - window) / total_len)
    return [float(torch.quantile(scores, min(0.99, f / judged_share))) for f in fractions]


def metric_value(llm, name: str) -> float:
    for m in llm.get_metrics():
        if m.name == name:
            return float(getattr(m, "value", 0) or 0)
    return 0.0


def run_config(args, paths, prompts, label: str, pruning: dict | None, stats_path: Path) -> dict:
    from vllm import LLM, SamplingParams

    additional = {}
    if pruning is not None:
        stats_path.unlink(missing_ok=True)
        additional = {"kv_pruning": {**pruning, "stats_path": str(stats_path)}}
    llm = LLM(
        model=str(paths["model"]),
        dtype="float32",
        max_model_len=args.prompt_len + args.output_len + 64,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_bytes,
        max_num_seqs=256,
        max_num_batched_tokens=max(2048, args.prompt_len),
        enable_prefix_caching=False,
        disable_log_stats=False,
        seed=0,
        additional_config=additional,
    )
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    peak_running, steps, output_tokens = 0, 0, 0
    bound_running = []  # running requests at steps where others wait: the memory-bound regime
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                output_tokens += len(out.outputs[0].token_ids)
        steps += 1
        running = int(metric_value(llm, "vllm:num_requests_running"))
        peak_running = max(peak_running, running)
        if metric_value(llm, "vllm:num_requests_waiting") > 0:
            bound_running.append(running)
    elapsed = time.perf_counter() - start
    preemptions = int(metric_value(llm, "vllm:num_preemptions"))
    result = {
        "config": label,
        "threshold": None if pruning is None else pruning["threshold"],
        "peak_running": peak_running,
        "mean_running_while_waiting": sum(bound_running) / max(len(bound_running), 1),
        "preemptions": preemptions,
        "output_tokens_per_s": output_tokens / elapsed,
        "elapsed_s": elapsed,
        "steps": steps,
    }
    llm.llm_engine.engine_core.shutdown()
    del llm, engine
    gc.collect()
    if pruning is not None:
        from vllm_kvzap.stats import wait_for_stats

        stats = wait_for_stats(stats_path, len(prompts))
        n = len(stats)
        result.update(
            pruned_fraction=sum(s["pruned_fraction"] for s in stats) / n,
            resident_kv_kib_end=sum(s["resident_kv_bytes_end"] for s in stats) / n / 1024,
            resident_kv_kib_peak=sum(s["resident_kv_bytes_peak"] for s in stats) / n / 1024,
            dense_kv_kib=sum(s["dense_kv_bytes"] for s in stats) / n / 1024,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller workload (CI-sized)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--model-dir", default=".cache/tiny")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--baseline-capacity", type=int, default=6,
                        help="full-length requests plain vLLM can hold at once (sets the budget)")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.prompt_len, args.output_len = 16, 256, 256
        args.baseline_capacity = 4

    from tools.make_tiny_model import make_tiny_model

    paths = make_tiny_model(Path(args.model_dir))
    config = json.loads((paths["model"] / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    block_bytes = layers * kv_heads * args.block_size * 2 * head_dim * 4
    blocks_per_request = -(-(args.prompt_len + args.output_len) // args.block_size)
    args.kv_bytes = (args.baseline_capacity * blocks_per_request + 1) * block_bytes

    prompts = make_prompts(args.num_requests, args.prompt_len)
    total_len = args.prompt_len + args.output_len
    thresholds = calibrate_thresholds(
        paths["model"], paths["mlp"], prompts, TARGET_FRACTIONS, args.window, total_len
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [run_config(args, paths, prompts, "plain vLLM", None, out_dir / "unused.jsonl")]
    for target, tau in zip(TARGET_FRACTIONS, thresholds):
        pruning = {"method": "kvzap-mlp", "threshold": tau, "window": args.window,
                   "surrogate": str(paths["mlp"])}  # fmt: skip
        label = f"kvzap-mlp p~{target}"
        results.append(run_config(args, paths, prompts, label, pruning, out_dir / "stats.jsonl"))
    base = results[0]
    for r in results[1:]:
        gain = r["mean_running_while_waiting"] / max(base["mean_running_while_waiting"], 1e-9)
        ideal = 1 / (1 - r["pruned_fraction"])
        r.update(concurrency_gain=gain, ideal_gain=ideal, gain_ratio=gain / ideal)

    print_table(results, args)
    name = "concurrency_quick" if args.quick else "concurrency"
    (out_dir / f"{name}.json").write_text(
        json.dumps({"workload": vars(args), "results": results}, indent=2)
    )
    plot(results, out_dir / f"{name}.png")
    print(f"saved {out_dir / (name + '.json')} and {out_dir / (name + '.png')}")


def print_table(results: list[dict], args) -> None:
    print(
        f"\n{args.num_requests} requests x ({args.prompt_len} prompt + {args.output_len} output) "
        f"tokens, KV budget {args.kv_bytes / 2**20:.1f} MiB, window {args.window}, "
        f"block {args.block_size}"
    )
    columns = [  # (header, key, format)
        ("config", "config", "{:<18}"),
        ("pruned", "pruned_fraction", "{:>8.3f}"),
        ("peak run", "peak_running", "{:>10}"),
        ("mean run*", "mean_running_while_waiting", "{:>10.1f}"),
        ("preempt", "preemptions", "{:>9}"),
        ("out tok/s", "output_tokens_per_s", "{:>11.1f}"),
        ("KV/req KiB", "resident_kv_kib_end", "{:>12.0f}"),
        ("dense KiB", "dense_kv_kib", "{:>11.0f}"),
        ("gain", "concurrency_gain", "{:>7.2f}"),
        ("1/(1-p)", "ideal_gain", "{:>9.2f}"),
        ("ratio", "gain_ratio", "{:>7.2f}"),
    ]
    print("mean run*: running requests averaged over the steps where others wait for memory; "
          "gain = its ratio to plain vLLM's")
    widths = [len(fmt.format(0 if "f}" in fmt else "")) for _, _, fmt in columns]
    print("".join(h.rjust(w) if i else h.ljust(w) for i, ((h, _, _), w) in enumerate(zip(columns, widths))))
    for r in results:
        cells = []
        for (_, key, fmt), width in zip(columns, widths):
            cells.append(fmt.format(r[key]) if key in r else "-".rjust(width))
        print("".join(cells))


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    labels = [r["config"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(labels, [r["mean_running_while_waiting"] for r in results], color="tab:blue")
    axes[0].set_title("concurrent requests (memory-bound)")
    axes[1].bar(labels, [r["output_tokens_per_s"] for r in results], color="tab:green")
    axes[1].set_title("output tokens / s")
    pruned = results[1:]
    axes[2].bar([r["config"] for r in pruned], [r["concurrency_gain"] for r in pruned],
                label="achieved", color="tab:orange")  # fmt: skip
    axes[2].plot([r["config"] for r in pruned], [r["ideal_gain"] for r in pruned], "k_",
                 markersize=30, label="1/(1-p)")  # fmt: skip
    axes[2].set_title("concurrency gain vs plain vLLM")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    main()
