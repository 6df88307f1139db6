"""Answer accuracy vs KV pruned fraction on the recall task: KVzap against simple baselines, in vLLM.

The committed recall model (``models/recall-qwen3``, trained by
``experiments/recall/train_recall_model``) reads a context of key-value facts in redundant filler;
the prompt ends with ``<query>`` and the questions are asked during *decoding*: a logits processor
(``benchmarks/forcing.py``) forces ``? k17`` and lets the model answer the value greedily, query
after query. DMS prefill is dense, so the answers are produced against the pruned cache, as in a
chat whose question follows a long document. Every method runs on the same DMS
machinery (window of ``--window`` recent tokens never pruned) through vLLM with the plugin:

- ``kvzap-mlp`` / ``kvzap-linear``: the model's surrogates (``models/recall-qwen3/kvzap-*``), trained
  with ``training/train_surrogate`` on KVzip+ targets;
- ``knorm`` (largest key norms pruned), ``random``, and ``window`` (sinks + recent window only).

Thresholds are calibrated offline on held-out calibration contexts to target pruned fractions (score
quantiles for ``kvzap-*`` / ``knorm``, the exact quantile for ``random``, the window size for
``window``); the x axis is the fraction the plugin measured. Prints a table (accuracy and measured
pruned fraction per target) and saves JSON and a plot::

    python -m benchmarks.accuracy_benchmark [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks import harness, report
from benchmarks.forcing import ForcedTokens, query_request
from experiments.recall.recall_task import Example, make_example

METHODS = ("kvzap-mlp", "kvzap-linear", "knorm", "random", "window")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
EVAL_SEED_BASE = 1_500_000_000  # held out from model training (< 1e9 / 1e9..) and surrogates (2e9..)
CALIB_SEED_BASE = 1_600_000_000
DEFAULT_MODEL = report.REPO / "models" / "recall-qwen3"


def answer_hits(ex: Example, output_ids: list[int]) -> list[bool]:
    return [
        4 * i + 2 < len(output_ids) and output_ids[4 * i + 2] == ans
        for i, ans in enumerate(ex.answers)
    ]


# --------------------------------------------------------------------------------------------------
# Calibration (offline, on contexts disjoint from the evaluation ones)
# --------------------------------------------------------------------------------------------------


ROLES = ("sink", "key", "value", "filler", "punct")  # BOS; a fact's key / value token; the rest


def token_roles(ex: Example) -> list[str]:
    """Role of every prompt token of ``query_request(ex)``: BOS, context, ``<query>``."""
    roles = []
    for j, kind in enumerate(ex.kinds):  # a fact reads "k17 v42 ;": fact, fact, punct
        first = kind == "fact" and (j == 0 or ex.kinds[j - 1] != "fact")
        roles.append(("key" if first else "value") if kind == "fact" else kind)
    return ["sink", *roles, "punct"]


def collect_scores(model_dir: Path, examples: list[Example]):
    """Per method, the scores ``[layers, prompt tokens of all examples, KV heads]`` of ``examples``'
    prompts (as the plugin computes them in a dense prefill), and each token's role."""
    surrogates = {k: model_dir / k for k in ("kvzap-mlp", "kvzap-linear")
                  if (model_dir / k / "config.json").is_file()}  # fmt: skip
    prompts = [query_request(ex)[0] for ex in examples]
    # k_norm's output is the key before RoPE, which keeps norms: the plugin's knorm score is -||k||
    scores = harness.collect_scores(model_dir, surrogates, prompts, knorm_keys="k_norm")
    return scores, [role for ex in examples for role in token_roles(ex)]


def pruned_by_role(scores: torch.Tensor, roles: list[str], threshold: float) -> dict:
    """Per layer, the share of each role's prompt pairs scoring below ``threshold`` (offline: the
    window is ignored)."""
    below = scores < threshold  # [L, T, H]
    out = {}
    for layer in range(below.shape[0]):
        out[f"layer {layer}"] = {
            r: round(below[layer, [x == r for x in roles]].float().mean().item(), 3)
            for r in ROLES if r in roles
        }  # fmt: skip
    return out


