"""GPU smoke check: does the plugin start and serve correctly on vLLM as a GPU owner runs it?

    python -m benchmarks.gpu_smoke [--out benchmarks/results/gpu_smoke] [--num-requests 64]

For one NVIDIA GPU (sized for under 5 minutes on an H100: two engine start-ups of a Qwen3-8B-shaped
dummy model and a few hundred steps). vLLM at its own defaults: Model Runner V2, torch.compile,
CUDA graphs (FULL_AND_PIECEWISE; the plugin's backend serves them as piecewise), block size 16.
1. plain vLLM serves `num_requests` greedy requests (`prompt_len` prompt, `output_len` outputs,
   top-2 log-probabilities); the KV budget holds them all (this is a correctness check, not a
   throughput one: `benchmarks.gpu_benchmark` measures throughput).
2. one plugin engine (`kvzap-mlp`, window 128, a random surrogate in NVIDIA's published shape,
   engine threshold -inf) serves the same requests at -inf, then calibrates a per-request
   threshold for ~0.7 pruned (one request per grid threshold) and serves them at it.
Verdict checks, each printed:
- `-inf` agrees with plain vLLM: per request, tokens equal up to the first near-tie of plain's
  top-2 log-probabilities (bf16 batch effects may flip those), log-probabilities before it within
  `--logprob-atol`;
- pruning is active: the mean pruned fraction at the calibrated threshold is >= 0.5 (target - 0.2);
- no page leaks: after the batches, every page of the worker's pool is free or held by a live
  request, every batch slot free or live, and at most one request (the last, a one-token probe
  that releases the batches' requests) is live (read on the worker through `collective_rpc`);
- which runner and CUDA-graph mode ran (read on the worker).
One verdict line last: `SMOKE PASS ...` or `SMOKE FAIL ...` (exit status 1). JSON under `--out`.
`check_smoke` is the same flow on any platform (the test suite runs it on CPU with the test model).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks import harness, report
from benchmarks.gpu_benchmark import CALIBRATION_GRID, WINDOW

TARGET = 0.7


def worker_state(worker) -> dict:
    """Runs on each worker (`LLM.collective_rpc`): which runner and graph mode serve, and the page
    table's pools (None without pruning)."""
    from vllm_kvzap.attention.runtime import get_runtime

    runner = worker.model_runner
    config = runner.vllm_config.compilation_config
    state = dict(
        runner=f"{type(runner).__module__}.{type(runner).__name__}",
        model_runner_v2=".worker.gpu." in type(runner).__module__
        or ".worker.cpu." in type(runner).__module__,
        cudagraph_mode=str(config.cudagraph_mode),
        compilation_mode=str(config.mode),
    )
    runtime = get_runtime()
    pages = runtime.pages if runtime is not None else None
    if pages is not None:
        live = slice(0, pages.max_reqs)  # the last request index is a dump for masked writes
        state.update(
            free_pages=pages.num_free, held_pages=int(pages.rows.num_pages[:, live].sum()),
            capacity=pages.pool.capacity, free_slots=len(pages.requests.free),
            max_slots=pages.max_reqs,
            live=int((pages.requests.req_key[live] >= 0).sum()),
        )  # fmt: skip
    return state


def generate(llm, prompts, output_len: int, extra_args=None) -> list[dict]:
    """Greedy tokens and, per position, plain's top-2 log-probabilities {token: logprob}."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, logprobs=2,
                            extra_args=extra_args)  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    results = []
    for out in outs:
        c = out.outputs[0]
        top = [{t: lp.logprob for t, lp in pos.items()} for pos in c.logprobs]
        results.append(dict(request_id=out.request_id, tokens=list(c.token_ids), top=top))
    return results


def generate_each(llm, prompts, output_len: int, thresholds) -> list[dict]:
    """Greedy generation, each request with its own threshold."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                             extra_args={"kv_pruning": t}) for t in thresholds]  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [dict(request_id=o.request_id, tokens=list(o.outputs[0].token_ids)) for o in outs]


def agreement(plain: list[dict], other: list[dict], tie_nats: float, atol: float) -> dict:
    """Whether `other` equals `plain` up to bf16 effects: per request, tokens equal until the
    first position where plain's top-2 log-probabilities are within `tie_nats` (a near-tie may
    flip), and the chosen tokens' log-probabilities before that within `atol`."""
    identical = bad = 0
    worst = 0.0
    for p, o in zip(plain, other):
        if p["tokens"] == o["tokens"]:
            identical += 1
        n = next((i for i, (a, b) in enumerate(zip(p["tokens"], o["tokens"])) if a != b), None)
        upto = len(p["tokens"]) if n is None else n
        for i in range(upto):
            t = p["tokens"][i]
            worst = max(worst, abs(p["top"][i][t] - o["top"][i].get(t, float("-inf"))))
        if n is not None:
            gap = sorted(p["top"][n].values(), reverse=True)
            if len(gap) > 1 and gap[0] - gap[1] > tie_nats:
                bad += 1
    return dict(requests=len(plain), identical=identical, diverged_without_tie=bad,
                max_logprob_diff=worst, ok=bad == 0 and worst <= atol)  # fmt: skip


