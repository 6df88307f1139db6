"""Throughput: plain vLLM at its own defaults vs vllm-kvzap (paged mode), same run, same machine.

The model (`--model`): `smollm2-shape` (the default), SmolLM2-135M-Instruct's architecture (Llama,
hidden 576, 30 layers, 9 query / 3 KV heads of 64) from a local config.json with vLLM's random
`load_format="dummy"` weights in bf16, and a random KVzap MLP surrogate in the published format
(576 -> 72 -> 3 per layer, like NVIDIA's D/8); no tokenizer (`skip_tokenizer_init`, the prompts
are token ids). `tiny` (the default with `--quick`) is the test suite's model
(`tools.make_tiny_model`, hidden 128, 4 layers, float32), a shape where per-op Python overhead
dominates and no real deployment runs. Both engines get the same model arguments (dtype,
load format, seed 0).

Three workloads, greedy, `ignore_eos`, one engine at a time (each is shut down before the next
starts):

- a, KV-bound: a fixed KV budget (`kv_cache_memory_bytes`) in which plain vLLM holds only ~6 full
  requests, and many long requests (32 x (512 prompt + 128..256 output));
- b, ample memory: 16 requests, a KV budget in which nothing waits for memory;
- c, long context: prompts of ~3900 tokens + 128 output (max_model_len 4096), a few requests,
  where decode attention dominates; reports the decode step time (ms per step once every prompt
  is done).

For each workload: plain vLLM (no `enforce_eager`, no `block_size`, nothing tuned: vLLM's
defaults), then the plugin (`additional_config={"kv_pruning": ...}`, `kvzap-mlp`, window 128) at
threshold -inf (nothing pruned) and at thresholds calibrated to pruned fractions of ~0.5 and
~0.72. Calibration runs in-engine, once for all workloads, before anything else: an in-process
engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `distributed_executor_backend="uni"`, in a child
process) with the plugin at threshold -inf runs each workload's first `calib_requests` requests
one at a time (prompt + the workload's output length), and a wrapper around
`PruningRuntime.save_scores` collects the scores [T, H_kv] the surrogate computed in the model's
graph, per layer; a threshold is the quantile of the scores of the pairs older than the window
that prunes the target fraction of all pairs (the plugin's count: pruned pairs / (H_kv x tokens
whose KV was computed)). The pruned fraction in the tables is the one the plugin measured (its
statistics lines). Running requests and preemptions come from vLLM's scheduler stats.

Then a profiling pass per profiled config (`--profile-configs`; default plain vLLM and the plugin
at the highest target, since every pass is one more engine start-up and compile): a shorter
version of the workload on an in-process engine (in a child process, as for calibration) with
perf_counter timers around the functions named in `PROFILE_CATEGORIES` (exclusive time: a timed
function nested in another is charged to its own category only). Functions that do not exist
(the code moves) are skipped with a printed note. `PROFILE_TOTALS` gives the step total
(`EngineCore.step`), so "rest" = step - scoring handoff - bookkeeping - attention, for the plugin
and for plain vLLM alike. The surrogate itself runs inside the compiled model graph, so its time
is part of "rest" (the model's forward) and is not separable by wrapping: the scoring category
("handoff") times only the hand-off of the scores (`save_scores`, `layer_scores`).

    python -m benchmarks.throughput_benchmark [--quick] [--model smollm2-shape|tiny]
        [--out benchmarks/results] [--workloads a,b,c] [--targets inf,0.5,0.72]
        [--profile-configs plain,max|all] [--plugin-block-size N] [--no-profile]

A full run takes about half an hour on 2 quiet cores, most of it engine start-ups (each compiles
the model). `--quick` runs a much smaller version of each workload on the tiny model with the
plugin at p~0.5 only, every config profiled (several minutes, most of it engine start-ups), to
check that the script works. Timings are sensitive to other load on the machine (the medians in
the split table are the robust numbers); the engine settings vLLM resolved (block size,
compilation mode, async scheduling, prefix caching) are saved with each result.

Prints one side-by-side table per workload and saves `throughput.json` and `throughput.png`
(`throughput_quick.*` with `--quick`; `_<model>` appended for a non-default model) under `--out`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Profiling: what to time, by category ("module:qualname"). Exclusive time: when a timed function
# runs inside another timed function, its time is charged to its own category and taken out of
# the outer one (so e.g. the attention kernel called from a bookkeeping function counts as
# attention). Entries listed under "rest" are timed only to carve vLLM's own work out of a plugin
# function that wraps it. Missing modules/functions are skipped with a note.
PROFILE_CATEGORIES: dict[str, list[str]] = {
    # The surrogate itself runs inside the compiled model graph (`PruningRuntime.graph_scores`
    # is called only while vLLM traces the model; wrapping it would put a timer into the traced
    # code), so its time is part of the model's forward ("rest" / model exec) and cannot be
    # timed by wrapping. What is timed here is the hand-off: the custom op's impl that stores a
    # layer's scores and the backend taking them (+ mask mode's keep flags).
    "scoring": [
        "vllm_kvzap.attention.runtime:PruningRuntime.save_scores",
        "vllm_kvzap.attention.runtime:PruningRuntime.layer_scores",
        "vllm_kvzap.attention.runtime:PruningRuntime.keep_flags",  # mask mode
    ],
    "bookkeeping": [
        # paged mode's page table (DESIGN.md section 8): the step's plan, the layer's writes and
        # moves, releases and reports
        "vllm_kvzap.cache.page_table:PageTable.plan",
        "vllm_kvzap.cache.page_table:PageTable._plan",
        "vllm_kvzap.cache.page_table:PageTable.write_layer",
        "vllm_kvzap.cache.page_table:PageTable.release_keys",
        "vllm_kvzap.cache.page_table:PageTable.reports",
        "vllm_kvzap.cache.page_table:PageTable.finished_counts",
        # the KV connector's worker side (releases finished requests, per-step reports)
        "vllm_kvzap.connector:KVzapPruningConnector.bind_connector_metadata",
        "vllm_kvzap.connector:KVzapPruningConnector.build_connector_worker_meta",
        # scheduler-side accounting
        "vllm_kvzap.cache.manager:KVzapBlockManager.get_num_blocks_to_allocate",
        "vllm_kvzap.cache.manager:KVzapBlockManager.allocate_new_blocks",
        "vllm_kvzap.cache.manager:KVzapBlockManager.apply_report",
        "vllm_kvzap.cache.manager:KVzapBlockManager.free",
        # the plugin's metadata builder (vLLM's own build, which it calls, is carved out below)
        "vllm_kvzap.attention.cpu_backend:KVzapCPUAttentionMetadataBuilder.build",
        "vllm_kvzap.attention.cuda_backend:KVzapTritonAttentionMetadataBuilder.build",
    ],
    "attention": [
        # rows + vLLM's CPU kernel (`vllm_kvzap.attention.rows`), wrapped where the backend
        # looks it up (its `from ... import attend_layer` copy)
        "vllm_kvzap.attention.cpu_backend:attend_layer",
        "vllm_kvzap.kernels.paged_attention:paged_attention_masked_torch",  # mask mode
        # vLLM's CPU attention: plain vLLM's backend, and the kernel ops wherever called from
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
        "vllm._custom_ops:cpu_attention_with_kv_cache",
        "vllm._custom_ops:cpu_attn_get_scheduler_metadata",
        # the CUDA path (host-side times only: kernels run asynchronously on a GPU)
        "vllm_kvzap.attention.cuda_backend:attend_layer_triton",
        "vllm.v1.attention.backends.triton_attn:TritonAttentionImpl.forward",
    ],
    "rest": [
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.build",
        "vllm.v1.attention.backends.triton_attn:TritonAttentionMetadataBuilder.build",
    ],
}
SPLIT_CATEGORIES = ("scoring", "bookkeeping", "attention")
# Totals (inclusive time, outermost call only): the engine step, and the model runner inside it.
PROFILE_TOTALS: dict[str, list[str]] = {
    "step": [
        "vllm.v1.engine.core:EngineCore.step",
        "vllm.v1.engine.core:EngineCore.step_with_batch_queue",
    ],
    "model_execute": [
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
    ],
}
SCHEDULE_TARGET = "vllm.v1.core.sched.scheduler:Scheduler.schedule"  # to tell decode-only steps

# ---------------------------------------------------------------------------------------------
# Workloads. kv_requests: the KV budget in full-length requests (max prompt + max output tokens
# each, plus one 128-token block of slack); calib_requests: the workload's first requests that
# calibrate its thresholds; profile: overrides for the shorter profiling pass. Sized for
# smollm2-shape on 2 cores (a full run in about half an hour, most of it engine start-ups: each
# engine compiles the model, ~40-60 s).
WORKLOADS: dict[str, dict] = {
    "a": dict(
        name="KV-bound", num_requests=32, prompt_len=512, output_len=(128, 256), window=128,
        kv_requests=6, calib_requests=3, profile=dict(num_requests=12),
    ),
    "b": dict(
        name="ample memory", num_requests=16, prompt_len=512, output_len=(128, 256), window=128,
        kv_requests=20, calib_requests=3, profile=dict(num_requests=8),
    ),
    "c": dict(
        name="long context", num_requests=4, prompt_len=3900, output_len=(128, 128), window=128,
        max_model_len=4096, kv_requests=5, calib_requests=2, profile=dict(num_requests=2),
    ),
}  # fmt: skip
QUICK_WORKLOADS: dict[str, dict] = {
    "a": dict(
        name="KV-bound (quick)", num_requests=8, prompt_len=256, output_len=(32, 64), window=32,
        kv_requests=3, calib_requests=2, profile=dict(num_requests=4),
    ),
    "b": dict(
        name="ample memory (quick)", num_requests=4, prompt_len=256, output_len=(32, 64),
        window=32, kv_requests=8, calib_requests=2, profile=dict(num_requests=2),
    ),
    "c": dict(
        name="long context (quick)", num_requests=2, prompt_len=1536, output_len=(32, 32),
        window=32, max_model_len=4096, kv_requests=4, calib_requests=1,
        profile=dict(num_requests=2),
    ),
}  # fmt: skip
TARGET_FRACTIONS = (None, 0.5, 0.72)  # None: threshold -inf (nothing pruned)
QUICK_TARGET_FRACTIONS = (0.5,)
SLACK_TOKENS = 128  # one block of vLLM's CPU default block size
DECODE_MIN_STEPS = 4


# ---------------------------------------------------------------------------------------------
# Workload inputs


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
# Models. smollm2-shape: SmolLM2-135M-Instruct's architecture (config.json only) with vLLM's
# random `load_format="dummy"` weights in bf16 and a random KVzap MLP surrogate in the published
# format (hidden D/8 = 72, like NVIDIA's); no tokenizer (the prompts are token ids). tiny: the
# test suite's model (`tools.make_tiny_model`, real float32 weights, its own MLP surrogate).
SMOLLM2_SHAPE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}  # fmt: skip
MODELS: dict[str, dict] = {
    "smollm2-shape": dict(model_dir=".cache/bench/smollm2-shape", dtype="bfloat16",
                          load_format="dummy"),
    "tiny": dict(model_dir=".cache/tiny", dtype="float32", load_format="auto"),
}  # fmt: skip


def make_smollm2_shape(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    return make_shape(SMOLLM2_SHAPE_CONFIG, out_dir, SMOLLM2_SHAPE_CONFIG["hidden_size"] // 8, seed)


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


def make_model(name: str, model_dir: Path) -> dict[str, Path]:
    if name == "tiny":
        from tools.make_tiny_model import make_tiny_model

        return make_tiny_model(model_dir)
    return make_smollm2_shape(model_dir)


def model_shape(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return dict(
        layers=config["num_hidden_layers"],
        kv_heads=config["num_key_value_heads"],
        head_dim=head_dim,
        max_position_embeddings=config.get("max_position_embeddings"),
    )


# ---------------------------------------------------------------------------------------------
# Threshold calibration, in-engine: the plugin's own scores (the surrogate inside the compiled
# model, on the model's hidden states), collected from `PruningRuntime.save_scores` in an
# in-process engine at threshold -inf. One engine for every workload: at -inf nothing is pruned,
# so the scores do not depend on the window or the KV budget.


def thresholds_from_scores(judged, total_pairs: int, fractions, window: int):
    """Thresholds whose pruned fraction, as the plugin counts it, is about each target: `judged`
    holds the scores of the pairs older than the window at the end of their request, and a
    fraction is pruned pairs / (H_kv x tokens whose KV was computed) = pruned / total_pairs."""
    import torch

    notes, thresholds = [], []
    for f in fractions:
        if f is None:
            thresholds.append(float("-inf"))
            continue
        q = f * total_pairs / max(judged.numel(), 1)
        if q >= 1:
            notes.append(f"target {f} is out of reach with window {window} (at most "
                         f"{judged.numel() / total_pairs:.3f} judged): using the 0.999 quantile")
            q = 0.999  # fmt: skip
        thresholds.append(float(torch.quantile(judged.double(), q)))
    return thresholds, notes


def calibrate_child(job_path: str) -> None:
    """Runs in a child process with VLLM_ENABLE_V1_MULTIPROCESSING=0: each calibration request
    alone (so every score row of a step is that request's), greedy, `ignore_eos`; the rows of a
    layer, in order, are the request's tokens whose KV was computed (prompt + output - 1)."""
    job = json.loads(Path(job_path).read_text())
    import torch

    from vllm_kvzap.attention.runtime import PruningRuntime

    collected: dict = {"layers": None}  # layer -> list of [T, H] score tensors, while collecting
    save_scores = PruningRuntime.save_scores

    @functools.wraps(save_scores)
    def collecting(self, layer_idx, scores):
        if collected["layers"] is not None:
            collected["layers"][layer_idx].append(scores.detach().float().cpu().clone())
        return save_scores(self, layer_idx, scores)

    PruningRuntime.save_scores = collecting

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**job["engine"], distributed_executor_backend="uni")
    startup = time.perf_counter() - t0
    out = dict(startup_s=startup, workloads={})
    try:
        for key, w in job["workloads"].items():
            judged, total_pairs, generated = [], 0, 0
            for prompt, n in zip(w["prompts"], w["output_lens"]):
                collected["layers"] = defaultdict(list)
                params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
                llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
                layers, collected["layers"] = collected["layers"], None
                if sorted(layers) != list(range(job["num_layers"])):
                    raise RuntimeError(f"scores seen for layers {sorted(layers)}, expected "
                                       f"0..{job['num_layers'] - 1}")  # fmt: skip
                num_kv = len(prompt) + n - 1  # the last output token's KV is never computed
                num_judged = max(0, num_kv - w["window"])
                for layer_idx in sorted(layers):
                    scores = torch.cat(layers[layer_idx])  # [T, H]
                    if scores.shape[0] != num_kv:
                        raise RuntimeError(
                            f"layer {layer_idx}: {scores.shape[0]} scored tokens, expected "
                            f"{num_kv} (prompt + output - 1): padded or extra forward passes?"
                        )
                    judged.append(scores[:num_judged].reshape(-1))
                    total_pairs += scores.numel()
                generated += n
            judged = torch.cat(judged)
            thresholds, notes = thresholds_from_scores(judged, total_pairs, w["targets"],
                                                       w["window"])  # fmt: skip
            out["workloads"][key] = dict(
                thresholds=thresholds, notes=notes, requests=len(w["prompts"]),
                output_tokens=generated, judged_pairs=judged.numel(), total_pairs=total_pairs,
                score_mean=float(judged.mean()), score_std=float(judged.std()),
            )  # fmt: skip
    finally:
        llm.llm_engine.engine_core.shutdown()
    out["wall_s"] = time.perf_counter() - t0
    Path(job["result_path"]).write_text(json.dumps(jsonable(out), indent=2))


