"""What the benchmarks share, written once; each benchmark script holds its experiment only.

Workloads (random token-id prompts and output lengths), model shapes (config-only models with a
random KVzap surrogate, KV bytes per token), engines (plain vLLM vs the plugin: arguments, start
and shutdown, a workload driven step by step, scheduler and the plugin's statistics) and threshold
calibration (score quantiles, scores computed offline, a grid on a running engine). The step
profiler is `benchmarks/profiling.py`; saved JSON and plots go through `benchmarks/report.py`.
vLLM is imported only where an engine runs (the GPU scripts check the GPU first).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Workloads

SLACK_TOKENS = 128  # KV budgets' slack: one block of vLLM's CPU default block size


def make_prompts(num: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 900, (length,), generator=g).tolist() for _ in range(num)]


def make_output_lens(num: int, bounds: tuple[int, int], seed: int) -> list[int]:
    import torch

    lo, hi = bounds
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(lo, hi + 1, (num,), generator=g).tolist()


# ---------------------------------------------------------------------------------------------
# Model shapes: a config.json for vLLM's random `load_format="dummy"` weights (no tokenizer: the
# prompts are token ids) and a random KVzap MLP surrogate in the published format.
SMOLLM2_SHAPE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}  # fmt: skip
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
QWEN3_8B_SURROGATE_HIDDEN = 512  # NVIDIA's KVzap-mlp-Qwen3-8B


def make_shape(model_config: dict, out_dir: Path, hidden: int, seed: int = 0) -> dict[str, Path]:
    """Write (or rewrite, deterministically) a model's config.json (for vLLM's dummy weights) and
    a random KVzap MLP surrogate for it in the published format (D -> hidden -> H_kv per layer)."""
    import torch

    from vllm_kvzap.scorers import SurrogateConfig, save_checkpoint

    out = Path(out_dir).expanduser().resolve()
    paths = {"model": out / "model", "mlp": out / "mlp"}
    paths["model"].mkdir(parents=True, exist_ok=True)
    (paths["model"] / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    D = model_config["hidden_size"]
    H = model_config["num_key_value_heads"]
    L = model_config["num_hidden_layers"]
    # vLLM's dummy weights are U(-1e-3, 1e-3), RMSNorm's included, so the hidden states the
    # surrogate reads have an RMS of ~1e-3 / sqrt(3): scale the first layer by its inverse so the
    # pre-activations, and the scores' spread around the bias, are O(1) (with unscaled weights
    # the scores sit within ~1e-4 of the bias, a few hundred float32 steps: ties everywhere).
    input_rms = 1e-3 / 3**0.5
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(L):
        state[f"layers.{i}.0.weight"] = torch.randn(hidden, D, generator=g) / (D**0.5 * input_rms)
        state[f"layers.{i}.0.bias"] = torch.zeros(hidden)
        state[f"layers.{i}.2.weight"] = torch.randn(H, hidden, generator=g) / hidden**0.5
        state[f"layers.{i}.2.bias"] = torch.full((H,), -4.0)
    config = SurrogateConfig(input_dim=D, output_dim=H, n_modules=L, hidden_dim=hidden)
    save_checkpoint(paths["mlp"], config, state)
    return paths


def config_shape(config: dict) -> dict:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return dict(
        layers=config["num_hidden_layers"],
        kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        head_dim=head_dim,
        max_position_embeddings=config.get("max_position_embeddings"),
    )


def model_shape(model_dir: Path) -> dict:
    return config_shape(json.loads((Path(model_dir) / "config.json").read_text()))


def kv_bytes_per_token(shape: dict, dtype: str) -> int:
    """K and V of one token in every layer and KV head, in `dtype`."""
    size = 2 if dtype in ("bfloat16", "float16", "half") else 4
    return shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2 * size


def dense_kv_bytes(num_kv_tokens: int, block_size: int, bytes_per_token: int) -> int:
    return -(-num_kv_tokens // block_size) * block_size * bytes_per_token


def require_gpu(name: str) -> None:
    """Exit with a clear message unless torch sees a CUDA GPU (before vLLM is imported)."""
    try:
        import torch
    except ImportError:
        sys.exit(f"{name}: torch is not installed; run `bash tools/setup_env.sh` first")
    if not torch.cuda.is_available():
        sys.exit(
            f"{name} needs an NVIDIA GPU with CUDA: torch.cuda.is_available() is False on "
            "this machine (for CPU numbers run `python -m benchmarks.throughput_benchmark`)"
        )


def require_cuda_vllm(name: str) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        sys.exit(f"{name}: vLLM runs on {current_platform.device_name}, not CUDA (the CPU "
                 "build is installed?): `bash tools/setup_env.sh` installs vllm==0.32.0 on a GPU")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Engines


def kvzap(surrogate, window: int, threshold: float = float("-inf"), stats_path=None) -> dict:
    """The plugin's `kv_pruning` options for KVzap's MLP surrogate (statistics lines optional)."""
    pruning = {"method": "kvzap-mlp", "threshold": threshold, "window": window,
               "surrogate": str(surrogate)}  # fmt: skip
    if stats_path is not None:
        pruning["stats_path"] = str(stats_path)
    return pruning


def engine_kwargs(paths, wl: dict, pruning: dict | None, args) -> dict:
    """Plain vLLM at its defaults (pruning None) or the plugin, on a token-id workload `wl`
    (max_model_len, kv_bytes); `args`: dtype, load_format, plugin_block_size."""
    kwargs = dict(
        model=str(paths["model"]),
        dtype=args.dtype,
        load_format=args.load_format,
        skip_tokenizer_init=True,  # prompts are token ids; smollm2-shape has no tokenizer
        max_model_len=wl["max_model_len"],
        kv_cache_memory_bytes=wl["kv_bytes"],
        disable_log_stats=False,  # scheduler stats: running / waiting requests, preemptions
        seed=0,
    )
    if pruning is not None:
        kwargs["additional_config"] = {"kv_pruning": pruning}
        if args.plugin_block_size:
            kwargs["block_size"] = args.plugin_block_size
    return kwargs


@contextmanager
def engine(**kwargs):
    """A vLLM engine (`LLM(**kwargs)`) for the with-block, shut down after it."""
    from vllm import LLM

    llm = LLM(**kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def describe_engine(llm) -> dict:
    """The engine settings that matter here, as vLLM resolved them (defaults included)."""
    c = llm.llm_engine.vllm_config
    return dict(
        block_size=c.cache_config.block_size,
        enforce_eager=c.model_config.enforce_eager,
        compilation_mode=getattr(c.compilation_config.mode, "name", str(c.compilation_config.mode)),
        async_scheduling=c.scheduler_config.async_scheduling,
        enable_prefix_caching=c.cache_config.enable_prefix_caching,
        max_num_seqs=c.scheduler_config.max_num_seqs,
        max_num_batched_tokens=c.scheduler_config.max_num_batched_tokens,
        enable_chunked_prefill=getattr(c.scheduler_config, "enable_chunked_prefill", None),
        dtype=str(c.model_config.dtype),
    )


DECODE_MIN_STEPS = 4


def drive(llm, prompts, output_lens, on_step=None, extra_args=None, id_prefix="") -> dict:
    """Submit every request (greedy, `ignore_eos`), step until all finish; per-step output timing
    on this side. `on_step(outputs)` runs after every step; `extra_args` go to every request's
    `SamplingParams` (e.g. a per-request threshold); request ids are `id_prefix` + index (distinct
    prefixes when one engine runs several batches)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    ids = [f"{id_prefix}{i}" for i in range(len(prompts))]
    tokens: dict[str, list[int]] = {r: [] for r in ids}
    first_token_step: dict[str, int] = {}
    finished: set[str] = set()
    step_times: list[float] = []  # perf_counter after each step that returned outputs
    all_started_at = first_finish_at = None  # indices into step_times
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, output_lens)):
        params = SamplingParams(
            max_tokens=n, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA,
            extra_args=extra_args,
        )
        engine.add_request(ids[i], {"prompt_token_ids": prompt}, params)
    num_steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        num_steps += 1
        if on_step is not None:
            on_step(outs)
        if not outs:
            continue
        step_times.append(time.perf_counter())
        for out in outs:
            tokens[out.request_id].extend(out.outputs[0].token_ids)
            if tokens[out.request_id]:
                first_token_step.setdefault(out.request_id, len(step_times) - 1)
            if out.finished:
                finished.add(out.request_id)
        if all_started_at is None and len(first_token_step) == len(prompts):
            all_started_at = len(step_times) - 1
        if first_finish_at is None and finished:
            first_finish_at = len(step_times) - 1
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(t) for t in tokens.values())
    result = dict(
        elapsed_s=elapsed,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / elapsed,
        engine_steps_seen=num_steps,
    )
    # decode phase: from the step where the last prompt got its first token to the first finish
    # (every request running and decoding, one token per request per step)
    if all_started_at is not None and first_finish_at is not None:
        n = first_finish_at - all_started_at
        if n >= DECODE_MIN_STEPS:
            dt = step_times[first_finish_at] - step_times[all_started_at]
            gaps = sorted(b - a for a, b in zip(step_times[all_started_at:first_finish_at],
                                                step_times[all_started_at + 1:first_finish_at + 1]))
            result.update(
                decode_steps=n,
                decode_ms_per_step=1000 * dt / n,
                decode_median_ms_per_step=1000 * gaps[len(gaps) // 2],
                decode_tokens_per_s=len(prompts) * n / dt,
            )
    return result, [tokens[r] for r in ids]


def watch_scheduler(llm) -> dict:
    """Wrap the engine's stat-logger manager to read each step's scheduler stats."""
    seen = dict(running=[], waiting=[], kv_usage=[], preempted=0)
    manager = llm.llm_engine.logger_manager
    if manager is None:
        raise RuntimeError("no stat-logger manager (disable_log_stats must be False)")
    record = manager.record

    def wrapped(scheduler_stats=None, iteration_stats=None, *a, **k):
        if scheduler_stats is not None:
            seen["running"].append(scheduler_stats.num_running_reqs)
            seen["waiting"].append(
                scheduler_stats.num_waiting_reqs
                + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            )
            seen["kv_usage"].append(scheduler_stats.kv_cache_usage)
        if iteration_stats is not None:
            seen["preempted"] += iteration_stats.num_preempted_reqs
        return record(scheduler_stats, iteration_stats, *a, **k)

    manager.record = wrapped
    return seen


def running_summary(seen: dict) -> dict:
    """Peak and mean running requests and preemptions from `watch_scheduler`'s record."""
    r = seen["running"]
    return dict(peak_running=max(r, default=0), mean_running=sum(r) / max(len(r), 1),
                preemptions=seen["preempted"])  # fmt: skip


def metric_value(llm, name: str) -> float | None:
    for m in llm.get_metrics():
        if m.name == name:
            return float(getattr(m, "value", 0) or 0)
    return None


def stats_by_id(path: Path, count: int) -> dict[str, dict]:
    """The plugin's statistics lines by request id, once `count` lines are written."""
    from vllm_kvzap.stats import wait_for_stats

    return {s["request_id"]: s for s in wait_for_stats(path, count, timeout_s=120)}


def run_config(paths, wl, label, pruning, stats_path, args) -> tuple[dict, list[list[int]]]:
    """One engine (plain vLLM, or the plugin with `pruning`) on workload `wl`: tok/s, decode step
    time, running requests and preemptions, KV memory per request."""
    if pruning is not None:
        stats_path.unlink(missing_ok=True)
        pruning = {**pruning, "stats_path": str(stats_path)}
    t0 = time.perf_counter()
    with engine(**engine_kwargs(paths, wl, pruning, args)) as llm:
        startup = time.perf_counter() - t0
        engine_config = describe_engine(llm)
        block_size = engine_config["block_size"]
        seen = watch_scheduler(llm)
        result, outputs = drive(llm, wl["prompts"], wl["output_lens"])
        counter = metric_value(llm, "vllm:num_preemptions")
    running, waiting = seen["running"], seen["waiting"]
    bound = [r for r, w in zip(running, waiting) if w > 0]
    result = dict(
        config=label,
        threshold=None if pruning is None else pruning["threshold"],
        block_size=block_size,
        engine_config=engine_config,
        startup_s=startup,
        **result,
        scheduler_steps=len(running),
        **running_summary(seen),
        mean_running_while_waiting=sum(bound) / len(bound) if bound else None,
        steps_with_waiting=len(bound),
        peak_kv_usage=max(seen["kv_usage"], default=0.0),
    )
    if counter is not None:
        result["preemptions"] = int(counter)
    dense = [dense_kv_bytes(len(p) + n - 1, block_size, wl["bytes_per_token"])
             for p, n in zip(wl["prompts"], wl["output_lens"])]  # fmt: skip
    if pruning is None:
        result.update(
            resident_kv_kib_end=sum(dense) / len(dense) / 1024,
            resident_kv_kib_peak=sum(dense) / len(dense) / 1024,
            dense_kv_kib=sum(dense) / len(dense) / 1024,
        )
    else:
        from vllm_kvzap.stats import wait_for_stats

        stats = wait_for_stats(stats_path, len(wl["prompts"]))
        n = max(len(stats), 1)
        result.update(stats_lines=len(stats))
        if stats:
            result.update(pruned_fraction=sum(s["pruned_fraction"] for s in stats) / n)
            for key in ("resident_kv_bytes_end", "resident_kv_bytes_peak", "dense_kv_bytes"):
                if all(key in s for s in stats):
                    kib_key = key.replace("_bytes", "_kib")
                    result[kib_key] = sum(s[key] for s in stats) / n / 1024
    return result, outputs


def run_child(cmd: list[str], result_path: Path) -> tuple[int, dict | None]:
    """Run `python -m <cmd>` in a child process whose engine core runs in-process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the child can wrap the engine's functions); (exit
    status, the JSON the child wrote to `result_path`, None if it wrote none)."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-m", *cmd], env=env, cwd=Path.cwd(), check=False)
    if proc.returncode != 0 or not Path(result_path).exists():
        return proc.returncode, None
    return proc.returncode, json.loads(Path(result_path).read_text())


# ---------------------------------------------------------------------------------------------
# Threshold calibration


def quantile_threshold(scores, fraction: float, judged_share: float) -> float:
    """The threshold pruning about `fraction` of all pairs when `judged_share` of them leave the
    window (the window is never pruned): the quantile of `scores` at fraction / judged_share (at
    most 0.999; a fixed random subset past torch.quantile's 2**24 limit)."""
    import torch

    flat = scores.reshape(-1)
    if flat.numel() > 2**24:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:2**24]]
    return float(torch.quantile(flat, min(0.999, fraction / judged_share)))


