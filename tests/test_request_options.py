"""Per-request thresholds and ratios (`SamplingParams.extra_args["kv_pruning"]`).

Intake: every accepted form and every refusal of `request_options.request_value`. Engine: requests
with different ratios in one batch produce the tokens, log-probs and pruned pairs of the
independent reference run at that ratio as an engine-level option (`reference_dms.dms_generate`),
and their statistics lines record the value each one used. The same for thresholds, and a bad
value as a `ValueError` naming the key at `generate` after which the engine still serves, are
checked in `test_engine_offline.py`'s eager engine, which serves that batch beside its own.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

from tests.reference_dms import dms_generate
from vllm_kvzap.config import KVPruningConfig, KVPruningConfigError
from vllm_kvzap.request_options import request_value
from vllm_kvzap.stats import wait_for_stats

WINDOW, THRESHOLD, MAX_TOKENS = 16, -4.0, 20
THRESHOLD_ENGINE = {"method": "kvzap-mlp", "threshold": THRESHOLD, "window": WINDOW}
RATIO_ENGINE = {"method": "kvzap-mlp", "ratio": 0.6}

# ---------------------------------------------------------------------------------------- intake


def cfg(**options) -> KVPruningConfig:
    return KVPruningConfig.from_dict(options)


@pytest.mark.parametrize(
    "value, want",
    [(-3.5, -3.5), ("-3.5", -3.5), ("-inf", -math.inf), (float("-inf"), -math.inf), (2, 2.0),
     ("none", -math.inf), ("None", -math.inf), ({"threshold": -6}, -6.0),
     ({"method": "none"}, -math.inf), ({"method": "kvzap-mlp"}, None)],
)  # fmt: skip
def test_threshold_engine_accepts(value, want):
    assert request_value({"kv_pruning": value}, cfg(**THRESHOLD_ENGINE)) == want


@pytest.mark.parametrize(
    "value, want",
    [(0.3, 0.3), ("0.25", 0.25), (0, 0.0), ("none", 0.0), ({"ratio": 0.9}, 0.9),
     ({"method": "none"}, 0.0)],
)  # fmt: skip
def test_ratio_engine_accepts(value, want):
    assert request_value({"kv_pruning": value}, cfg(**RATIO_ENGINE)) == want


def test_no_option_means_the_engines():
    assert request_value(None, cfg(**THRESHOLD_ENGINE)) is None
    assert request_value({"other": 1}, cfg(**THRESHOLD_ENGINE)) is None
    assert request_value({"kv_pruning": None}, cfg(**THRESHOLD_ENGINE)) is None
    assert request_value({"kv_pruning": None}, cfg()) is None


@pytest.mark.parametrize(
    "engine, value, needle",
    [(THRESHOLD_ENGINE, "low", "threshold must be a number"),
     (THRESHOLD_ENGINE, float("nan"), "finite number or -inf"),
     (THRESHOLD_ENGINE, "inf", "finite number or -inf"),
     (THRESHOLD_ENGINE, True, "must be a number"),
     (THRESHOLD_ENGINE, [1.0], "must be a number"),
     (THRESHOLD_ENGINE, {"ratio": 0.5}, 'give {"threshold": ...}'),
     (THRESHOLD_ENGINE, {"window": 3}, "unknown option(s) ['window']"),
     (THRESHOLD_ENGINE, {"threshold": -3, "method": "none"}, "exactly one"),
     (THRESHOLD_ENGINE, {"method": "knorm"}, "chosen per engine"),
     (RATIO_ENGINE, 1.0, "0 <= ratio < 1"),
     (RATIO_ENGINE, -0.1, "0 <= ratio < 1"),
     (RATIO_ENGINE, {"threshold": -3}, 'give {"ratio": ...}'),
     ({"method": "window", "window": 8}, -3.0, "no scores"),
     ({"method": "kvzap-mlp", "mode": "mask"}, -3.0, "mask mode"),
     ({}, -3.0, "without KV pruning")],
)  # fmt: skip
def test_refused_with_the_key_named(engine, value, needle):
    with pytest.raises(KVPruningConfigError) as e:
        request_value({"kv_pruning": value}, cfg(**engine))
    assert 'extra_args["kv_pruning"]' in str(e.value) and needle in str(e.value)


def test_window_baseline_may_switch_off():
    assert request_value({"kv_pruning": "none"}, cfg(method="window")) == -math.inf


# ---------------------------------------------------------------------------------------- engine

PROMPT_LENS = (150, 90, 200, 120, 60)
RATIO_REQUESTS = (None, 0.3, "none", {"ratio": 0.8}, 0.45)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(10, 900, (n,), generator=g).tolist() for n in PROMPT_LENS]


def engine(tiny, pruning: dict, stats_path):
    from vllm import LLM

    return LLM(
        model=str(tiny["model"]), dtype="float32", max_model_len=512, block_size=16,
        kv_cache_memory_bytes=64 * 2**20, seed=0, enforce_eager=True,
        additional_config={"kv_pruning": {**pruning, "surrogate": str(tiny["mlp"]),
                                          "stats_path": str(stats_path)}},
    )  # fmt: skip


def generate(llm, values, stats_path):
    from vllm import SamplingParams

    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1,
                       extra_args=None if v is None else {"kv_pruning": v})
        for v in values
    ]  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    stats = {s["request_id"]: s for s in wait_for_stats(stats_path, len(outs))}
    return outs, stats


@pytest.fixture(scope="module")
def ratio_run(tiny_model_dir, tmp_path_factory):
    stats_path = tmp_path_factory.mktemp("per_request_ratio") / "stats.jsonl"
    llm = engine(tiny_model_dir, RATIO_ENGINE, stats_path)
    try:
        return generate(llm, RATIO_REQUESTS, stats_path)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _effective(values, engine_cfg):
    config = KVPruningConfig.from_dict(engine_cfg)
    return [request_value(None if v is None else {"kv_pruning": v}, config) for v in values]


def check_against_reference(outs, stats, references, values, field, engine_value):
    for out, ref, value in zip(outs, references, values):
        got = out.outputs[0]
        assert list(got.token_ids) == ref["output_ids"], value
        for tok, lp, logits in zip(got.token_ids, got.logprobs, ref["logits"]):
            want = float(torch.log_softmax(logits.double(), dim=-1)[tok])
            assert abs(lp[tok].logprob - want) < 1e-3
        s = stats[out.request_id]
        assert s["pruned_pairs_per_layer"] == [int(m.sum()) for m in ref["pruned_mask"]], value
        assert s[field] == (engine_value if value is None else value)
        assert s.get("per_request", False) == (value is not None)


def test_per_request_ratios_equal_engine_level_ones(tiny_model_dir, ratio_run):
    outs, stats = ratio_run
    values = _effective(RATIO_REQUESTS, RATIO_ENGINE)
    refs = [
        dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], p, MAX_TOKENS,
                     ratio=0.6 if v is None else v)
        for p, v in zip(prompts(), values)
    ]  # fmt: skip
    check_against_reference(outs, stats, refs, values, "ratio", 0.6)
    assert stats[outs[2].request_id]["pruned_fraction"] == 0.0