def calibrate(paths, workloads: dict, shape: dict, args, tmp: Path) -> dict:
    """Thresholds per workload (None for all when no target needs one)."""
    if all(t is None for t in args.targets):
        return {k: dict(thresholds=[float("-inf")] * len(args.targets), notes=[])
                for k in workloads}  # fmt: skip
    longest = max(workloads.values(), key=lambda w: w["max_model_len"])
    max_len = longest["max_model_len"]
    bytes_per_token = longest["bytes_per_token"]
    engine_wl = dict(max_model_len=max_len, kv_bytes=(2 * max_len + SLACK_TOKENS) * bytes_per_token)
    pruning = {"method": "kvzap-mlp", "threshold": float("-inf"), "window": longest["window"],
               "surrogate": str(paths["mlp"])}  # fmt: skip
    job = dict(
        engine=engine_kwargs(paths, engine_wl, pruning, args),
        num_layers=shape["layers"],
        workloads={
            key: dict(
                prompts=w["prompts"][: w["calib_requests"]],
                output_lens=w["output_lens"][: w["calib_requests"]],
                window=w["window"],
                targets=list(args.targets),
            )
            for key, w in workloads.items()
        },
        result_path=str(tmp / "calibration.json"),
    )
    job_path = tmp / "calibration_job.json"
    job_path.write_text(json.dumps(job))
    n = sum(w["calib_requests"] for w in workloads.values())
    per = ", ".join(f"{k}: {w['calib_requests']}" for k, w in workloads.items())
    print(f"\n=== calibration: {n} requests ({per}) one at a time, in-process engine, plugin at "
          f"threshold -inf, scores collected from PruningRuntime.save_scores", flush=True)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, "-m", "benchmarks.throughput_benchmark", "--calibrate-job",
           str(job_path)]
    proc = subprocess.run(cmd, env=env, cwd=Path.cwd())
    if proc.returncode != 0 or not Path(job["result_path"]).exists():
        raise RuntimeError(f"calibration child exited with status {proc.returncode}")
    out = json.loads(Path(job["result_path"]).read_text())
    print(f"    done in {out['wall_s']:.1f} s (startup {out['startup_s']:.1f} s)", flush=True)
    for key, c in out["workloads"].items():
        c["thresholds"] = [float(t) for t in c["thresholds"]]  # "-inf" strings back to floats
        print(f"    {key}: thresholds {', '.join(fmt_threshold(t) for t in c['thresholds'])} for "
              f"{', '.join(label_for(t) for t in args.targets)} ({c['requests']} requests, "
              f"{c['judged_pairs']} judged of {c['total_pairs']} pairs; scores "
              f"{c['score_mean']:.2f} +- {c['score_std']:.2f})", flush=True)  # fmt: skip
        for note in c["notes"]:
            print(f"    {key}: calibration: {note}")
    return out["workloads"]


