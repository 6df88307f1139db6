"""Target-ratio mode through vLLM (kvpress's AdaKVPress(KVzapPress), paged mode), against the
independent plain-torch reference (`reference_dms.dms_generate(..., ratio=R, alpha=A)`, whose
decisions come from `reference_adakv.py`, not from the plugin).

At the end of the prompt each layer prunes its lowest-scoring pairs over all KV heads together,
every head keeping its `n_safe` best; generated tokens are never pruned. Checked for prompts of
several lengths, whole and in chunks: greedy tokens and log-probabilities equal the reference
that masks the same pairs, pruned pairs per layer equal its masks exactly, and the memory each
request holds follows `(1 - R)` of its prompt (the page layout rule applied to the reference's
masks). The same engines serve a batch of per-request ratios (`extra_args["kv_pruning"]`; the
intake: `test_request_options.py`): each request gets the reference's result at its own ratio as an
engine-level option, and its statistics line records the value it used.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch

from tests.reference_dms import assert_output_equals, dms_generate
from vllm_kvzap.config import KVPruningConfig
from vllm_kvzap.request_options import request_value
from vllm_kvzap.stats import wait_for_stats

RATIO, ALPHA = 0.6, 0.2
BLOCK_SIZE = 32
MAX_TOKENS = 24
PROMPT_LENS = (1, 7, 90, 260)
PER_REQUEST_LENS = (150, 90, 200, 120, 60)
PER_REQUEST_VALUES = (None, 0.3, "none", {"ratio": 0.8}, 0.45)
PER_REQUEST_TOKENS = 20


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(10, 900, (n,), generator=g).tolist() for n in PROMPT_LENS]


def per_request_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(10, 900, (n,), generator=g).tolist() for n in PER_REQUEST_LENS]


def per_request_ratios() -> list[float | None]:
    """Each request's own ratio as the engine reads it (None: the engine's)."""
    config = KVPruningConfig.from_dict({"method": "kvzap-mlp", "ratio": RATIO, "alpha": ALPHA})
    return [request_value(None if v is None else {"kv_pruning": v}, config)
            for v in PER_REQUEST_VALUES]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return [
        dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], p, MAX_TOKENS,
                     ratio=RATIO, alpha=ALPHA)  # fmt: skip
        for p in prompts()
    ]


@pytest.fixture(scope="module")
def per_request_reference(tiny_model_dir):
    return [
        dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], p, PER_REQUEST_TOKENS,
                     ratio=RATIO if v is None else v, alpha=ALPHA)
        for p, v in zip(per_request_prompts(), per_request_ratios())
    ]


@pytest.fixture(scope="module", params=["whole", "chunked"])
def run(request, tiny_model_dir, tmp_path_factory):
    from vllm import LLM, SamplingParams

    stats_path = tmp_path_factory.mktemp("ratio") / "stats.jsonl"
    chunked = request.param == "chunked"
    llm = LLM(
        model=str(tiny_model_dir["model"]),
        dtype="float32",
        max_model_len=1024,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=64 * 2**20,
        seed=0,
        enforce_eager=True,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=48 if chunked else None,
        additional_config={"kv_pruning": {
            "method": "kvzap-mlp", "ratio": RATIO, "alpha": ALPHA,
            "surrogate": str(tiny_model_dir["mlp"]), "stats_path": str(stats_path),
        }},
    )  # fmt: skip
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1)
    each = [SamplingParams(max_tokens=PER_REQUEST_TOKENS, temperature=0.0, ignore_eos=True,
                           logprobs=1, extra_args=None if v is None else {"kv_pruning": v})
            for v in PER_REQUEST_VALUES]  # fmt: skip
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
        stats = {s["request_id"]: s for s in wait_for_stats(stats_path, len(outs))}
        # then a batch of per-request ratios
        outs_each = llm.generate([{"prompt_token_ids": p} for p in per_request_prompts()], each,
                                 use_tqdm=False)  # fmt: skip
        lines = wait_for_stats(stats_path, len(outs) + len(outs_each))
        stats_each = {s["request_id"]: s for s in lines if s["request_id"] not in stats}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return outs, stats, (outs_each, stats_each)


def test_tokens_and_logprobs_equal_the_reference(run, reference):
    outs, _, _ = run
    for out, ref in zip(outs, reference):
        got = out.outputs[0]
        assert list(got.token_ids) == ref["output_ids"]
        for tok, lp, logits in zip(got.token_ids, got.logprobs, ref["logits"]):
            want = float(torch.log_softmax(logits.double(), dim=-1)[tok])
            assert abs(lp[tok].logprob - want) < 1e-3


def test_pruned_pairs_equal_the_rule_exactly(run, reference):
    outs, stats, _ = run
    for out, ref, n in zip(outs, reference, PROMPT_LENS):
        s = stats[out.request_id]
        assert s["pruned_pairs_per_layer"] == [int(m.sum()) for m in ref["pruned_mask"]]
        for m in ref["pruned_mask"]:  # [H, n]: only prompt pairs, H * (T - n_kept) per layer
            n_kept = max(1, int(n * (1 - RATIO)))
            assert int(m.sum()) == m.shape[0] * (n - n_kept)
            assert not m[:, n:].any()
        assert s["rule"] == "ratio" and s["ratio"] == RATIO and s["alpha"] == ALPHA


def test_memory_follows_the_ratio(run, reference):
    outs, stats, _ = run
    positions = None
    for out, ref, n in zip(outs, reference, PROMPT_LENS):
        s = stats[out.request_id]
        num_kv = ref["num_kv_tokens"]
        positions = torch.arange(num_kv)
        pages = 0
        for m in ref["pruned_mask"]:  # each row holds its kept pairs (and the last token)
            seen = (positions >= num_kv - 1) | ~m
            pages += int((-(-seen.sum(dim=1) // BLOCK_SIZE)).sum())
        assert s["resident_kv_pages_end"] == pages
    longest = stats[outs[-1].request_id]
    # 260 prompt tokens at R = 0.6 keep 104 + 23 generated per row: 4 pages, not 9
    assert longest["resident_kv_pages_end"] <= 0.5 * longest["dense_kv_pages"]


def test_stats_line_is_json_with_the_rule(run):
    _, stats, _ = run
    for s in stats.values():
        json.dumps(s)
        assert "threshold" not in s


def test_per_request_ratios_equal_engine_level_ones(run, per_request_reference):
    _, _, (outs, stats) = run
    for out, ref, value in zip(outs, per_request_reference, per_request_ratios(), strict=True):
        assert_output_equals(out.outputs[0], ref, value)
        s = stats[out.request_id]
        assert s["pruned_pairs_per_layer"] == [int(m.sum()) for m in ref["pruned_mask"]], value
        assert s["ratio"] == (RATIO if value is None else value)
        assert s.get("per_request", False) == (value is not None)
    assert stats[outs[2].request_id]["pruned_fraction"] == 0.0  # "none"