def calibrate(method: str, fraction: float, scores, judged_share: float, total_len: float,
              sinks: int) -> dict:
    """Plugin options whose pruned fraction is about ``fraction``."""
    if method == "window":  # keeps sinks + window of ``total_len`` tokens
        return {"window": max(1, round((1 - fraction) * total_len) - sinks), "sinks": sinks}
    return harness.threshold_options(method, fraction, scores, judged_share)


# --------------------------------------------------------------------------------------------------
# One configuration through vLLM
# --------------------------------------------------------------------------------------------------


def engine_args(model, examples, additional_config: dict | None = None) -> dict:
    """A vLLM engine's arguments sized for ``examples``' query requests, with the forcing logits
    processor."""
    longest = max(len(p) + len(f) for p, f in map(query_request, examples))
    return dict(
        model=str(model),
        dtype="float32",
        max_model_len=longest + 32,
        block_size=32,
        max_num_seqs=64,
        kv_cache_memory_bytes=128 * 2**20,
        enable_prefix_caching=False,
        seed=0,
        logits_processors=[ForcedTokens],
        additional_config=additional_config or {},
    )


def generate_answers(llm, examples, with_request_ids: bool = False):
    """Output token ids per example: the forced questions and the model's greedy answers (and the
    request ids, which key the plugin's statistics lines)."""
    from vllm import SamplingParams

    requests = [query_request(ex) for ex in examples]
    params = [
        SamplingParams(temperature=0.0, max_tokens=len(f), ignore_eos=True,
                       extra_args={"forced_tokens": f})
        for _, f in requests
    ]  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return (tokens, [o.request_id for o in outs]) if with_request_ids else tokens


def run_point(args, examples, pruning: dict | None, stats_path: Path) -> dict:
    from vllm_kvzap.stats import wait_for_stats

    additional = {}
    if pruning is not None:
        stats_path.unlink(missing_ok=True)
        additional = {"kv_pruning": {**pruning, "stats_path": str(stats_path)}}
    with harness.engine(**engine_args(args.model, examples, additional)) as llm:
        start = time.perf_counter()
        outputs = generate_answers(llm, examples)
        elapsed = time.perf_counter() - start
    hits = [answer_hits(ex, out) for ex, out in zip(examples, outputs)]
    n = sum(len(h) for h in hits)
    result = {"accuracy": sum(map(sum, hits)) / n, "answers": n, "generate_s": round(elapsed, 2),
              "pruned_fraction": 0.0}  # fmt: skip
    if pruning is not None:
        stats = wait_for_stats(stats_path, len(examples))
        if len(stats) != len(examples):
            raise RuntimeError(f"{len(stats)} statistics lines for {len(examples)} requests")
        result["pruned_fraction"] = sum(s["pruned_fraction"] for s in stats) / len(stats)
    return result


def print_table(results: dict) -> str:
    """Rows: target pruned fraction; cells: answer accuracy (pruned fraction the plugin measured)."""
    methods = list(results["methods"])
    head = "target  " + "".join(f"{m:>16}" for m in methods)
    base = f"{results['baseline']['accuracy']:.3f} (0.00)"
    lines = [head, "-" * len(head), "0 (off) " + "".join(f"{base:>16}" for _ in methods)]
    targets = sorted({p["target"] for pts in results["methods"].values() for p in pts})
    for t in targets:
        cells = []
        for m in methods:
            p = next((p for p in results["methods"][m] if p["target"] == t), None)
            cell = "-" if p is None else f"{p['accuracy']:.3f} ({p['pruned_fraction']:.2f})"
            cells.append(f"{cell:>16}")
        lines.append(f"{t:<8.2f}" + "".join(cells))
    text = "\n".join(lines)
    print(text)
    return text


