"""The README's main job: SmolLM2-135M-Instruct in vLLM with KVzap pruning and its bundled
surrogate; each prompt is answered twice in one batch, pruned and unpruned (a per-request
``"none"``), and the answers are printed side by side with the pruned fraction and KV memory.

    python -m tools.demo [--method kvzap-mlp] [--threshold T] [--window 128]

The model is converted by ``tools/setup_env.sh`` (``tools/smollm2.py``, into
``.cache/SmolLM2-135M-Instruct``); ``--kv-pruning-surrogate`` is not needed: the plugin finds the
surrogate bundled for this model (``vllm_kvzap/surrogates``).
"""

from __future__ import annotations

import argparse
import logging
import os
import textwrap
import time
from pathlib import Path

from tools.smollm2 import DEFAULT_DIR

# The converted model is stored in float32 (the GGUF's values, losslessly) and served in bfloat16:
# vLLM warns once per weight tensor about that cast (~120 lines before the answers). Exactly that
# warning is dropped. At module level, so that vLLM's engine and worker processes, which import
# this module again when they start, drop it too.
logging.getLogger("vllm.model_executor.models.utils").addFilter(
    lambda record: not record.getMessage().startswith("Attempted to load weight")
)

DEFAULT_THRESHOLD = -4.0  # the plugin default; about half of the judged pairs with the bundled MLP
PASSAGE = (
    "The printing press was invented in Mainz around 1440 by Johannes Gutenberg, a goldsmith. "
    "Before it, books were copied by hand, mostly in monasteries, and a single Bible could take "
    "a scribe more than a year. Gutenberg combined movable metal type, an oil-based ink and a "
    "wooden screw press adapted from wine making. His workshop printed about 180 copies of the "
    "Bible by 1455. Within fifty years presses were running in more than two hundred European "
    "cities and had produced some twenty million volumes. Cheaper books spread literacy, helped "
    "scientists share results quickly and exactly, and carried the pamphlets of the Reformation. "
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def prompts() -> list[str]:
    history = PASSAGE * 3
    hidden = FILLER * 12 + "The pass key is 68213. Remember it. 68213 is the pass key. " + FILLER * 12
    return [
        history + "\n\nWho invented the printing press, where, and when?",
        history + "\n\nSummarise the text above in two sentences.",
        history + "\n\nHow many copies of the Bible had Gutenberg's workshop printed by 1455?",
        "There is important info hidden inside a lot of irrelevant text. Find it and memorise "
        "it. " + hidden + "\n\nWhat is the pass key? Answer with the number only.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--method", default="kvzap-mlp",
                        choices=["kvzap-mlp", "kvzap-linear", "knorm", "random", "window"])
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"no model at {args.model}: run `bash tools/setup_env.sh` first")

    from vllm import LLM, SamplingParams

    from vllm_kvzap.stats import wait_for_stats

    stats_path = Path(".cache") / "demo_stats.jsonl"
    stats_path.unlink(missing_ok=True)
    pruning = {"method": args.method, "window": args.window, "stats_path": str(stats_path)}
    if args.method != "window":
        pruning["threshold"] = args.threshold
    llm = LLM(
        model=str(args.model), dtype=args.dtype, max_model_len=4096, seed=0,
        kv_cache_memory_bytes=512 * 2**20, enforce_eager=True,
        additional_config={"kv_pruning": pruning},
    )  # fmt: skip
    texts = prompts()
    conversations = [[{"role": "user", "content": t}] for t in texts]
    pruned = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    unpruned = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                              extra_args={"kv_pruning": "none"})  # fmt: skip
    start = time.perf_counter()
    outs = llm.chat(conversations * 2, [pruned] * len(texts) + [unpruned] * len(texts),
                    use_tqdm=False)  # fmt: skip
    elapsed = time.perf_counter() - start
    stats = {s["request_id"]: s for s in wait_for_stats(stats_path, len(outs))}
    llm.llm_engine.engine_core.shutdown()  # before exit, so the client sees an orderly shutdown

    rule = pruning.get("threshold", "-")
    print(f"\nKVzap pruning: {args.method}, threshold {rule}, window {args.window}, model "
          f"{args.model.name} ({args.dtype}); each prompt answered pruned and unpruned\n")  # fmt: skip
    width = 58
    held = dense = 0
    for i, text in enumerate(texts):
        a, b = outs[i], outs[i + len(texts)]
        s = stats.get(a.request_id, {})
        held += s.get("resident_kv_bytes_end", 0)
        dense += s.get("dense_kv_bytes", 0)
        question = text.rsplit("\n\n", 1)[-1]
        print(f"[{i + 1}] {s.get('num_prompt_tokens', '?')} prompt tokens; ...{question[-70:]!r}")
        print(f"    pruned {s.get('pruned_fraction', float('nan')):.2f} of KV pairs, KV held "
              f"{s.get('resident_kv_bytes_end', 0) / 2**20:.2f} MiB vs "
              f"{s.get('dense_kv_bytes', 0) / 2**20:.2f} MiB unpruned")  # fmt: skip
        left = textwrap.wrap(" ".join(a.outputs[0].text.split()), width) or [""]
        right = textwrap.wrap(" ".join(b.outputs[0].text.split()), width) or [""]
        print(f"    {'pruned answer':<{width}} | unpruned answer")
        for k in range(max(len(left), len(right))):
            l_ = left[k] if k < len(left) else ""
            r_ = right[k] if k < len(right) else ""
            print(f"    {l_:<{width}} | {r_}")
        print()
    mean = sum(stats[o.request_id]["pruned_fraction"] for o in outs[: len(texts)]) / len(texts)
    print(f"mean pruned fraction {mean:.3f}; KV memory held at the end {held / 2**20:.2f} MiB vs "
          f"{dense / 2**20:.2f} MiB unpruned; {len(outs)} requests in {elapsed:.1f} s; "
          f"statistics in {stats_path}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    main()
