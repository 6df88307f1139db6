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
perf_counter timers around the functions named in `benchmarks/profiling.py`'s
`PROFILE_CATEGORIES` (exclusive time: a timed function nested in another is charged to its own
category only). Functions that do not exist (the code moves) are skipped with a printed note.
`PROFILE_TOTALS` gives the step total (`EngineCore.step`), so "rest" = step - scoring handoff -
bookkeeping - attention, for the plugin and for plain vLLM alike. The surrogate itself runs
inside the compiled model graph, so its time is part of "rest" (the model's forward) and is not
separable by wrapping: the scoring category ("handoff") times only the hand-off of the scores
(`save_scores`, `layer_scores`).

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
import json
import math
import os
import platform
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

from benchmarks import harness, report
from benchmarks.profiling import PROFILE_CATEGORIES, PROFILE_TOTALS, run_profile

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


# ---------------------------------------------------------------------------------------------
# Models. smollm2-shape: SmolLM2-135M-Instruct's architecture (config.json only) with vLLM's
# random `load_format="dummy"` weights in bf16 and a random KVzap MLP surrogate in the published
# format (hidden D/8 = 72, like NVIDIA's); no tokenizer (the prompts are token ids). tiny: the
# test suite's model (`tools.make_tiny_model`, real float32 weights, its own MLP surrogate).
MODELS: dict[str, dict] = {
    "smollm2-shape": dict(model_dir=".cache/bench/smollm2-shape", dtype="bfloat16",
                          load_format="dummy"),
    "tiny": dict(model_dir=".cache/tiny", dtype="float32", load_format="auto"),
}  # fmt: skip


def make_model(name: str, model_dir: Path) -> dict[str, Path]:
    if name == "tiny":
        from tools.make_tiny_model import make_tiny_model

        return make_tiny_model(model_dir)
    config = harness.SMOLLM2_SHAPE_CONFIG
    return harness.make_shape(config, model_dir, config["hidden_size"] // 8)


# ---------------------------------------------------------------------------------------------
# Threshold calibration, in-engine: the plugin's own scores (the surrogate inside the compiled
# model, on the model's hidden states), collected from `PruningRuntime.save_scores` in an
# in-process engine at threshold -inf. One engine for every workload: at -inf nothing is pruned,
# so the scores do not depend on the window or the KV budget.


def thresholds_from_scores(judged, total_pairs: int, fractions, window: int):
    """Thresholds whose pruned fraction, as the plugin counts it, is about each target: `judged`
    holds the scores of the pairs older than the window at the end of their request, and a
    fraction is pruned pairs / (H_kv x tokens whose KV was computed) = pruned / total_pairs."""
    notes, thresholds = [], []
    for f in fractions:
        if f is None:
            thresholds.append(float("-inf"))
            continue
        share = judged.numel() / total_pairs
        if f >= share:
            notes.append(f"target {f} is out of reach with window {window} (at most "
                         f"{share:.3f} judged): using the 0.999 quantile")  # fmt: skip
        thresholds.append(harness.quantile_threshold(judged.double(), f, share))
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

    from vllm import SamplingParams

    t0 = time.perf_counter()
    with harness.engine(**job["engine"], distributed_executor_backend="uni") as llm:
        out = dict(startup_s=time.perf_counter() - t0, workloads={})
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
    out["wall_s"] = time.perf_counter() - t0
    Path(job["result_path"]).write_text(json.dumps(report.jsonable(out), indent=2))


def calibrate(paths, workloads: dict, shape: dict, args, tmp: Path) -> dict:
    """Thresholds per workload (None for all when no target needs one)."""
    if all(t is None for t in args.targets):
        return {k: dict(thresholds=[float("-inf")] * len(args.targets), notes=[])
                for k in workloads}  # fmt: skip
    longest = max(workloads.values(), key=lambda w: w["max_model_len"])
    max_len = longest["max_model_len"]
    bytes_per_token = longest["bytes_per_token"]
    engine_wl = dict(max_model_len=max_len,
                     kv_bytes=(2 * max_len + harness.SLACK_TOKENS) * bytes_per_token)  # fmt: skip
    pruning = harness.kvzap(paths["mlp"], longest["window"])
    job = dict(
        engine=harness.engine_kwargs(paths, engine_wl, pruning, args),
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
    status, out = harness.run_child(["benchmarks.throughput_benchmark", "--calibrate-job",
                                     str(job_path)], job["result_path"])  # fmt: skip
    if out is None:
        raise RuntimeError(f"calibration child exited with status {status}")
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
# Driver


def prepare_workload(key: str, spec: dict, shape: dict, args) -> dict:
    wl = dict(spec, key=key)
    lo, hi = wl["output_len"]
    wl.setdefault("max_model_len", wl["prompt_len"] + hi)
    bytes_per_token = harness.kv_bytes_per_token(shape, args.dtype)
    wl["bytes_per_token"] = bytes_per_token
    full = wl["prompt_len"] + hi
    wl["kv_bytes"] = (wl["kv_requests"] * full + harness.SLACK_TOKENS) * bytes_per_token
    seed = 1000 * (ord(key) - ord("a"))
    wl["prompts"] = harness.make_prompts(wl["num_requests"], wl["prompt_len"], seed)
    wl["output_lens"] = harness.make_output_lens(wl["num_requests"], (lo, hi), seed)
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
            r, outs = harness.run_config(paths, wl, label, pruning,
                                         tmp / f"stats_{wl['key']}.jsonl", args)  # fmt: skip
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
        pruning = harness.kvzap(paths["mlp"], wl["window"], tau)
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
        thresholds={label_for(t): report.jsonable(tau) for t, tau in zip(args.targets, thresholds)},
        calibration_notes=notes,
        calibration={k: v for k, v in calibration.items() if k not in ("thresholds", "notes")},
        results=[{k: report.jsonable(v) for k, v in r.items()} for r in results],
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
    plt = report.pyplot()
    if plt is None:
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
    report.save_figure(fig, path, dpi=120)


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
    parser.add_argument("--calibrate-job", help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args()
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
    shape = harness.model_shape(paths["model"])
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
        data = dict(
            machine=dict(
                cpus=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__,
                vllm=getattr(vllm, "__version__", "?"),
            ),
            args={k: v for k, v in vars(args).items() if k != "calibrate_job"},
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
        report.save_json(out_dir / f"{name}.json", data, indent=2)

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
