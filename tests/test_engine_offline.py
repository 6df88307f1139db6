"""End to end through vLLM's offline `LLM`, against independent references.

Four engines, one at a time (module-scoped, each shut down once it has generated; a start-up costs
~40 s compiled, ~20 s eager, on 2 cores):
- `pruned_mlp`: kvzap-mlp, threshold -4, window 16, paged mode (the default), under vLLM's default
  compilation in a fresh `VLLM_CACHE_ROOT` (the inductor code it generated is read back);
- `pruned_mlp_eager`: the same options with `enforce_eager=True`, then a batch of per-request
  thresholds and bad per-request values;
- `pruned_mlp_mask`: the same options in mask mode;
- `pruned_linear_chunked`: kvzap-linear with chunked prefill (32-token steps).
Checked:
- threshold -4: tokens, log-probabilities and per-layer pruned pairs equal the plain-torch DMS
  reference (`reference_dms.py`, which masks pruned pairs explicitly), for prompts shorter and
  longer than the window and across many decoding steps, with and without chunked prefill, for the
  MLP and the linear surrogate; mask mode makes the same decisions as paged mode;
- threshold -inf, per request, beside the same prompts at the engine's -4 in one batch: the
  unpruned reference's tokens and log-probabilities (the plain model), nothing pruned; pruning at
  -4 changes the outputs. The plugin at -inf against plain vLLM itself (plugin off), token for
  token: `test_gpu_benchmark.py`'s smoke flow (engine-level -inf) and `test_smollm2.py` (`"none"`
  per request, on the real model);
- compilation: the engine is not forced into eager mode, and the inductor code it generated calls
  the scoring op `vllm_kvzap::save_scores` once per layer, in place on the buffer the layer's
  projections then read, before that layer's attention op; its tokens and per-layer pruned pairs
  equal the eager engine's exactly (the op without an engine: `test_compile.py`);
- per-request thresholds (`SamplingParams.extra_args["kv_pruning"]`; the intake's forms and
  refusals without an engine: `test_request_options.py`): requests with different values in one
  batch produce the tokens, log-probs and pruned pairs of the reference at that threshold as an
  engine-level option, and their statistics lines record the value each one used; a bad value is a
  `ValueError` naming the key at `generate`, after which the engine still serves.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.engine_harness import offline_engine
from tests.reference_dms import assert_output_equals, dms_generate
from vllm_kvzap.config import KVPruningConfig
from vllm_kvzap.request_options import request_value
from vllm_kvzap.stats import wait_for_stats

WINDOW = 16
THRESHOLD = -4.0
MAX_TOKENS = 40
PROMPT_LENS = (9, 40, 150)  # shorter than the window, and longer


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 900, (n,), generator=g).tolist() for n in PROMPT_LENS]


def sampling(value=None, max_tokens: int = MAX_TOKENS, logprobs: int | None = 1):
    """Greedy, `max_tokens` long; `value`: the request's own `extra_args["kv_pruning"]`."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          logprobs=logprobs,
                          extra_args=None if value is None else {"kv_pruning": value})  # fmt: skip


def llm_kwargs(tiny, stats_path, pruning: dict | None, **engine_kwargs) -> dict:
    additional = {}
    if pruning is not None:
        additional = {"kv_pruning": {**pruning, "stats_path": str(stats_path)}}
    return dict(model=str(tiny["model"]), dtype="float32", max_model_len=1024,
                kv_cache_memory_bytes=64 * 2**20, seed=0, additional_config=additional,
                **engine_kwargs)  # fmt: skip


def generate_prompts(llm, stats_path, pruning: dict | None, per_request=None) -> dict:
    """Greedy generation for `prompts()` at the engine's options (`results`) and, with
    `per_request`, for the same prompts once more in the same batch, each request with that value
    of its own (`per_request`)."""
    values = [None] * len(PROMPT_LENS)
    if per_request is not None:
        values += [per_request] * len(PROMPT_LENS)
    requests = prompts() * (len(values) // len(PROMPT_LENS))
    outs = llm.generate([{"prompt_token_ids": p} for p in requests], [sampling(v) for v in values])
    stats = {}
    if pruning is not None:
        stats = {s["request_id"]: s for s in wait_for_stats(stats_path, len(outs))}
    results = greedy_results(outs, stats)
    n = len(PROMPT_LENS)
    return {"results": results[:n], "per_request": results[n:], "num_stats": len(stats)}


def run_engine(tiny, tmp_path_factory, pruning: dict | None, per_request=None,
               **engine_kwargs) -> dict:  # fmt: skip
    """`generate_prompts` in one engine, then shut it down."""
    stats_path = tmp_path_factory.mktemp("stats") / "stats.jsonl"
    with offline_engine(**llm_kwargs(tiny, stats_path, pruning, **engine_kwargs)) as llm:
        return generate_prompts(llm, stats_path, pruning, per_request)


def greedy_results(outs, stats: dict) -> list[dict]:
    """Tokens, their log-probabilities and the statistics line of each request's output."""
    results = []
    for out in outs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)]
        results.append({"tokens": tokens, "logprobs": logprobs, "stats": stats.get(out.request_id)})
    return results


