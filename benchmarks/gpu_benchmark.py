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
import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

QWEN3_8B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
    "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "max_window_layers": 36, "rope_theta": 1000000,
    "rope_scaling": None, "rms_norm_eps": 1e-6, "attention_bias": False, "attention_dropout": 0.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None,
    "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16", "use_cache": True,
}  # fmt: skip
SURROGATE_HIDDEN = 512  # NVIDIA's KVzap-mlp-Qwen3-8B
WINDOW = 128
CALIBRATION_GRID = [x / 2 for x in range(-20, 5)]  # thresholds -10 .. 2 (scores ~ -4 +- 1.5)
CALIBRATION_OUTPUT = 128
SLACK_TOKENS = 128


def require_gpu() -> None:
    """Exit with a clear message unless torch sees a CUDA GPU (before vLLM is imported)."""
    try:
        import torch
    except ImportError:
        sys.exit("gpu_benchmark: torch is not installed; run `bash tools/setup_env.sh` first")
    if not torch.cuda.is_available():
        sys.exit(
            "gpu_benchmark needs an NVIDIA GPU with CUDA: torch.cuda.is_available() is False on "
            "this machine (for CPU numbers run `python -m benchmarks.throughput_benchmark`)"
        )


def interpolate_thresholds(grid: list[float], fractions: list[float], targets: list[float]):
    """Thresholds whose pruned fraction is each target, linearly between measured grid points
    (the measured curve made non-decreasing first); a target outside the measured range gets the
    nearest end and a note."""
    import numpy as np

    t = np.asarray(grid, dtype=float)
    f = np.maximum.accumulate(np.asarray(fractions, dtype=float))
    out, notes = [], []
    for p in targets:
        if p < f[0] or p > f[-1]:
            notes.append(f"target {p} outside the measured {f[0]:.3f}..{f[-1]:.3f}")
        # the first grid point reaching p, and the one before it
        i = int(np.searchsorted(f, p, side="left"))
        if i == 0:
            out.append(float(t[0]))
        elif i >= len(f):
            out.append(float(t[-1]))
        else:
            lo, hi = f[i - 1], f[i]
            w = 0.0 if hi == lo else (p - lo) / (hi - lo)
            out.append(float(t[i - 1] + w * (t[i] - t[i - 1])))
    return out, notes


def run_plain(paths, wl, args) -> dict:
    """Plain vLLM at its defaults on the workload (the CPU benchmark's run, `run_config`)."""
    from benchmarks import throughput_benchmark as tb

    result, _ = tb.run_config(paths, wl, "plain vLLM", None, None, args)
    return result


def running(seen: dict) -> dict:
    r = seen["running"]
    return dict(peak_running=max(r, default=0), mean_running=sum(r) / max(len(r), 1),
                preemptions=seen["preempted"])  # fmt: skip


