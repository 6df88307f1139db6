"""End to end through vLLM's offline `LLM`, against independent references.

Paged mode (the default) everywhere, plus one engine in mask mode.

- threshold -inf: tokens equal plain vLLM's (plugin off), token for token;
- threshold -4: tokens, log-probabilities and per-layer pruned pairs equal the plain-torch DMS
  reference (`reference_dms.py`, which masks pruned pairs explicitly), for prompts shorter and
  longer than the window and across many decoding steps, with and without chunked prefill.
One engine at a time (module-scoped, shut down after generating): start-up costs ~40 s.
"""

from __future__ import annotations

import gc

import pytest
import torch

from tests.reference_dms import dms_generate
from vllm_kvzap.stats import wait_for_stats

WINDOW = 16
MAX_TOKENS = 40
PROMPT_LENS = (9, 40, 150)  # shorter than the window, and longer


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 900, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_engine(tiny, tmp_path_factory, pruning: dict | None, **engine_kwargs) -> dict:
    """Generate greedily for `prompts()` in one engine, then shut it down."""
    from vllm import LLM, SamplingParams

    stats_path = tmp_path_factory.mktemp("stats") / "stats.jsonl"
    additional = {}
    if pruning is not None:
        additional = {"kv_pruning": {**pruning, "stats_path": str(stats_path)}}
    llm = LLM(
        model=str(tiny["model"]),
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=64 * 2**20,
        seed=0,
        additional_config=additional,
        **engine_kwargs,
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
        stats = {}
        if pruning is not None:
            stats = {s["request_id"]: s for s in wait_for_stats(stats_path, len(outs))}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return {"results": greedy_results(outs, stats), "num_stats": len(stats)}


def greedy_results(outs, stats: dict) -> list[dict]:
    """Tokens, their log-probabilities and the statistics line of each request's output."""
    results = []
    for out in outs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)]
        results.append({"tokens": tokens, "logprobs": logprobs, "stats": stats.get(out.request_id)})
    return results


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tmp_path_factory):
    return run_engine(tiny_model_dir, tmp_path_factory, pruning=None)


@pytest.fixture(scope="module")
def pruned_inf(tiny_model_dir, tmp_path_factory):
    pruning = {"method": "kvzap-mlp", "threshold": "-inf", "window": WINDOW,
               "surrogate": str(tiny_model_dir["mlp"])}  # fmt: skip
    return run_engine(tiny_model_dir, tmp_path_factory, pruning)


@pytest.fixture(scope="module")
def pruned_mlp(tiny_model_dir, tmp_path_factory):
    pruning = {"method": "kvzap-mlp", "threshold": -4, "window": WINDOW,
               "surrogate": str(tiny_model_dir["mlp"])}  # fmt: skip
    return run_engine(tiny_model_dir, tmp_path_factory, pruning)


@pytest.fixture(scope="module")
def pruned_mlp_mask(tiny_model_dir, tmp_path_factory):
    pruning = {"method": "kvzap-mlp", "threshold": -4, "window": WINDOW, "mode": "mask",
               "surrogate": str(tiny_model_dir["mlp"])}  # fmt: skip
    return run_engine(tiny_model_dir, tmp_path_factory, pruning)


@pytest.fixture(scope="module")
def pruned_linear_chunked(tiny_model_dir, tmp_path_factory):
    # 32-token budget per step: the 40- and 150-token prompts are prefilled in several chunks.
    pruning = {"method": "kvzap-linear", "threshold": -4, "window": WINDOW,
               "surrogate": str(tiny_model_dir["linear"])}  # fmt: skip
    return run_engine(
        tiny_model_dir, tmp_path_factory, pruning,
        enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4,
    )  # fmt: skip


def test_minus_inf_threshold_matches_plain_vllm(baseline, pruned_inf):
    for base, pruned in zip(baseline["results"], pruned_inf["results"]):
        assert pruned["tokens"] == base["tokens"]
        assert pruned["logprobs"] == pytest.approx(base["logprobs"], abs=1e-3)
        assert pruned["stats"]["pruned_fraction"] == 0.0


def check_against_reference(
    run: dict, tiny, kind: str, max_tokens: int = MAX_TOKENS
) -> list[float]:
    fractions = []
    for prompt, result in zip(prompts(), run["results"]):
        ref = dms_generate(tiny["model"], tiny[kind], prompt, max_tokens, -4.0, WINDOW)
        assert result["tokens"] == ref["output_ids"], f"prompt of {len(prompt)} tokens"
        ref_logprobs = [
            torch.log_softmax(ref["logits"][i], -1)[t].item()
            for i, t in enumerate(result["tokens"])
        ]
        assert result["logprobs"] == pytest.approx(ref_logprobs, abs=1e-3)

        stats = result["stats"]
        assert stats["num_prompt_tokens"] == len(prompt)
        assert stats["num_output_tokens"] == max_tokens
        assert stats["num_kv_tokens"] == ref["num_kv_tokens"] == len(prompt) + max_tokens - 1
        ref_pairs = [int(m.sum()) for m in ref["pruned_mask"]]
        # equal up to float noise in scores that sit exactly at the threshold
        assert all(abs(a - b) <= 1 for a, b in zip(stats["pruned_pairs_per_layer"], ref_pairs))
        assert stats["pruned_fraction_per_layer"] == pytest.approx(
            ref["pruned_fraction_per_layer"], abs=2e-3
        )
        assert stats["pruned_fraction"] == pytest.approx(
            sum(stats["pruned_fraction_per_layer"]) / len(stats["pruned_fraction_per_layer"])
        )
        fractions.append(stats["pruned_fraction"])
    return fractions


def test_mlp_pruning_equals_reference(pruned_mlp, tiny_model_dir):
    fractions = check_against_reference(pruned_mlp, tiny_model_dir, "mlp")
    assert max(fractions) > 0.2  # pruning really happened


def test_mask_mode_equals_reference_and_paged_mode(pruned_mlp_mask, pruned_mlp, tiny_model_dir):
    check_against_reference(pruned_mlp_mask, tiny_model_dir, "mlp")
    for masked, paged in zip(pruned_mlp_mask["results"], pruned_mlp["results"]):
        assert masked["tokens"] == paged["tokens"]  # same decisions, only memory differs
        assert masked["stats"]["pruned_pairs_per_layer"] == paged["stats"]["pruned_pairs_per_layer"]


def test_linear_pruning_with_chunked_prefill_equals_reference(pruned_linear_chunked, tiny_model_dir):
    fractions = check_against_reference(pruned_linear_chunked, tiny_model_dir, "linear")
    assert max(fractions) > 0.2


def test_pruning_changes_outputs(baseline, pruned_mlp):
    # the masks are applied in vLLM's attention, not only counted
    assert any(
        b["tokens"] != p["tokens"] for b, p in zip(baseline["results"], pruned_mlp["results"])
    )


def test_one_statistics_line_per_request(pruned_mlp):
    assert pruned_mlp["num_stats"] == len(PROMPT_LENS)
    required = {"request_id", "num_prompt_tokens", "num_output_tokens",
                "pruned_fraction_per_layer", "pruned_fraction"}  # fmt: skip
    for result in pruned_mlp["results"]:
        assert required <= set(result["stats"])
        assert len(result["stats"]["pruned_fraction_per_layer"]) == 4