# ---------------------------------------------------------------------------------------------
# One engine, one workload


def engine_kwargs(paths, wl: dict, pruning: dict | None, args) -> dict:
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


def drive(llm, prompts, output_lens, on_step=None, extra_args=None, id_prefix="") -> dict:
    """Submit every request, step until all finish; per-step output timing on this side.
    `extra_args` go to every request's `SamplingParams` (e.g. a per-request threshold); request
    ids are `id_prefix` + index (distinct prefixes when one engine runs several batches)."""
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


def metric_value(llm, name: str) -> float | None:
    for m in llm.get_metrics():
        if m.name == name:
            return float(getattr(m, "value", 0) or 0)
    return None


def run_config(paths, wl, label, pruning, stats_path, args) -> tuple[dict, list[list[int]]]:
    from vllm import LLM

    if pruning is not None:
        stats_path.unlink(missing_ok=True)
        pruning = {**pruning, "stats_path": str(stats_path)}
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(paths, wl, pruning, args))
    startup = time.perf_counter() - t0
    try:
        engine_config = describe_engine(llm)
        block_size = engine_config["block_size"]
        seen = watch_scheduler(llm)
        result, outputs = drive(llm, wl["prompts"], wl["output_lens"])
        counter = metric_value(llm, "vllm:num_preemptions")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
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
        peak_running=max(running, default=0),
        mean_running=sum(running) / max(len(running), 1),
        mean_running_while_waiting=sum(bound) / len(bound) if bound else None,
        steps_with_waiting=len(bound),
        peak_kv_usage=max(seen["kv_usage"], default=0.0),
        preemptions=int(counter) if counter is not None else seen["preempted"],
    )
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


