"""Tensor parallelism: what taking the larger page need over ranks costs in concurrency.

Under tensor parallelism each rank holds its own KV heads' pages, and the scheduler's blocks for a
request follow the LARGEST need over the ranks (`KVzapWorkerMetadata.aggregate` in
`vllm_kvzap/connector.py` takes the max of each request's page report): when the ranks' heads are
pruned unevenly, the request costs `ranks x max` pages of memory where it holds `ranks x mean`.
This benchmark runs the same KV-bound workload twice in the same total KV memory X:

- TP=1: one worker, `kv_cache_memory_bytes=X` (both cores, `VLLM_CPU_OMP_THREADS_BIND=0-1`);
- TP=2: two workers (`distributed_executor_backend="mp"`, one core each), `X / 2` per rank (vLLM's
  `kv_cache_memory_bytes` is per worker), each rank pruning its own KV head.

Workload: the recall task's prompts (`experiments/recall/recall_task.py`, as
`benchmarks/forcing.py` builds them for the accuracy benchmark: context of facts in filler, then
`<query>`), all added at once, greedy, `ignore_eos`, `--output` free tokens each, on the committed
recall model (2 layers, 2 KV heads) with its `kvzap-mlp` surrogate, window 16, block size 16. The
threshold prunes about `--target` of the pairs: calibrated offline on the first prompts' scores
(`--threshold` overrides). X holds `--dense-requests` whole requests unpruned, so that memory, not
`max_num_seqs`, limits concurrency.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). After two warm-up
requests, the loop adds every request, calls `llm_engine.step()` and after every step samples the
scheduler (running and waiting requests, blocks in use) and, through `llm.collective_rpc`, every
rank's page table: the pages each live request holds there (`num_pages` of its slot, by request
key) and the rank's total held pages. Per sample of TP=2,

    imbalance = sum over live requests of max_rank(pages) / sum of mean_rank(pages)

(1.0: the ranks need the same; above it, the scheduler's blocks hold that many times the pages in
use, rounding aside). For TP=1 the same ratio is computed from the split of its two heads into the
halves TP=2 gives each rank: what TP=2 would pay on TP=1's trajectory. Also reported: *mean
running | waiting* (running requests averaged over the steps where others wait for memory: the
concurrency that memory allows), the share of the pages per [layer][KV head] (where an imbalance
comes from), and *pages held / block pages* (the most loaded rank's pages of the scheduler's
requests over the pages of its blocks; sampled between steps, when the shared reserve for leftover
pages has not yet grown for the next step, so it can sit a little above 1).

    python -m benchmarks.tensor_parallel_benchmark [--requests 128] [--output 128] [--target 0.5]
        [--dense-requests 8] [--model models/recall-qwen3] [--surrogate DIR] [--threshold T]
        [--out benchmarks/results]

`--model` takes any model whose vocabulary covers the recall task's token ids (302), with a KVzap
surrogate for it (`--surrogate`, default MODEL/kvzap-mlp). About a minute on 2 cores, half of it
the two engine start-ups. Timings (tok/s, step ms) are
noisy on a shared 2-core machine, and TP=2 on 2 cores (gloo all-reduces between two one-core
ranks, one `collective_rpc` per step) is not meant to be faster: the numbers to compare are the
concurrency and the imbalance, which do not depend on speed. Prints a side-by-side table and saves
`tensor_parallel.json` (per-step samples included) and `tensor_parallel.png` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path

from benchmarks import harness, report

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # scheduler in this process
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(rank_pages)

DEFAULT_MODEL = report.REPO / "models" / "recall-qwen3"
SEED_BASE = 1_700_000_000  # recall contexts held out from training, calibration and accuracy
WINDOW, BLOCK_SIZE = 16, 16
SCORE_BYTES = 4  # the plugin keeps a float32 score per slot and KV head


def make_prompts(n: int, pairs: int, filler: int) -> list[list[int]]:
    from benchmarks.forcing import query_request
    from experiments.recall.recall_task import make_example

    return [query_request(make_example(SEED_BASE + i, pairs, filler))[0] for i in range(n)]


def calibrate(model_dir: Path, surrogate_dir: Path, prompts, output: int, target: float):
    """(threshold pruning about `target` of all pairs, offline share pruned per [layer, head])."""
    scores = harness.collect_scores(model_dir, {"mlp": surrogate_dir}, prompts)["mlp"].double()
    total = sum(len(p) for p in prompts) / len(prompts) + output - 1
    judged_share = (total - WINDOW) / total  # the window is never pruned
    threshold = harness.quantile_threshold(scores, target, judged_share)
    return threshold, (scores < threshold).double().mean(1).tolist()


def rank_pages(worker) -> dict:
    """On each rank: its first KV head, its number of heads, pages held in all, pages of the live
    requests per [layer][local head], and per live request (by key, a block id the ranks share)
    its pages per [layer][local head]."""
    from vllm_kvzap.attention.runtime import get_runtime

    runtime = get_runtime()
    table = runtime.pages
    live = (table.requests.req_key >= 0).nonzero().flatten()
    pages = table.rows.num_pages[:, live, :].permute(1, 0, 2).tolist()  # [live, L, H]
    return {
        "first_head": runtime.heads.first if runtime.heads else 0,
        "heads": table.num_heads,
        "layer_head": table.rows.num_pages[:, live, :].sum(1).tolist(),  # [L, local heads]
        "held": table.pool.capacity - table.num_free,
        "pages": dict(zip(table.requests.req_key[live].tolist(), pages)),
    }


def imbalance(per_rank: list[dict[int, list[int]]]) -> float | None:
    """sum_k max_r pages / sum_k mean_r pages over the requests live on every rank."""
    keys = set.intersection(*(set(r) for r in per_rank))
    most = sum(max(r[k] for r in per_rank) for k in keys)
    mean = sum(sum(r[k] for r in per_rank) / len(per_rank) for k in keys)
    return most / mean if mean else None


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def sample(tp: int, ranks: list[dict], keys: set[int], blocks: int) -> tuple[dict, list]:
    """One step's numbers from the ranks' page tables (`rank_pages`), the keys of the requests
    the scheduler holds blocks for, and its blocks in use; and the live requests' pages per
    [layer][KV head of the model]."""
    per_layer_head = [[x for r in ranks for x in r["layer_head"][layer]]
                      for layer in range(len(ranks[0]["layer_head"]))]  # fmt: skip
    # each request's pages on each rank (TP=1: on each half of its heads, as TP=2 splits them)
    if tp == 1:
        h = max(1, ranks[0]["heads"] // 2)
        split = [{k: sum(sum(layer[first:first + h]) for layer in p)
                  for k, p in ranks[0]["pages"].items()} for first in (0, h)]  # fmt: skip
    else:
        split = [{k: sum(map(sum, p)) for k, p in r["pages"].items()} for r in ranks]
    # the worker frees a finished request's pages at the next step, the scheduler its blocks at
    # once: compare the blocks with the pages of the requests that hold them
    owned = max(sum(sum(map(sum, p)) for k, p in r["pages"].items() if k in keys) for r in ranks)
    pages_per_block = len(per_layer_head) * ranks[0]["heads"]  # on each rank
    live = [set(x) for x in split]
    return dict(
        blocks=blocks, held=[r["held"] for r in ranks], imbalance=rounded(imbalance(split)),
        rank_pages=[sum(x.values()) for x in split],
        # the most loaded rank's pages of the scheduler's requests / the pages its blocks give it
        block_use=rounded(owned / (blocks * pages_per_block) if blocks else None),
        unmatched=len(set.union(*live) - set.intersection(*live)),  # live on one rank only
    ), per_layer_head  # fmt: skip


def run(args, prompts, tp: int, kv_bytes: int, threshold: float, stats_path: Path) -> dict:
    from vllm import SamplingParams

    from vllm_kvzap.stats import wait_for_stats

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if tp == 2 else "0-1"
    stats_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with harness.engine(
        model=str(args.model), dtype="float32", seed=0, block_size=BLOCK_SIZE,
        max_model_len=max(map(len, prompts)) + args.output + BLOCK_SIZE,
        max_num_seqs=len(prompts), max_num_batched_tokens=4096, enable_prefix_caching=False,
        kv_cache_memory_bytes=kv_bytes // tp, tensor_parallel_size=tp,
        distributed_executor_backend="mp" if tp > 1 else "uni",
        additional_config={"kv_pruning": harness.kvzap(args.surrogate, WINDOW, threshold,
                                                        stats_path)},
    ) as llm:  # fmt: skip
        print(f"TP={tp}: engine up in {time.perf_counter() - t0:.0f} s", flush=True)
        engine = llm.llm_engine
        scheduler = engine.engine_core.engine_core.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        (manager,) = scheduler.kv_cache_manager.coordinator.single_type_managers  # KVzap's
        num_blocks = pool.num_gpu_blocks - 1  # the null block
        params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
        # warm-up (the first prompt and decoding steps of an engine are slow): two requests
        llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)
        for i, p in enumerate(prompts):
            engine.add_request(f"tp-{i}", {"prompt_token_ids": p}, params)
        samples, step_s, tokens = [], 0.0, 0
        heads = None  # pages summed over samples and requests, per [layer][KV head of the model]
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            step_s += dt
            tokens += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
            ranks = sorted(llm.collective_rpc(rank_pages), key=lambda r: r["first_head"])
            keys = {b[0].block_id for b in manager.req_to_blocks.values() if b}
            x, now = sample(tp, ranks, keys, num_blocks - pool.get_num_free_blocks())
            samples.append(dict(step_ms=round(1e3 * dt, 2), running=len(scheduler.running),
                                waiting=len(scheduler.waiting), **x))  # fmt: skip
            heads = now if heads is None else [
                [a + b for a, b in zip(u, v)] for u, v in zip(heads, now)]  # fmt: skip
            if len(samples) % 50 == 0:
                x = samples[-1]
                print(f"  TP={tp} step {len(samples):4d}: running {x['running']:2d} waiting "
                      f"{x['waiting']:2d} blocks {x['blocks']}/{num_blocks} imbalance "
                      f"{x['imbalance'] or float('nan'):.3f}", flush=True)  # fmt: skip
        wall = time.perf_counter() - t0
        for _ in range(3):  # finished requests are reported one step later
            engine.step()
        stats = wait_for_stats(stats_path, len(prompts) + 2)
        stats = [x for x in stats if x["request_id"].startswith("tp-")]
    stats_path.unlink(missing_ok=True)
    result = summarize(tp, samples, wall, step_s, tokens, num_blocks, stats)
    result["pages_per_layer_head"] = heads  # summed over samples and live requests
    return result


def summarize(tp, samples, wall, step_s, tokens, num_blocks, stats) -> dict:
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    running = [s["running"] for s in samples]
    bound = [s["running"] for s in samples if s["waiting"]]  # while others wait for memory
    imb = [s["imbalance"] for s in samples]
    held_ratio = [max(s["held"]) / mean(s["held"]) for s in samples if tp > 1 and sum(s["held"])]
    return dict(
        tp=tp, steps=len(samples), wall_s=round(wall, 1), step_s=round(step_s, 1),
        output_tokens=tokens, tok_s=round(tokens / step_s, 1), kv_blocks=num_blocks,
        peak_running=max(running), mean_running=mean(running), mean_running_waiting=mean(bound),
        waiting_steps=len(bound), imbalance_mean=mean(imb),
        imbalance_max=max((x for x in imb if x is not None), default=None),
        median_step_ms=sorted(s["step_ms"] for s in samples)[len(samples) // 2],
        held_max_over_mean=mean(held_ratio), held_max_over_mean_max=max(held_ratio, default=None),
        pruned_fraction=mean([s["pruned_fraction"] for s in stats]),
        block_use_mean=mean([s["block_use"] for s in samples]),
        block_use_max=max((s["block_use"] for s in samples if s["block_use"]), default=None),
        unmatched_max=max(s["unmatched"] for s in samples),
        rank_pages_mean=[mean([s["rank_pages"][r] for s in samples]) for r in range(2)],
        samples={k: [s[k] for s in samples] for k in samples[0]},  # per step, by column
    )  # fmt: skip


def table(runs: list[dict]) -> str:
    rows = [
        ("KV blocks (same bytes)", "kv_blocks", "{:d}"),
        ("pruned fraction", "pruned_fraction", "{:.3f}"),
        ("steps", "steps", "{:d}"),
        ("peak running", "peak_running", "{:d}"),
        ("mean running", "mean_running", "{:.2f}"),
        ("mean running | waiting", "mean_running_waiting", "{:.2f}"),
        ("steps with waiting", "waiting_steps", "{:d}"),
        ("wall s (incl. sampling)", "wall_s", "{:.1f}"),
        ("output tok/s (step time)", "tok_s", "{:.1f}"),
        ("median step ms", "median_step_ms", "{:.1f}"),
        ("imbalance mean", "imbalance_mean", "{:.3f}"),
        ("imbalance max", "imbalance_max", "{:.3f}"),
        ("held pages max/mean rank", "held_max_over_mean", "{:.3f}"),
        ("  (its max over steps)", "held_max_over_mean_max", "{:.3f}"),
        ("requests on one rank only", "unmatched_max", "{:d}"),
        ("pages held / block pages", "block_use_mean", "{:.3f}"),
        ("  (its max over steps)", "block_use_max", "{:.3f}"),
    ]
    head = [f"TP={r['tp']}" for r in runs]
    lines = [f"{'':26}" + "".join(f"{h:>19}" for h in head)]
    for label, key, fmt in rows:
        cells = ["-" if r[key] is None else fmt.format(r[key]) for r in runs]
        lines.append(f"{label:26}" + "".join(f"{c:>19}" for c in cells))
    lines.append("(TP=1's imbalance: its pages split by head halves, as TP=2 would split them)")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    plt = report.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for r in runs:
        label = f"TP={r['tp']} (mean {r['mean_running_waiting']:.1f} while others wait)"
        ax1.plot(r["samples"]["running"], label=label)
        imb = [math.nan if x is None else x for x in r["samples"]["imbalance"]]
        ax2.plot(imb, "-" if r["tp"] == 2 else ":",
                 label="TP=2" if r["tp"] == 2 else "TP=1, its heads split as TP=2")  # fmt: skip
    ax1.set_ylabel("running requests")
    ax1.legend()
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_ylabel("sum max_rank / sum mean_rank")
    ax2.set_xlabel("engine step")
    ax2.legend()
    ax1.set_title("same total KV memory: TP=1 vs TP=2 (scheduler follows the max over ranks)",
                  fontsize=10)  # fmt: skip
    report.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--surrogate", type=Path, default=None, help="default: MODEL/kvzap-mlp")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--output", type=int, default=128, help="output tokens per request")
    ap.add_argument("--pairs", type=int, default=16, help="facts per recall context")
    ap.add_argument("--filler", type=int, default=16, help="filler pieces per recall context")
    ap.add_argument("--target", type=float, default=0.5, help="pruned fraction to calibrate for")
    ap.add_argument("--threshold", type=float, default=None, help="skip calibration")
    ap.add_argument("--dense-requests", type=int, default=8,
                    help="total KV memory X in whole unpruned requests")  # fmt: skip
    ap.add_argument("--out", type=Path, default=report.REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.surrogate = args.surrogate or args.model / "kvzap-mlp"
    t_start = time.perf_counter()

    prompts = make_prompts(args.requests, args.pairs, args.filler)
    lengths = [len(p) for p in prompts]
    head_pruned = None
    if args.threshold is None:
        args.threshold, head_pruned = calibrate(args.model, args.surrogate, prompts[:8],
                                                args.output, args.target)  # fmt: skip
    shape = harness.model_shape(args.model)
    L, H, D = shape["layers"], shape["kv_heads"], shape["head_dim"]
    block_bytes = L * H * BLOCK_SIZE * (2 * D * 4 + SCORE_BYTES)  # float32 K, V + the score
    dense_blocks = -(-(max(lengths) + args.output) // BLOCK_SIZE)
    kv_bytes = args.dense_requests * dense_blocks * block_bytes
    print(f"{args.requests} recall prompts of {min(lengths)}..{max(lengths)} tokens + "
          f"{args.output} output; threshold {args.threshold:.3f} (target {args.target}); "
          f"KV memory {kv_bytes / 2**20:.2f} MiB in all ({args.dense_requests} dense requests)",
          flush=True)  # fmt: skip
    if head_pruned:
        print("offline share of prompt pairs below the threshold, [layer][head]: "
              + str([[round(x, 3) for x in layer] for layer in head_pruned]))  # fmt: skip

    args.out.mkdir(parents=True, exist_ok=True)
    stats_path = args.out / ".tensor_parallel_stats.jsonl"
    runs = [run(args, prompts, tp, kv_bytes, args.threshold, stats_path) for tp in (1, 2)]
    text = table(runs)
    print(text)
    tp1, tp2 = runs
    print(f"concurrency TP=2 / TP=1 in the same memory: mean running "
          f"{tp2['mean_running'] / tp1['mean_running']:.3f}, while others wait "
          f"{tp2['mean_running_waiting'] / tp1['mean_running_waiting']:.3f}; TP=2 pages per rank "
          f"(mean over steps) {[round(x, 1) for x in tp2['rank_pages_mean']]}")  # fmt: skip
    for r in runs:
        total = sum(map(sum, r["pages_per_layer_head"]))
        r["page_share_per_layer_head"] = [[round(x / total, 3) for x in layer]
                                          for layer in r["pages_per_layer_head"]]  # fmt: skip
        print(f"TP={r['tp']}: share of the live requests' pages per [layer][KV head] "
              f"(all steps): {r['page_share_per_layer_head']}")  # fmt: skip

    result = dict(
        command=report.command("tensor_parallel_benchmark", argv),
        model=report.shown(args.model), surrogate=report.shown(args.surrogate), requests=args.requests,
        prompt_tokens=[min(lengths), max(lengths)], output_tokens=args.output, window=WINDOW,
        block_size=BLOCK_SIZE, threshold=args.threshold, target=args.target,
        offline_pruned_per_layer_head=head_pruned, kv_bytes_total=kv_bytes, table=text,
        total_s=round(time.perf_counter() - t_start), runs=runs,
    )  # fmt: skip
    # lists of numbers on one line each (JSON strings hold no raw newline: only lists match)
    text = re.sub(r"\[\n\s*([^][{}\"]*?)\n\s*\]", lambda m: f"[{' '.join(m[1].split())}]",
                  json.dumps(result, indent=1))  # fmt: skip
    (args.out / "tensor_parallel.json").write_text(text + "\n")
    plot(runs, args.out / "tensor_parallel.png")
    print(f"wrote {args.out / 'tensor_parallel.json'} and {args.out / 'tensor_parallel.png'} "
          f"({time.perf_counter() - t_start:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