# ------------------------------------------------------------------ per-request thresholds (eager)

PER_REQUEST_LENS = (150, 90, 200, 120, 60)
PER_REQUEST_VALUES = (None, -2.5, "none", {"threshold": -6.0}, -3.0)
PER_REQUEST_TOKENS = 20
BAD_VALUES = ("low", {"ratio": 0.5}, float("nan"))


def per_request_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(10, 900, (n,), generator=g).tolist() for n in PER_REQUEST_LENS]


def serve_per_request_batch(llm, stats_path, lines_before: int) -> dict:
    """One batch, each request with its own value; the bad values at intake; then one request
    more (the engine serves on)."""
    prompts_ = [{"prompt_token_ids": p} for p in per_request_prompts()]
    params = [sampling(v, PER_REQUEST_TOKENS) for v in PER_REQUEST_VALUES]
    outs = llm.generate(prompts_, params, use_tqdm=False)
    lines = wait_for_stats(stats_path, lines_before + len(outs))
    stats = {s["request_id"]: s for s in lines}
    refusals = {}
    for bad in BAD_VALUES:
        with pytest.raises(ValueError) as e:
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], sampling(bad, 2, None), use_tqdm=False)
        refusals[repr(bad)] = str(e.value)
    after = llm.generate(prompts_[:1], sampling(None, PER_REQUEST_TOKENS, None), use_tqdm=False)
    return {"outs": outs, "stats": stats, "refusals": refusals, "after": after}


# ---------------------------------------------------------------------------------------- engines


def mlp_pruning(tiny, **options) -> dict:
    return {"method": "kvzap-mlp", "threshold": THRESHOLD, "window": WINDOW,
            "surrogate": str(tiny["mlp"]), **options}  # fmt: skip


@pytest.fixture(scope="module")
def pruned_mlp(tiny_model_dir, tmp_path_factory):
    # vLLM keeps its AOT-compile artifacts and inductor's output code under VLLM_CACHE_ROOT
    # (read by the engine processes, which inherit the environment): a fresh root per run means
    # a fresh compile, and the generated code can be read back.
    cache_root = tmp_path_factory.mktemp("vllm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CACHE_ROOT", str(cache_root))
        run = run_engine(tiny_model_dir, tmp_path_factory, mlp_pruning(tiny_model_dir),
                         per_request="-inf")  # fmt: skip
    sources = [p.read_text() for p in cache_root.rglob("*.py")]
    return {**run, "inductor_code": [s for s in sources if "torch.ops.vllm_kvzap.save_scores" in s]}


@pytest.fixture(scope="module")
def pruned_mlp_eager(tiny_model_dir, tmp_path_factory):
    # the same batch as `pruned_mlp`'s (compiled == eager compares like with like), then more
    stats_path = tmp_path_factory.mktemp("stats_eager") / "stats.jsonl"
    pruning = mlp_pruning(tiny_model_dir)
    kwargs = llm_kwargs(tiny_model_dir, stats_path, pruning, enforce_eager=True)
    with offline_engine(**kwargs) as llm:
        run = generate_prompts(llm, stats_path, pruning, per_request="-inf")
        run["per_request_batch"] = serve_per_request_batch(llm, stats_path, run["num_stats"])
    return run


@pytest.fixture(scope="module")
def pruned_mlp_mask(tiny_model_dir, tmp_path_factory):
    pruning = mlp_pruning(tiny_model_dir, mode="mask")
    return run_engine(tiny_model_dir, tmp_path_factory, pruning)


@pytest.fixture(scope="module")
def pruned_linear_chunked(tiny_model_dir, tmp_path_factory):
    # 32-token budget per step: the 40- and 150-token prompts are prefilled in several chunks.
    pruning = {"method": "kvzap-linear", "threshold": THRESHOLD, "window": WINDOW,
               "surrogate": str(tiny_model_dir["linear"])}  # fmt: skip
    return run_engine(
        tiny_model_dir, tmp_path_factory, pruning,
        enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ tests


def test_minus_inf_threshold_matches_the_unpruned_model(pruned_mlp, tiny_model_dir):
    assert len(pruned_mlp["per_request"]) == len(PROMPT_LENS)
    for prompt, result in zip(prompts(), pruned_mlp["per_request"]):
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, MAX_TOKENS,
                           float("-inf"), WINDOW)  # fmt: skip
        assert not any(m.any() for m in ref["pruned_mask"])  # the plain model
        assert_result_equals(result, ref, f"prompt of {len(prompt)} tokens")
        stats = result["stats"]
        assert stats["per_request"] and stats["threshold"] == float("-inf")  # the value was used
        assert stats["pruned_pairs_per_layer"] == [0] * 4 and stats["pruned_fraction"] == 0.0


def assert_result_equals(result: dict, ref: dict, context: str) -> None:
    """A `greedy_results` entry against a `dms_generate` result: the same tokens, log-probs
    within 1e-3."""
    assert result["tokens"] == ref["output_ids"], context
    ref_logprobs = [
        torch.log_softmax(ref["logits"][i], -1)[t].item() for i, t in enumerate(result["tokens"])
    ]
    assert result["logprobs"] == pytest.approx(ref_logprobs, abs=1e-3), context