def plot(results: dict, path: Path) -> None:
    plt = report.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    base = results["baseline"]
    for m, points in results["methods"].items():
        pts = sorted([(0.0, base["accuracy"])] + [(p["pruned_fraction"], p["accuracy"])
                                                  for p in points])  # fmt: skip
        ax.plot(*zip(*pts), "o-", ms=4, label=m, lw=2.2 if m.startswith("kvzap") else 1.3)
    ax.set_xlabel("KV pairs pruned (fraction, measured by the plugin)")
    ax.set_ylabel("answer accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"recall task through vLLM + vllm-kvzap (window {results['window']}, "
                 f"{results['answers']} answers per point)", fontsize=10)  # fmt: skip
    report.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=report.REPO / "benchmarks" / "results")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--contexts", type=int, default=100, help="evaluation contexts")
    ap.add_argument("--calib-contexts", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--filler", type=int, default=16)
    ap.add_argument("--window", type=int, default=16, help="DMS window (never pruned)")
    ap.add_argument("--sinks", type=int, default=4, help="sink tokens of the window method")
    ap.add_argument("--quick", action="store_true", help="3 fractions, 24 contexts")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.quick:
        fractions, args.contexts = [0.3, 0.6, 0.9], 24
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m.startswith("kvzap") and not (args.model / m / "config.json").is_file():
            raise SystemExit(f"{m}: no surrogate at {args.model / m} (train it: training/TRAINING.md)")
    args.out.mkdir(parents=True, exist_ok=True)

    examples = [make_example(EVAL_SEED_BASE + i, args.pairs, args.filler)
                for i in range(args.contexts)]  # fmt: skip
    calib = [make_example(CALIB_SEED_BASE + i, args.pairs, args.filler)
             for i in range(args.calib_contexts)]  # fmt: skip
    total_len = sum(len(query_request(e)[0]) + 4 * len(e.query_keys) - 1 for e in examples)
    total_len /= len(examples)
    judged_share = (total_len - args.window) / total_len
    print(f"{len(examples)} contexts, {args.pairs} pairs each, about {total_len:.0f} KV tokens per "
          f"request; calibrating on {len(calib)} other contexts")  # fmt: skip
    scores, roles = collect_scores(args.model, calib)

    stats_path = args.out / "accuracy_stats.jsonl"
    t0 = time.perf_counter()
    baseline = run_point(args, examples, None, stats_path)
    print(f"plain vLLM: accuracy {baseline['accuracy']:.3f}")
    results = {"model": report.shown(args.model),
               "window": args.window, "pairs": args.pairs, "filler": args.filler,
               "contexts": args.contexts, "answers": baseline["answers"],
               "mean_kv_tokens": round(total_len, 1), "baseline": baseline, "methods": {}}  # fmt: skip
    for m in methods:
        results["methods"][m] = []
        for f in fractions:
            opts = calibrate(m, f, scores, judged_share, total_len, args.sinks)
            pruning = {"method": m, "window": args.window, **opts}
            if m.startswith("kvzap"):
                pruning["surrogate"] = str(args.model / m)
            point = {"target": f, **opts, **run_point(args, examples, pruning, stats_path)}
            if m in scores:  # why: which pairs a threshold method drops (calibration contexts)
                point["offline_pruned_by_role"] = pruned_by_role(scores[m], roles,
                                                                 opts["threshold"])
            results["methods"][m].append(point)
            print(f"{m:>13} target {f:.2f}: pruned {point['pruned_fraction']:.3f} "
                  f"accuracy {point['accuracy']:.3f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)  # fmt: skip
    stats_path.unlink(missing_ok=True)
    results["table"] = print_table(results)
    results["command"] = report.command("accuracy_benchmark", argv)
    report.save_json(args.out / "accuracy.json", results)
    plot(results, args.out / "accuracy.png")
    print(f"wrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