def check_smoke(engine: dict, surrogate: str, prompts, output_len: int, stats_path: Path,
                tie_nats: float = 0.2, atol: float = 0.1, grid=CALIBRATION_GRID,
                target: float = TARGET, window: int = WINDOW) -> dict:  # fmt: skip
    """Plain vLLM, then the plugin at -inf and at a calibrated threshold, with the checks."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(worker_state)
    report: dict = {}
    t0 = time.perf_counter()
    with harness.engine(**engine) as llm:
        report["plain_engine"] = llm.collective_rpc(worker_state)[0]
        plain = generate(llm, prompts, output_len)
    report["plain_s"] = time.perf_counter() - t0

    stats_path.unlink(missing_ok=True)
    pruning = harness.kvzap(surrogate, window, stats_path=stats_path)
    t1 = time.perf_counter()
    with harness.engine(**engine, additional_config={"kv_pruning": pruning}) as llm:
        report["plugin_engine"] = llm.collective_rpc(worker_state)[0]
        at_inf = generate(llm, prompts, output_len)
        # calibration: one request per grid threshold (per-request values), then the target's
        calib = harness.calibrate_on_grid(llm, prompts[0], output_len, grid, [target], stats_path,
                                          lines_before=len(prompts))  # fmt: skip
        fractions, (threshold,), notes = calib["fractions"], calib["thresholds"], calib["notes"]
        pruned = generate_each(llm, prompts, output_len, [threshold] * len(prompts))
        lines = harness.stats_by_id(stats_path, 2 * len(prompts) + len(grid))
        pruned_fraction = sum(lines[r["request_id"]]["pruned_fraction"] for r in pruned) / len(pruned)
        inf_fraction = max(lines[r["request_id"]]["pruned_fraction"] for r in at_inf)
        # requests are released on the worker with the step after they finish: one more request
        # releases the batch's; only that one may still hold pages when the pools are read
        generate(llm, [prompts[0][:8]], 1)
        pools = llm.collective_rpc(worker_state)[0]
    report["plugin_s"] = time.perf_counter() - t1
    agree = agreement(plain, at_inf, tie_nats, atol)
    leaks = {k: pools[k] for k in ("free_pages", "held_pages", "capacity", "free_slots",
                                   "max_slots", "live")}  # fmt: skip
    report.update(
        agreement_at_inf=agree,
        pruned_fraction_at_inf=inf_fraction,
        calibration=dict(grid=grid, fractions=fractions, threshold=threshold, notes=notes),
        pruned_fraction=pruned_fraction,
        pools_after=leaks,
    )
    checks = {
        "-inf agrees with plain vLLM": agree["ok"] and inf_fraction == 0.0,
        f"pruning active (p={pruned_fraction:.2f} >= {target - 0.2:.2f})": (
            pruned_fraction >= target - 0.2
        ),
        # every page is free or held by a live request, every slot free or live, and at most
        # the last probe request is live
        "no page leaks": leaks["free_pages"] + leaks["held_pages"] == leaks["capacity"]
        and leaks["free_slots"] + leaks["live"] == leaks["max_slots"] and leaks["live"] <= 1,
    }
    report["checks"] = checks
    report["passed"] = all(checks.values())
    return report


def verdict_line(report: dict) -> str:
    e = report["plugin_engine"]
    runner = "Model Runner V2" if e["model_runner_v2"] else "Model Runner V1"
    failed = [name for name, ok in report["checks"].items() if not ok]
    head = "SMOKE PASS" if report["passed"] else "SMOKE FAIL (" + "; ".join(failed) + ")"
    a = report["agreement_at_inf"]
    return (f"{head}: {runner} ({e['runner']}), cudagraph {e['cudagraph_mode']}; -inf: "
            f"{a['identical']}/{a['requests']} identical, max |dlogprob| "
            f"{a['max_logprob_diff']:.3f}; p={report['pruned_fraction']:.2f} at threshold "
            f"{report['calibration']['threshold']:.2f}; pages free after: "
            f"{report['pools_after']['free_pages']}/{report['pools_after']['capacity']}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_smoke")
    parser.add_argument("--model-dir", default=".cache/bench/qwen3-8b-shape")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--logprob-atol", type=float, default=0.1)
    args = parser.parse_args(argv)
    harness.require_gpu("gpu_smoke")
    harness.require_cuda_vllm("gpu_smoke")
    paths = harness.make_shape(harness.QWEN3_8B_CONFIG, Path(args.model_dir),
                               harness.QWEN3_8B_SURROGATE_HIDDEN)  # fmt: skip
    prompts = harness.make_prompts(args.num_requests, args.prompt_len, seed=0)
    engine = dict(model=str(paths["model"]), dtype="bfloat16", load_format="dummy",
                  skip_tokenizer_init=True, max_model_len=args.prompt_len + args.output_len + 16,
                  seed=0)  # fmt: skip (vLLM's defaults for everything else)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = check_smoke(engine, str(paths["mlp"]), prompts, args.output_len,
                         out / "gpu_smoke_stats.jsonl", atol=args.logprob_atol)  # fmt: skip
    result.update(wall_s=time.perf_counter() - t0, command=" ".join(sys.argv))
    report.save_json(out / "gpu_smoke.json", result, indent=2)
    for name, ok in result["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    print(verdict_line(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