def check_against_reference(
    run: dict, tiny, kind: str, max_tokens: int = MAX_TOKENS
) -> list[float]:
    fractions = []
    for prompt, result in zip(prompts(), run["results"]):
        ref = dms_generate(tiny["model"], tiny[kind], prompt, max_tokens, -4.0, WINDOW)
        assert_result_equals(result, ref, f"prompt of {len(prompt)} tokens")

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


def test_pruning_changes_outputs(pruned_mlp):
    # the masks are applied in vLLM's attention, not only counted: the same prompts at -4 and
    # (per request) at -inf, in one batch
    assert any(
        p["tokens"] != u["tokens"] for p, u in zip(pruned_mlp["results"], pruned_mlp["per_request"])
    )


def test_one_statistics_line_per_request(pruned_mlp):
    assert pruned_mlp["num_stats"] == 2 * len(PROMPT_LENS)  # engine-level and per-request -inf
    required = {"request_id", "num_prompt_tokens", "num_output_tokens",
                "pruned_fraction_per_layer", "pruned_fraction"}  # fmt: skip
    for result in pruned_mlp["results"] + pruned_mlp["per_request"]:
        assert required <= set(result["stats"])
        assert len(result["stats"]["pruned_fraction_per_layer"]) == 4


# ------------------------------------------------------------------------------------ compilation


def test_scoring_runs_inside_the_compiled_graph_before_each_attention(pruned_mlp):
    assert len(pruned_mlp["inductor_code"]) == 1, "expected one inductor graph calling the op"
    code = pruned_mlp["inductor_code"][0]
    # The wrapper's `call` runs its lines in order. Per layer: the op, in place on the buffer
    # that holds the self-attention input, then a read of that same buffer (the projection),
    # then the attention op. A copy (auto_functionalized not reinplaced) would show as a clone.
    events, scored = [], None
    for line in code[code.index("def call(") :].splitlines():
        if m := re.search(r"torch\.ops\.vllm_kvzap\.save_scores\.default\((\w+), \w+, (\d+)\)", line):
            events.append(f"score {m[2]}")
            scored = m[1]
        elif "torch.ops.vllm.unified_attention_with_output.default(" in line:
            events.append("attention")
        elif scored is not None and re.search(rf"\(.*\b{scored}\b", line):
            events.append("read")
            scored = None
    assert events == [e for layer in range(4) for e in (f"score {layer}", "read", "attention")]
    assert "clone" not in code


def test_compiled_equals_eager(pruned_mlp, pruned_mlp_eager):
    fractions = []
    for comp, eag in zip(pruned_mlp["results"] + pruned_mlp["per_request"],
                         pruned_mlp_eager["results"] + pruned_mlp_eager["per_request"],
                         strict=True):  # fmt: skip
        assert comp["tokens"] == eag["tokens"]
        assert comp["stats"]["pruned_pairs_per_layer"] == eag["stats"]["pruned_pairs_per_layer"]
        fractions.append(comp["stats"]["pruned_fraction"])
    assert max(fractions) > 0.2  # scoring really ran: with no flags nothing would be pruned


# --------------------------------------------------------------------------- per-request values


def test_per_request_thresholds_equal_engine_level_ones(tiny_model_dir, pruned_mlp_eager):
    batch = pruned_mlp_eager["per_request_batch"]
    outs, stats = batch["outs"], batch["stats"]
    config = KVPruningConfig.from_dict(mlp_pruning(tiny_model_dir))
    values = [request_value(None if v is None else {"kv_pruning": v}, config)
              for v in PER_REQUEST_VALUES]  # fmt: skip
    for out, prompt, value in zip(outs, per_request_prompts(), values, strict=True):
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt,
                           PER_REQUEST_TOKENS, threshold=THRESHOLD if value is None else value,
                           window=WINDOW)  # fmt: skip
        assert_output_equals(out.outputs[0], ref, value)
        s = stats[out.request_id]
        assert s["pruned_pairs_per_layer"] == [int(m.sum()) for m in ref["pruned_mask"]], value
        assert s["threshold"] == (THRESHOLD if value is None else value)
        assert s.get("per_request", False) == (value is not None)
    pruned = [stats[o.request_id]["pruned_fraction"] for o in outs]
    assert pruned[2] == 0.0 and min(pruned[0], pruned[1], pruned[3]) > 0.0  # the values matter
    assert len({round(p, 6) for p in pruned}) == len(pruned)


def test_bad_values_are_refused_at_intake_and_the_engine_goes_on(pruned_mlp_eager):
    batch = pruned_mlp_eager["per_request_batch"]
    assert set(batch["refusals"]) == {repr(v) for v in BAD_VALUES}
    for message in batch["refusals"].values():
        assert 'extra_args["kv_pruning"]' in message
    first = batch["outs"][0].outputs[0].token_ids
    assert list(batch["after"][0].outputs[0].token_ids) == list(first)