def dense_kv_bytes(num_kv_tokens: int, block_size: int, bytes_per_token: int) -> int:
    return -(-num_kv_tokens // block_size) * block_size * bytes_per_token


# ---------------------------------------------------------------------------------------------
# Profiling pass (child process, in-process engine)


class Timers:
    """perf_counter timers around named functions: exclusive time per target, inclusive per
    totals group (outermost call only)."""

    def __init__(self):
        self.local = threading.local()
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.group_inclusive: dict[str, float] = defaultdict(float)

    def _state(self):
        if not hasattr(self.local, "stack"):
            self.local.stack, self.local.depth = [], defaultdict(int)
        return self.local.stack, self.local.depth

    def wrap(self, target: str, fn, group: str | None = None):
        timers = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack, depth = timers._state()
            stack.append(0.0)
            if group:
                depth[group] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                child = stack.pop()
                timers.exclusive[target] += dt - child
                timers.calls[target] += 1
                if stack:
                    stack[-1] += dt
                if group:
                    depth[group] -= 1
                    if depth[group] == 0:
                        timers.group_inclusive[group] += dt

        timed.__benchmark_timed__ = True
        return timed


def _resolve(target: str):
    module_name, _, qualname = target.partition(":")
    module = importlib.import_module(module_name)
    owner, parts = module, qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return module, owner, parts[-1]


def patch_target(target: str, make_wrapper) -> str | None:
    """Replace the function named `target` by make_wrapper(fn); returns a note if skipped."""
    try:
        module, owner, name = _resolve(target)
    except Exception as e:  # noqa: BLE001 - any import failure means "not there (now)"
        return f"{target}: not importable ({type(e).__name__}: {e})"
    try:
        raw = inspect.getattr_static(owner, name)
    except AttributeError:
        return f"{target}: no such function"
    if isinstance(raw, staticmethod):
        new = staticmethod(make_wrapper(raw.__func__))
    elif isinstance(raw, classmethod):
        new = classmethod(make_wrapper(raw.__func__))
    elif callable(raw):
        if getattr(raw, "__benchmark_timed__", False):
            return f"{target}: already timed (listed twice?)"
        new = make_wrapper(raw)
    else:
        return f"{target}: not a function ({type(raw).__name__})"
    setattr(owner, name, new)
    if owner is module:  # also rebind `from module import fn` copies in loaded modules
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or mod is module or not mod_name.startswith(("vllm", "benchmarks")):
                continue
            for attr, value in list(getattr(mod, "__dict__", {}).items()):
                if value is raw:
                    setattr(mod, attr, new)
    return None


def install_profiling(timers: Timers) -> tuple[list[str], list[str]]:
    notes, timed = [], []
    for category, targets in PROFILE_CATEGORIES.items():
        for target in targets:
            note = patch_target(target, lambda fn, t=target: timers.wrap(t, fn))
            (notes.append(note) if note else timed.append(target))
    for group, targets in PROFILE_TOTALS.items():
        for target in targets:
            note = patch_target(target, lambda fn, t=target, g=group: timers.wrap(t, fn, g))
            (notes.append(note) if note else timed.append(target))
    return notes, timed


def profile_child(job_path: str) -> None:
    """Runs in a child process with VLLM_ENABLE_V1_MULTIPROCESSING=0; the parent prints its
    notes (functions not found), once per run."""
    job = json.loads(Path(job_path).read_text())
    timers = Timers()
    notes, timed = install_profiling(timers)
    last_schedule: dict = {}

    def capture(fn):
        @functools.wraps(fn)
        def schedule(*args, **kwargs):
            out = fn(*args, **kwargs)
            counts = list(getattr(out, "num_scheduled_tokens", {}).values())
            last_schedule["decode_only"] = bool(counts) and all(c == 1 for c in counts)
            last_schedule["num_tokens"] = sum(counts)
            return out

        schedule.__benchmark_timed__ = True
        return schedule

    note = patch_target(SCHEDULE_TARGET, capture)
    if note:
        notes.append(f"{note} (decode-only steps cannot be told apart)")

    from vllm import LLM

    category_of = {t: c for c, ts in PROFILE_CATEGORIES.items() for t in ts}

    def snapshot() -> dict[str, float]:
        snap = {c: 0.0 for c in (*SPLIT_CATEGORIES, "rest_timed")}
        for target, seconds in list(timers.exclusive.items()):
            cat = category_of.get(target)
            if cat in SPLIT_CATEGORIES:
                snap[cat] += seconds
            elif cat == "rest":
                snap["rest_timed"] += seconds
        for group in PROFILE_TOTALS:
            snap[group] = timers.group_inclusive.get(group, 0.0)
        return snap

    per_step: list[dict] = []  # one entry per engine step that ran something
    state = {"before": None, "t": None}

    t0 = time.perf_counter()
    llm = LLM(**job["engine"], distributed_executor_backend="uni")
    startup = time.perf_counter() - t0
    try:
        engine_config = describe_engine(llm)
        state["before"], state["t"] = snapshot(), time.perf_counter()

        def on_step(outs):
            now, after = time.perf_counter(), snapshot()
            delta = {k: after[k] - state["before"].get(k, 0.0) for k in after}
            delta["client_step"] = now - state["t"]
            state["before"], state["t"] = after, now
            last = dict(last_schedule)
            last_schedule.clear()
            if not last.get("num_tokens") and not delta.get("step"):
                return  # nothing ran
            delta["decode_only"] = bool(last.get("decode_only"))
            per_step.append(delta)

        result, _ = drive(llm, job["prompts"], job["output_lens"], on_step=on_step)
    finally:
        llm.llm_engine.engine_core.shutdown()
    out = dict(result, startup_s=startup, engine_config=engine_config, notes=notes, timed=timed,
               steps={"all": len(per_step), "decode": sum(d["decode_only"] for d in per_step)},
               phases={})  # fmt: skip
    for phase in ("all", "decode"):
        rows = [d for d in per_step if phase == "all" or d["decode_only"]]
        if not rows:
            continue
        n = len(rows)
        source = "step" if any(d.get("step") for d in rows) else "client_step"
        totals = [d[source] for d in rows]
        total = sum(totals)
        split = {c: sum(d.get(c, 0.0) for d in rows) for c in SPLIT_CATEGORIES}
        split["rest"] = total - sum(split.values())
        ordered = sorted(totals)
        out["phases"][phase] = dict(
            steps=n,
            step_total_s=total,
            step_total_source="EngineCore.step" if source == "step" else "LLMEngine.step",
            ms_per_step=1000 * total / n,
            median_ms_per_step=1000 * ordered[n // 2],
            p90_ms_per_step=1000 * ordered[min(n - 1, int(0.9 * n))],
            model_execute_ms_per_step=1000 * sum(d.get("model_execute", 0.0) for d in rows) / n,
            split_ms_per_step={c: 1000 * v / n for c, v in split.items()},
            split_share={c: v / total if total else 0.0 for c, v in split.items()},
        )
    # the step times in order (ms), to see warm-up or noise
    out["step_ms"] = [round(1000 * d.get("step", d["client_step"]), 3) for d in per_step]
    Path(job["result_path"]).write_text(json.dumps(out, indent=2))


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


_printed_notes: set[str] = set()


def run_profile(paths, wl, label, pruning, args, tmp: Path) -> dict:
    n = wl["profile"].get("num_requests", wl["num_requests"])
    index = len(list(tmp.glob("job_*.json")))
    job = dict(
        engine=engine_kwargs(paths, wl, pruning, args),
        prompts=wl["prompts"][:n],
        output_lens=wl["output_lens"][:n],
        result_path=str(tmp / f"profile_{index}.json"),
    )
    job_path = tmp / f"job_{index}.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, "-m", "benchmarks.throughput_benchmark", "--profile-job", str(job_path)]
    print(f"  profiling {label} ({n} requests, in-process engine) ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=Path.cwd())
    if proc.returncode != 0 or not Path(job["result_path"]).exists():
        print(f"    profiling FAILED (child exit status {proc.returncode})", flush=True)
        return dict(num_requests=n, error=f"profiling child exited with status {proc.returncode}")
    out = json.loads(Path(job["result_path"]).read_text())
    out.update(num_requests=n, wall_s=time.perf_counter() - t0)
    for note in out.get("notes", []):
        if note not in _printed_notes:
            _printed_notes.add(note)
            print(f"    profile: skipped {note}", flush=True)
    ph = out.get("phases", {}).get("all")
    if ph:
        print(f"    {ph['steps']} steps, {ph['ms_per_step']:.2f} ms/step (median "
              f"{ph['median_ms_per_step']:.2f})", flush=True)  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Driver


def prepare_workload(key: str, spec: dict, shape: dict, args) -> dict:
    wl = dict(spec, key=key)
    lo, hi = wl["output_len"]
    wl.setdefault("max_model_len", wl["prompt_len"] + hi)
    bytes_per_token = shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2 * 4
    if args.dtype in ("bfloat16", "float16", "half"):
        bytes_per_token //= 2
    wl["bytes_per_token"] = bytes_per_token
    full = wl["prompt_len"] + hi
    wl["kv_bytes"] = (wl["kv_requests"] * full + SLACK_TOKENS) * bytes_per_token
    seed = 1000 * (ord(key) - ord("a"))
    wl["prompts"] = make_prompts(wl["num_requests"], wl["prompt_len"], seed)
    wl["output_lens"] = make_output_lens(wl["num_requests"], (lo, hi), seed)
    return wl


def label_for(target) -> str:
    return "kvzap t=-inf" if target is None else f"kvzap p~{target}"


def profile_labels(spec: str, targets) -> list[str]:
    """Config labels to profile from `--profile-configs` (see its help)."""
    labels = ["plain vLLM"] + [label_for(t) for t in targets]
    chosen = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if item == "all":
            chosen += labels
        elif item == "none":
            continue
        elif item == "plain":
            chosen.append("plain vLLM")
        elif item in ("inf", "-inf"):
            chosen.append(label_for(None))
        elif item == "max":
            finite = [t for t in targets if t is not None]
            chosen.append(label_for(max(finite)) if finite else label_for(None))
        else:
            try:
                chosen.append(label_for(float(item)))
            except ValueError:
                raise ValueError(f"--profile-configs: unknown config {item!r}") from None
    unknown = [c for c in chosen if c not in labels]
    if unknown:
        raise ValueError(f"--profile-configs: {unknown} not among the configs run ({labels})")
    return [c for c in labels if c in chosen]


def run_workload(paths, wl, calibration: dict, args, tmp: Path) -> dict:
    print(f"\n=== workload {wl['key']}: {workload_line(wl)}", flush=True)
    configs: list[tuple[str, dict | None]] = [("plain vLLM", None)]
    results = []

    def attempt(label, pruning):
        print(f"  running {label} ...", flush=True)
        try:
            r, outs = run_config(paths, wl, label, pruning, tmp / f"stats_{wl['key']}.jsonl", args)
            print(f"    {r['output_tokens_per_s']:.1f} output tok/s in {r['elapsed_s']:.1f} s "
                  f"(startup {r['startup_s']:.1f} s)", flush=True)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - keep the other configs going
            traceback.print_exc()
            r, outs = dict(config=label, error=f"{type(e).__name__}: {e}"), None
        results.append(r)
        return outs

    attempt("plain vLLM", None)
    thresholds, notes = calibration["thresholds"], calibration["notes"]
    for target, tau in zip(args.targets, thresholds):
        pruning = {"method": "kvzap-mlp", "threshold": tau, "window": wl["window"],
                   "surrogate": str(paths["mlp"])}  # fmt: skip
        configs.append((label_for(target), pruning))
        attempt(label_for(target), pruning)
        results[-1]["target_fraction"] = target
    if not args.no_profile:
        for (label, pruning), r in zip(configs, results):
            if label not in args.profile_labels:
                continue
            if pruning is not None:
                pruning = dict(pruning)
            r["profile"] = run_profile(paths, wl, label, pruning, args, tmp)
    derive(results)
    return dict(
        name=wl["name"],
        num_requests=wl["num_requests"],
        prompt_len=wl["prompt_len"],
        output_len=list(wl["output_len"]),
        window=wl["window"],
        max_model_len=wl["max_model_len"],
        kv_cache_memory_bytes=wl["kv_bytes"],
        kv_budget_full_requests=wl["kv_requests"],
        profile_num_requests=wl["profile"].get("num_requests", wl["num_requests"]),
        thresholds={label_for(t): jsonable(tau) for t, tau in zip(args.targets, thresholds)},
        calibration_notes=notes,
        calibration={k: v for k, v in calibration.items() if k not in ("thresholds", "notes")},
        results=[{k: jsonable(v) for k, v in r.items()} for r in results],
    )


def derive(results: list[dict]) -> None:
    base = results[0]
    for r in results:
        if "error" in r:
            continue
        if "error" not in base and base.get("output_tokens_per_s"):
            r["tok_s_ratio"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
            if base.get("decode_ms_per_step") and r.get("decode_ms_per_step"):
                r["decode_step_ratio"] = r["decode_ms_per_step"] / base["decode_ms_per_step"]
            b, m = base.get("mean_running_while_waiting"), r.get("mean_running_while_waiting")
            if b and m and r is not base:
                r["concurrency_gain"] = m / b
                p = r.get("pruned_fraction")
                if p is not None and p < 1:
                    r["ideal_gain"] = 1 / (1 - p)
                    r["gain_ratio"] = r["concurrency_gain"] / r["ideal_gain"]
        if r.get("resident_kv_kib_peak") and r.get("dense_kv_kib"):
            r["kv_peak_vs_dense"] = r["resident_kv_kib_peak"] / r["dense_kv_kib"]
            r["kv_end_vs_dense"] = r["resident_kv_kib_end"] / r["dense_kv_kib"]


def jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def workload_line(wl: dict) -> str:
    lo, hi = wl["output_len"]
    out = f"{lo}" if lo == hi else f"{lo}..{hi}"
    return (f"{wl['name']}: {wl['num_requests']} requests x ({wl['prompt_len']} prompt + {out} "
            f"output) tokens, KV budget {wl['kv_bytes'] / 2**20:.1f} MiB (~{wl['kv_requests']} "
            f"full requests), max_model_len {wl['max_model_len']}, window {wl['window']}")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Output


def fmt_threshold(t) -> str:
    if t is None:
        return "-"
    if isinstance(t, str) or not math.isfinite(t):
        return "-inf"
    return f"{t:.2f}"


def print_workload(key: str, w: dict) -> None:
    results = w["results"]
    lo, hi = w["output_len"]
    print(f"\nworkload {key}, {w['name']}: {w['num_requests']} requests x ({w['prompt_len']} "
          f"prompt + {lo if lo == hi else f'{lo}..{hi}'} output), KV budget "
          f"{w['kv_cache_memory_bytes'] / 2**20:.1f} MiB, window {w['window']}, block size "
          f"{', '.join(sorted({str(r.get('block_size')) for r in results if 'block_size' in r}))}")  # fmt: skip

    def share(r, cat):
        ph = (r.get("profile") or {}).get("phases", {}).get("all")
        return None if ph is None else 100 * ph["split_share"][cat]

    def prof_ms(r):
        ph = (r.get("profile") or {}).get("phases", {}).get("all")
        return None if ph is None else ph["ms_per_step"]

    columns = [  # header, width, getter, format
        ("config", 14, lambda r: r["config"], "{:<14}"),
        ("thresh", 7, lambda r: fmt_threshold(r.get("threshold")), "{:>7}"),
        ("pruned", 7, lambda r: r.get("pruned_fraction"), "{:>7.3f}"),
        ("tok/s", 8, lambda r: r.get("output_tokens_per_s"), "{:>8.1f}"),
        ("x plain", 8, lambda r: r.get("tok_s_ratio"), "{:>8.2f}"),
        ("peak run", 9, lambda r: r.get("peak_running"), "{:>9}"),
        ("mean run", 9, lambda r: r.get("mean_running"), "{:>9.1f}"),
        ("run|wait", 9, lambda r: r.get("mean_running_while_waiting"), "{:>9.1f}"),
        ("preempt", 8, lambda r: r.get("preemptions"), "{:>8}"),
        ("KV/req KiB", 11, lambda r: r.get("resident_kv_kib_peak"), "{:>11.0f}"),
        ("end KiB", 8, lambda r: r.get("resident_kv_kib_end"), "{:>8.0f}"),
        ("dense KiB", 10, lambda r: r.get("dense_kv_kib"), "{:>10.0f}"),
        ("dec ms", 7, lambda r: r.get("decode_ms_per_step"), "{:>7.1f}"),
        ("handoff%", 9, lambda r: share(r, "scoring"), "{:>9.1f}"),
        ("book%", 6, lambda r: share(r, "bookkeeping"), "{:>6.1f}"),
        ("attn%", 6, lambda r: share(r, "attention"), "{:>6.1f}"),
        ("rest%", 6, lambda r: share(r, "rest"), "{:>6.1f}"),
        ("step ms", 8, prof_ms, "{:>8.2f}"),
    ]
    print("".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w, _, _) in enumerate(columns)))
    for r in results:
        if "error" in r:
            print(f"{r['config']:<14}  FAILED: {r['error'][:200]}")
            continue
        cells = []
        for _, width, get, fmt in columns:
            v = get(r)
            cells.append("-".rjust(width) if v is None else fmt.format(v))
        print("".join(cells))
    modes = sorted({r["engine_config"]["compilation_mode"]
                    for r in results if "engine_config" in r})  # fmt: skip
    print("KV/req: KV memory a request holds at its peak (end: when it finishes; dense: plain "
          "vLLM for the same tokens); run|wait: running requests averaged over steps where "
          "others wait; dec ms: ms per step once every prompt is done (main run); handoff% .. "
          "rest%: share of the engine step time in the profiling pass; step ms: its mean.")
    print(f"scoring: in graph (compilation mode {', '.join(modes) or '?'}): the surrogate runs "
          "inside the model's forward, so its time is in rest / model exec and cannot be timed "
          "by wrapping; handoff = PruningRuntime.save_scores + layer_scores only.")

    # step-time split in ms, all steps and decode-only steps
    rows = [(r["config"], phase, r["profile"]["phases"][phase])
            for r in results if "profile" in r and "phases" in r.get("profile", {})
            for phase in ("all", "decode") if phase in r["profile"]["phases"]]  # fmt: skip
    errors = [(r["config"], r["profile"]["error"]) for r in results if "error" in r.get("profile", {})]
    if rows or errors:
        print(f"step-time split, profiling pass ({w['profile_num_requests']} requests, in-process "
              f"engine): ms per engine step")  # fmt: skip
        print(f"{'config':<14}{'phase':>7}{'steps':>7}{'step':>9}{'median':>9}{'handoff':>9}"
              f"{'bookkeep':>10}{'attention':>11}{'rest':>9}{'model exec':>12}")  # fmt: skip
        for label, phase, ph in rows:
            s = ph["split_ms_per_step"]
            print(f"{label:<14}{phase:>7}{ph['steps']:>7}{ph['ms_per_step']:>9.2f}"
                  f"{ph.get('median_ms_per_step', float('nan')):>9.2f}"
                  f"{s['scoring']:>9.2f}{s['bookkeeping']:>10.2f}{s['attention']:>11.2f}"
                  f"{s['rest']:>9.2f}{ph['model_execute_ms_per_step']:>12.2f}")  # fmt: skip
        for label, err in errors:
            print(f"{label:<14}  profiling FAILED: {err}")


def plot(workloads: dict, path: Path, targets, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    keys = list(workloads)
    labels = ["plain vLLM"] + [label_for(t) for t in targets]
    colors = ["tab:gray"] + [plt.cm.tab10(j) for j in range(len(labels) - 1)]
    width = 0.8 / len(labels)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))

    def value(key, label, field):
        for r in workloads[key]["results"]:
            if r["config"] == label and "error" not in r:
                return r.get(field)
        return None

    def names(key):
        return f"{key}\n{workloads[key]['name'].replace(' (quick)', '')}"

    for j, (label, color) in enumerate(zip(labels, colors)):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(keys))]
        ratio = [value(k, label, "tok_s_ratio") or 0 for k in keys]
        axes[0].bar(xs, ratio, width, label=label, color=color)
        for x, v in zip(xs, ratio):
            axes[0].text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        mean = [value(k, label, "mean_running") or 0 for k in keys]
        peak = [value(k, label, "peak_running") or 0 for k in keys]
        axes[1].bar(xs, mean, width, label=label, color=color)
        axes[1].plot(xs, peak, "k_", markersize=10)
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].set_title("output tok/s relative to plain vLLM")
    axes[1].set_title("running requests (bar: mean over steps, tick: peak)")
    for ax in axes[:2]:
        ax.set_xticks(range(len(keys)), [names(k) for k in keys])
        ax.legend(fontsize=7)
    # step-time split per output token, relative to plain vLLM (profiling pass)
    cats = ["scoring", "bookkeeping", "attention", "rest"]
    cat_colors = ["tab:purple", "tab:red", "tab:cyan", "lightgray"]
    ticks, tick_labels, pos = [], [], 0
    for k in keys:
        base = None
        for r in workloads[k]["results"]:
            ph = (r.get("profile") or {}).get("phases", {}).get("all")
            tokens = (r.get("profile") or {}).get("output_tokens")
            if ph is None or not tokens:
                continue
            per_token = {c: ph["split_ms_per_step"][c] * ph["steps"] / tokens for c in cats}
            if base is None:
                base = sum(per_token.values())  # plain vLLM comes first
            bottom = 0.0
            for c, color in zip(cats, cat_colors):
                v = per_token[c] / base
                axes[2].bar(pos, v, 0.8, bottom=bottom, color=color,
                            label=None if pos else c.replace("scoring", "score handoff"))
                bottom += v
            ticks.append(pos)
            tick_labels.append(f"{k} {r['config'].replace('kvzap ', '')}")
            pos += 1
        pos += 1
    axes[2].set_xticks(ticks, tick_labels, rotation=60, fontsize=7)
    axes[2].set_title("profiled step time per output token / plain vLLM's")
    if ticks:
        axes[2].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a much smaller version (minutes)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workloads", default="a,b,c", help="comma-separated subset of a,b,c")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="smollm2-shape (SmolLM2-135M's architecture, random bf16 weights; "
                             "the default) or tiny (the test model; the default with --quick)")
    parser.add_argument("--model-dir", default=None,
                        help="where the model is written (default: .cache/bench/smollm2-shape "
                             "or .cache/tiny)")
    parser.add_argument("--dtype", default=None,
                        help="model dtype, for both engines (default: bfloat16 for "
                             "smollm2-shape, float32 for tiny)")
    parser.add_argument("--plugin-block-size", type=int, default=None,
                        help="block size for the plugin's engines (default: vLLM's, as plain)")
    parser.add_argument("--targets", default=None,
                        help="pruned-fraction targets for the plugin, comma-separated, 'inf' for "
                             "threshold -inf (default: inf,0.5,0.72; --quick: 0.5)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiling passes")
    parser.add_argument("--profile-configs", default=None,
                        help="configs to profile, comma-separated: 'all', or any of plain, inf, "
                             "max (the highest target), a target fraction (default: plain,max; "
                             "--quick: all)")
    parser.add_argument("--profile-job", help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--calibrate-job", help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args()
    if args.profile_job:
        profile_child(args.profile_job)
        return
    if args.calibrate_job:
        calibrate_child(args.calibrate_job)
        return
    default_model = "tiny" if args.quick else "smollm2-shape"
    args.model = args.model or default_model
    model = MODELS[args.model]
    args.model_dir = args.model_dir or model["model_dir"]
    args.dtype = args.dtype or model["dtype"]
    args.load_format = model["load_format"]
    keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    if args.targets is None:
        args.targets = QUICK_TARGET_FRACTIONS if args.quick else TARGET_FRACTIONS
    else:
        args.targets = tuple(None if t.strip() in ("inf", "-inf") else float(t)
                             for t in args.targets.split(",") if t.strip())
    specs = QUICK_WORKLOADS if args.quick else WORKLOADS
    unknown = [k for k in keys if k not in specs]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {','.join(specs)}")
    try:
        args.profile_labels = profile_labels(args.profile_configs or
                                             ("all" if args.quick else "plain,max"), args.targets)
    except ValueError as e:
        parser.error(str(e))

    import torch
    import vllm

    paths = make_model(args.model, Path(args.model_dir))
    shape = model_shape(paths["model"])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"model {args.model} ({paths['model']}, {args.dtype}, load_format {args.load_format}): "
          f"{shape['layers']} layers, {shape['kv_heads']} KV heads x {shape['head_dim']}; "
          f"surrogate {paths['mlp']}; profiling: {', '.join(args.profile_labels) or 'none'}",
          flush=True)  # fmt: skip
    name = "throughput_quick" if args.quick else "throughput"
    if args.model != default_model:
        name += f"_{args.model}"
    started = time.perf_counter()
    workloads: dict = {}
    calibration_s = None

    def save(complete: bool) -> None:
        """The report so far (after each workload, so a stopped run keeps what it measured)."""
        report = dict(
            machine=dict(
                cpus=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__,
                vllm=getattr(vllm, "__version__", "?"),
            ),
            args={k: v for k, v in vars(args).items() if k not in ("profile_job", "calibrate_job")},
            model=dict(shape, name=args.model, path=str(paths["model"]),
                       surrogate=str(paths["mlp"]), dtype=args.dtype,
                       load_format=args.load_format),
            complete=complete,
            calibration_s=calibration_s,
            profile_categories=PROFILE_CATEGORIES,
            profile_totals=PROFILE_TOTALS,
            wall_s=time.perf_counter() - started,
            workloads=workloads,
        )  # fmt: skip
        (out_dir / f"{name}.json").write_text(json.dumps(jsonable(report), indent=2))

    with tempfile.TemporaryDirectory(prefix="kvzap-throughput-") as tmp:
        prepared = {key: prepare_workload(key, specs[key], shape, args) for key in keys}
        t0 = time.perf_counter()
        calibration = calibrate(paths, prepared, shape, args, Path(tmp))
        calibration_s = time.perf_counter() - t0
        for key, wl in prepared.items():
            workloads[key] = run_workload(paths, wl, calibration[key], args, Path(tmp))
            print_workload(key, workloads[key])
            save(complete=False)
    total = time.perf_counter() - started
    print("\n" + "=" * 100)
    for key, w in workloads.items():
        print_workload(key, w)
    save(complete=True)
    plot(workloads, out_dir / f"{name}.png", args.targets,
         f"model {args.model} ({args.dtype}), {os.cpu_count()} CPUs")
    print(f"\nsaved {out_dir / (name + '.json')} and {out_dir / (name + '.png')} "
          f"(whole run {total / 60:.1f} min)")  # fmt: skip

if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    main()