def threshold_options(method: str, fraction: float, scores, judged_share: float) -> dict:
    """A threshold whose pruned fraction is about `fraction` when `judged_share` of the pairs
    leave the window: the score quantile (`scores[method]`), or random's exact rule."""
    if method == "random":  # score = -u, u uniform: threshold t prunes a fraction 1 + t
        return {"threshold": min(0.999, fraction / judged_share) - 1.0}
    return {"threshold": quantile_threshold(scores[method], fraction, judged_share)}


def collect_scores(model_dir: Path, surrogates: dict, prompts, knorm_keys: str | None = None):
    """Offline (transformers, float32), per scorer, the scores `[layers, tokens of all prompts,
    KV heads]` the plugin computes in a dense prefill of `prompts`: each surrogate (name -> its
    directory) on the layers' attention inputs and, with `knorm_keys` (the attention's module
    whose output is the key before RoPE, which keeps norms: "k_norm", "k_proj"), knorm's -||k||."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_kvzap.scorers import load_surrogate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers, num_kv_heads = model.model.layers, model.config.num_key_value_heads
    inputs: dict[int, torch.Tensor] = {}
    keys: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, kw["hidden_states"][0].float()),
            with_kwargs=True))  # fmt: skip
        if knorm_keys:
            hooks.append(getattr(layer.self_attn, knorm_keys).register_forward_hook(
                lambda m, a, out, i=i: keys.__setitem__(i, out[0].float())))  # fmt: skip
    loaded = {name: load_surrogate(path) for name, path in surrogates.items()}
    scores: dict[str, list[torch.Tensor]] = {m: [] for m in loaded}
    if knorm_keys:
        scores["knorm"] = []
    try:
        with torch.no_grad():
            for ids in prompts:
                model(input_ids=torch.tensor([ids]), use_cache=False)
                for name, s in loaded.items():
                    scores[name].append(torch.stack([s.score(inputs[i], i)
                                                     for i in range(len(layers))]))  # fmt: skip
                if knorm_keys:
                    scores["knorm"].append(torch.stack([
                        -keys[i].reshape(len(ids), num_kv_heads, -1).norm(dim=-1)
                        for i in range(len(layers))]))  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    return {m: torch.cat(v, dim=1) for m, v in scores.items()}


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


def calibrate_on_grid(llm, prompt, output_len: int, grid, targets, stats_path: Path,
                      lines_before: int = 0) -> dict:  # fmt: skip
    """On a running plugin engine (thresholds per request): one request of `prompt` per threshold
    of `grid`, in one batch, the pruned fraction of each from its statistics line (`lines_before`
    lines already written), the thresholds for `targets` interpolated on that measured curve."""
    from vllm import SamplingParams

    t0 = time.perf_counter()
    params = [SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                             extra_args={"kv_pruning": t}) for t in grid]  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(grid), params, use_tqdm=False)
    lines = stats_by_id(stats_path, lines_before + len(grid))
    missing = [t for t, o in zip(grid, outs) if o.request_id not in lines]
    if missing:
        raise RuntimeError(f"no statistics line for the calibration requests at {missing}")
    fractions = [lines[o.request_id]["pruned_fraction"] for o in outs]
    thresholds, notes = interpolate_thresholds(grid, fractions, targets)
    return dict(grid=grid, fractions=fractions, thresholds=thresholds, notes=notes,
                wall_s=time.perf_counter() - t0)  # fmt: skip
