"""The README's main job: build the tiny model and its surrogates, run an offline batch in vLLM
with KVzap pruning on, and print what was pruned (per request and per layer).

    python -m tools.demo [--method kvzap-mlp] [--threshold -4] [--window 128] [--out .cache/tiny]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

PROMPT_TOPICS = [
    "the history of the printing press and how it changed the way people shared ideas",
    "how a river shapes the valley around it over thousands of years",
    "the rules of chess, the way each piece moves, and a short opening",
    "why the sky looks blue during the day and red at sunset",
]


def build_prompts(tokenizer, min_tokens: int) -> list[str]:
    prompts = []
    for topic in PROMPT_TOPICS:
        body = f"Please write about {topic}. "
        while len(tokenizer(body)["input_ids"]) < min_tokens:
            body += f"Think again about {topic}, step by step, and add detail. "
        messages = [{"role": "user", "content": body}]
        prompts.append(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/tiny", help="where the tiny model is built")
    parser.add_argument("--method", default="kvzap-mlp", choices=["kvzap-mlp", "kvzap-linear"])
    parser.add_argument("--threshold", type=float, default=-4.0)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from tools.make_tiny_model import make_tiny_model
    from vllm_kvzap.stats import wait_for_stats

    paths = make_tiny_model(Path(args.out))
    kind = args.method.removeprefix("kvzap-")
    stats_path = Path(args.out) / "stats.jsonl"
    stats_path.unlink(missing_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    prompts = build_prompts(tokenizer, args.prompt_tokens)
    llm = LLM(
        model=str(paths["model"]),
        dtype="float32",
        max_model_len=4096,
        kv_cache_memory_bytes=256 * 2**20,
        block_size=32,
        additional_config={
            "kv_pruning": {
                "method": args.method,
                "threshold": args.threshold,
                "window": args.window,
                "surrogate": str(paths[kind]),
                "stats_path": str(stats_path),
            }
        },
    )
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling)
    elapsed = time.perf_counter() - start
    stats = {s["request_id"]: s for s in wait_for_stats(stats_path, len(prompts))}

    print(f"\nKVzap pruning: {args.method}, threshold {args.threshold:g}, window {args.window}")
    print(f"{'request':>8} {'prompt':>7} {'output':>7} {'pruned':>7} {'KV KiB':>8} {'vLLM KiB':>9}"
          "  per layer")
    for out in outputs:
        s = stats.get(out.request_id)
        if s is None:
            print(f"{out.request_id:>8}  (no statistics line)")
            continue
        per_layer = " ".join(f"{f:.2f}" for f in s["pruned_fraction_per_layer"])
        print(
            f"{out.request_id:>8} {s['num_prompt_tokens']:>7} {s['num_output_tokens']:>7} "
            f"{s['pruned_fraction']:>7.3f} {s['resident_kv_bytes_end'] / 1024:>8.0f} "
            f"{s['dense_kv_bytes'] / 1024:>9.0f}  [{per_layer}]"
        )
    if stats:
        mean = sum(s["pruned_fraction"] for s in stats.values()) / len(stats)
        held = sum(s["resident_kv_bytes_end"] for s in stats.values())
        dense = sum(s["dense_kv_bytes"] for s in stats.values())
        print(f"mean pruned fraction {mean:.3f} over {len(stats)} requests; KV memory held at the "
              f"end {held / 2**20:.2f} MiB vs {dense / 2**20:.2f} MiB in plain vLLM")
    total_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{total_out} tokens generated in {elapsed:.1f} s; statistics in {stats_path}")
    print(f"sample output: {outputs[0].outputs[0].text[:120]!r}")
    llm.llm_engine.engine_core.shutdown()  # before exit, so the client sees an orderly shutdown


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    main()