def run_plugin(
    paths, wl, args, stats_path: Path, grid=CALIBRATION_GRID,
    calibration_output: int = CALIBRATION_OUTPUT, window: int = WINDOW,
) -> tuple[dict, list[dict]]:  # fmt: skip
    """One plugin engine: calibration on the grid, then the workload at -inf and at each target."""
    from vllm import LLM, SamplingParams

    from benchmarks import throughput_benchmark as tb
    from vllm_kvzap.stats import wait_for_stats

    stats_path.unlink(missing_ok=True)
    pruning = {"method": "kvzap-mlp", "threshold": float("-inf"), "window": window,
               "surrogate": str(paths["mlp"]), "stats_path": str(stats_path)}  # fmt: skip
    t0 = time.perf_counter()
    llm = LLM(**tb.engine_kwargs(paths, wl, pruning, args))
    startup = time.perf_counter() - t0
    lines = 0

    def stats_of(prefix: str, n: int) -> list[dict]:
        nonlocal lines
        lines += n
        by_id = {s["request_id"]: s for s in wait_for_stats(stats_path, lines, timeout_s=120)}
        return [by_id.get(f"{prefix}{i}") for i in range(n)]

    try:
        engine = tb.describe_engine(llm)
        # 1. calibration: one request per grid threshold, in one batch
        prompt = wl["prompts"][0]
        t1 = time.perf_counter()
        for i, thr in enumerate(grid):
            params = SamplingParams(max_tokens=calibration_output, temperature=0.0,
                                    ignore_eos=True, extra_args={"kv_pruning": thr})  # fmt: skip
            llm.llm_engine.add_request(f"calib{i}", {"prompt_token_ids": prompt}, params)
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
        calib = stats_of("calib", len(grid))
        missing = [grid[i] for i, s in enumerate(calib) if s is None]
        if missing:
            raise RuntimeError(f"no statistics line for the calibration requests at {missing}")
        fractions = [s["pruned_fraction"] for s in calib]
        thresholds, notes = interpolate_thresholds(grid, fractions, args.targets)
        calibration = dict(grid=grid, fractions=fractions, thresholds=thresholds, notes=notes,
                           wall_s=time.perf_counter() - t1)  # fmt: skip
        print(f"calibration ({calibration['wall_s']:.1f} s): thresholds "
              + ", ".join(f"{t:.3f} for p~{p}" for t, p in zip(thresholds, args.targets))
              + "".join(f"; {n}" for n in notes), flush=True)  # fmt: skip
        # 2. the workload at -inf, then at each calibrated threshold
        results = []
        for level, thr in enumerate([float("-inf"), *thresholds]):
            seen = tb.watch_scheduler(llm)
            prefix = f"L{level}-"
            result, _ = tb.drive(llm, wl["prompts"], wl["output_lens"],
                                 extra_args={"kv_pruning": thr}, id_prefix=prefix)  # fmt: skip
            stats = [s for s in stats_of(prefix, len(wl["prompts"])) if s]
            n = max(len(stats), 1)
            label = "plugin, -inf" if level == 0 else f"plugin, p~{args.targets[level - 1]}"
            results.append(dict(
                config=label, threshold=thr, startup_s=startup, engine_config=engine, **result,
                **running(seen), stats_lines=len(stats),
                pruned_fraction=sum(s["pruned_fraction"] for s in stats) / n,
                resident_kv_kib_peak=sum(s["resident_kv_bytes_peak"] for s in stats) / n / 1024,
                dense_kv_kib=sum(s["dense_kv_bytes"] for s in stats) / n / 1024,
            ))  # fmt: skip
            print(f"{label}: {result['output_tokens_per_s']:.0f} tok/s", flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["config"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [("output_tokens_per_s", "output tokens/s"), ("mean_running", "mean running requests"),
              ("resident_kv_kib_peak", "KV per request, peak (KiB)")]  # fmt: skip
    for ax, (key, name) in zip(axes, panels):
        ax.bar(labels, [r[key] for r in results], color=["grey"] + ["tab:green"] * (len(labels) - 1))
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    require_gpu()

    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        sys.exit(f"gpu_benchmark: vLLM runs on {current_platform.device_name}, not CUDA (the CPU "
                 "build is installed?): `bash tools/setup_env.sh` installs vllm==0.32.0 on a GPU")  # fmt: skip

    from benchmarks import throughput_benchmark as tb

    args.targets = [float(t) for t in args.targets.split(",") if t.strip()]
    lo, hi = (int(x) for x in args.output_len.split(","))
    paths = tb.make_shape(QWEN3_8B_CONFIG, Path(args.model_dir), SURROGATE_HIDDEN)
    c = QWEN3_8B_CONFIG
    bytes_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2
    max_model_len = args.prompt_len + hi + 16
    wl = dict(
        prompts=tb.make_prompts(args.num_requests, args.prompt_len, seed=0),
        output_lens=tb.make_output_lens(args.num_requests, (lo, hi), seed=0),
        max_model_len=max_model_len, bytes_per_token=bytes_per_token,
        kv_bytes=args.kv_requests * (max_model_len + SLACK_TOKENS) * bytes_per_token,
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

    report = dict(
        device=torch.cuda.get_device_name(0), vllm=vllm.__version__, torch=torch.__version__,
        command=" ".join(sys.argv), model="Qwen3-8B shape, dummy",
        workload=dict(num_requests=args.num_requests, prompt_len=args.prompt_len,
                      output_len=[lo, hi], kv_requests=args.kv_requests, window=WINDOW,
                      kv_bytes=wl["kv_bytes"]),
    )  # fmt: skip
    json_path = out / "gpu_benchmark.json"

    def save(**parts) -> None:  # after each engine, so a later failure keeps what was measured
        report.update(parts, wall_s=time.perf_counter() - t0)
        json_path.write_text(json.dumps(tb.jsonable(report), indent=2) + "\n")

    plain = run_plain(paths, wl, engine_args)
    print(f"plain vLLM: {plain['output_tokens_per_s']:.0f} tok/s", flush=True)
    save(results=[plain])
    calibration, plugin = run_plugin(paths, wl, engine_args, out / "gpu_benchmark_stats.jsonl")
    results = [plain, *plugin]
    save(calibration=calibration, results=results)
    print_table(results)
    plot(results, out / "gpu_benchmark.png",
         f"{report['device']}: Qwen3-8B shape, KV-bound ({args.num_requests} requests)")
    print(f"\nwrote {json_path} and {out / 'gpu_benchmark.png'} ({report['wall_s']:.0f} s)")

if __name__ == "__main__":
    main()
