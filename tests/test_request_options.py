"""Per-request thresholds and ratios (`SamplingParams.extra_args["kv_pruning"]`): the intake.

Every accepted form and every refusal of `request_options.request_value`, for threshold and ratio
engines. Through vLLM (in the engines of other modules, which serve these batches beside their
own): requests with different thresholds in one batch produce the tokens, log-probs and pruned
pairs of the independent reference run at that threshold as an engine-level option, their
statistics lines record the value each one used, and a bad value is a `ValueError` naming the key
at `generate`, after which the engine still serves (`test_engine_offline.py`, eager engine); the
same for ratios (`test_ratio_mode.py`, whole and chunked prompts).
"""

from __future__ import annotations

import math

import pytest

from vllm_kvzap.config import KVPruningConfig, KVPruningConfigError
from vllm_kvzap.request_options import request_value

WINDOW, THRESHOLD = 16, -4.0
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


def test_window_threshold_refusal_names_the_baseline():
    with pytest.raises(KVPruningConfigError) as e:
        request_value({"kv_pruning": -3.0}, cfg(method="window"))
    assert str(e.value) == (
        'extra_args["kv_pruning"]: the window baseline has no scores to compare with a threshold; '
        'only "none" (no pruning for this request) is accepted'
    )
