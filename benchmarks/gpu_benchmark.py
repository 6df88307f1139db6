"""GPU throughput: plain vLLM at its defaults vs vllm-kvzap on a Qwen3-8B-shaped model, same run.

One command on a machine with an NVIDIA GPU (sized for under 8 minutes on one H100/H200: an
estimate from the engine start-ups and token counts; this script has not yet run on a GPU):

    python -m benchmarks.gpu_benchmark [--out benchmarks/results/gpu] [--num-requests 160]
        [--prompt-len 1024] [--output-len 384,512] [--kv-requests 16] [--targets 0.5,0.72]

Without a CUDA GPU (or with vLLM's CPU build) it stops at once with a message, before vLLM loads.

- Model: Qwen3-8B's config.json (36 layers, hidden 4096, 32 query / 8 KV heads of 128) written
  locally, vLLM's `load_format="dummy"` weights in bfloat16, no tokenizer (token-id prompts); a
  random KVzap MLP surrogate in the published shape (4096 -> 512 -> 8 per layer, 36 modules).
- Workload, KV-bound: `num_requests` of `prompt_len` tokens and `output_len` outputs (greedy,
  `ignore_eos`) in a KV budget (`kv_cache_memory_bytes`) of `kv_requests` full-length requests, so
  plain vLLM runs about `kv_requests` at once and the rest wait.
- Engines, one at a time: plain vLLM with nothing set but the model, the budget and the length
  (its defaults: torch.compile, CUDA graphs, async scheduling, its block size); then one plugin
  engine (`kvzap-mlp`, window 128, engine threshold -inf; piecewise CUDA graphs) that serves
  1. calibration: one request per threshold of a grid, in one batch, each with its own
     per-request threshold; the pruned fraction of each from its statistics line; the thresholds
     for the targets interpolated on that measured curve;
  2. the workload at threshold -inf (nothing pruned: the plugin's overhead), then at each
     calibrated threshold (per-request thresholds: one start-up and compile for all levels).
- Reported per config: output tokens/s and its ratio to plain vLLM, peak and mean running
  requests, preemptions, KV per request (resident peak vs dense, from the statistics lines),
  decode step time (ms per step while every request decodes), pruned fraction. Table printed;
  `gpu_benchmark.json` and `gpu_benchmark.png` under `--out`.

Targets (issue 11): >= 2.5x plain vLLM's output tokens/s at p ~0.72, >= 0.95x at threshold -inf.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks import harness, report

WINDOW = 128
CALIBRATION_GRID = [x / 2 for x in range(-20, 5)]  # thresholds -10 .. 2 (scores ~ -4 +- 1.5)
CALIBRATION_OUTPUT = 128


def run_plain(paths, wl, args) -> dict:
    """Plain vLLM at its defaults on the workload (the CPU benchmark's run, `run_config`)."""
    result, _ = harness.run_config(paths, wl, "plain vLLM", None, None, args)
    return result


def run_plugin(
    paths, wl, args, stats_path: Path, grid=CALIBRATION_GRID,
    calibration_output: int = CALIBRATION_OUTPUT, window: int = WINDOW,
) -> tuple[dict, list[dict]]:  # fmt: skip
    """One plugin engine: calibration on the grid, then the workload at -inf and at each target."""
    stats_path.unlink(missing_ok=True)
    pruning = harness.kvzap(paths["mlp"], window, stats_path=stats_path)
    t0 = time.perf_counter()
    with harness.engine(**harness.engine_kwargs(paths, wl, pruning, args)) as llm:
        startup = time.perf_counter() - t0
        engine = harness.describe_engine(llm)
        # 1. calibration: one request per grid threshold, in one batch
        calibration = harness.calibrate_on_grid(llm, wl["prompts"][0], calibration_output, grid,
                                                args.targets, stats_path)  # fmt: skip
        thresholds, lines = calibration["thresholds"], len(grid)
        print(f"calibration ({calibration['wall_s']:.1f} s): thresholds "
              + ", ".join(f"{t:.3f} for p~{p}" for t, p in zip(thresholds, args.targets))
              + "".join(f"; {n}" for n in calibration["notes"]), flush=True)  # fmt: skip
        # 2. the workload at -inf, then at each calibrated threshold
        results = []
        for level, thr in enumerate([float("-inf"), *thresholds]):
            seen = harness.watch_scheduler(llm)
            prefix = f"L{level}-"
            result, _ = harness.drive(llm, wl["prompts"], wl["output_lens"],
                                      extra_args={"kv_pruning": thr}, id_prefix=prefix)  # fmt: skip
            lines += len(wl["prompts"])
            by_id = harness.stats_by_id(stats_path, lines)
            stats = [s for i in range(len(wl["prompts"])) if (s := by_id.get(f"{prefix}{i}"))]
            n = max(len(stats), 1)
            label = "plugin, -inf" if level == 0 else f"plugin, p~{args.targets[level - 1]}"
            results.append(dict(
                config=label, threshold=thr, startup_s=startup, engine_config=engine, **result,
                **harness.running_summary(seen), stats_lines=len(stats),
                pruned_fraction=sum(s["pruned_fraction"] for s in stats) / n,
                resident_kv_kib_peak=sum(s["resident_kv_bytes_peak"] for s in stats) / n / 1024,
                dense_kv_kib=sum(s["dense_kv_bytes"] for s in stats) / n / 1024,
            ))  # fmt: skip
            print(f"{label}: {result['output_tokens_per_s']:.0f} tok/s", flush=True)
    return calibration, results


def print_table(results: list[dict]) -> None:
    plain = results[0]["output_tokens_per_s"]
    head = (f"{'config':<18} {'threshold':>9} {'pruned':>6} {'tok/s':>8} {'x plain':>7} "
            f"{'peak run':>8} {'mean run':>8} {'preempt':>7} {'KV/req MiB':>10} {'dense':>6} "
            f"{'decode ms/step':>14}")  # fmt: skip
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        thr = "" if r["threshold"] is None else f"{r['threshold']:.3f}"
        pruned = "" if "pruned_fraction" not in r else f"{r['pruned_fraction']:.3f}"
        step = r.get("decode_median_ms_per_step")
        print(f"{r['config']:<18} {thr:>9} {pruned:>6} {r['output_tokens_per_s']:>8.0f} "
              f"{r['output_tokens_per_s'] / plain:>7.2f} {r['peak_running']:>8} "
              f"{r['mean_running']:>8.1f} {r['preemptions']:>7} {r['resident_kv_kib_peak'] / 1024:>10.1f} "
              f"{r['dense_kv_kib'] / 1024:>6.1f} {'' if step is None else f'{step:.1f}':>14}")  # fmt: skip


def plot(results: list[dict], path: Path, title: str) -> None:
    plt = report.pyplot()
    if plt is None:
        return
    labels = [r["config"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [("output_tokens_per_s", "output tokens/s"), ("mean_running", "mean running requests"),
              ("resident_kv_kib_peak", "KV per request, peak (KiB)")]  # fmt: skip
    for ax, (key, name) in zip(axes, panels):
        ax.bar(labels, [r[key] for r in results], color=["grey"] + ["tab:green"] * (len(labels) - 1))
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    report.save_figure(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--model-dir", default=".cache/bench/qwen3-8b-shape")
    parser.add_argument("--num-requests", type=int, default=160)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", default="384,512", help="min,max output tokens")
    parser.add_argument("--kv-requests", type=int, default=16,
                        help="KV budget in full-length requests (plain vLLM's concurrency)")
    parser.add_argument("--targets", default="0.5,0.72", help="pruned-fraction targets")
    args = parser.parse_args()
    harness.require_gpu("gpu_benchmark")
    harness.require_cuda_vllm("gpu_benchmark")
    args.targets = [float(t) for t in args.targets.split(",") if t.strip()]
    lo, hi = (int(x) for x in args.output_len.split(","))
    config = harness.QWEN3_8B_CONFIG
    paths = harness.make_shape(config, Path(args.model_dir), harness.QWEN3_8B_SURROGATE_HIDDEN)
    bytes_per_token = harness.kv_bytes_per_token(harness.config_shape(config), "bfloat16")
    max_model_len = args.prompt_len + hi + 16
    wl = dict(
        prompts=harness.make_prompts(args.num_requests, args.prompt_len, seed=0),
        output_lens=harness.make_output_lens(args.num_requests, (lo, hi), seed=0),
        max_model_len=max_model_len, bytes_per_token=bytes_per_token,
        kv_bytes=args.kv_requests * (max_model_len + harness.SLACK_TOKENS) * bytes_per_token,
    )  # fmt: skip
    engine_args = SimpleNamespace(dtype="bfloat16", load_format="dummy", plugin_block_size=None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"KV-bound workload: {args.num_requests} x ({args.prompt_len} prompt + {lo}..{hi} "
          f"output), KV budget {wl['kv_bytes'] / 2**30:.2f} GiB = {args.kv_requests} full "
          f"requests", flush=True)  # fmt: skip
    import torch
    import vllm

    data = dict(
        device=torch.cuda.get_device_name(0), vllm=vllm.__version__, torch=torch.__version__,
        command=" ".join(sys.argv), model="Qwen3-8B shape, dummy",
        workload=dict(num_requests=args.num_requests, prompt_len=args.prompt_len,
                      output_len=[lo, hi], kv_requests=args.kv_requests, window=WINDOW,
                      kv_bytes=wl["kv_bytes"]),
    )  # fmt: skip
    json_path = out / "gpu_benchmark.json"

    def save(**parts) -> None:  # after each engine, so a later failure keeps what was measured
        data.update(parts, wall_s=time.perf_counter() - t0)
        report.save_json(json_path, data, indent=2)

    plain = run_plain(paths, wl, engine_args)
    print(f"plain vLLM: {plain['output_tokens_per_s']:.0f} tok/s", flush=True)
    save(results=[plain])
    calibration, plugin = run_plugin(paths, wl, engine_args, out / "gpu_benchmark_stats.jsonl")
    results = [plain, *plugin]
    save(calibration=calibration, results=results)
    print_table(results)
    plot(results, out / "gpu_benchmark.png",
         f"{data['device']}: Qwen3-8B shape, KV-bound ({args.num_requests} requests)")
    print(f"\nwrote {json_path} and {out / 'gpu_benchmark.png'} ({data['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
