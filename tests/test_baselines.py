"""Baseline pruning methods (window, knorm, random) through vLLM, against the plain-torch reference.

The reference (`reference_dms.py`) scores each baseline with its own code (Python-integer hash for
`random`, its own keys for `knorm`) and applies the same DMS rules; vLLM with the plugin must give
the same tokens and the same pruned pairs.
"""

from __future__ import annotations

import pytest
import torch

from tests.reference_dms import _random_uniform, dms_generate
from tests.test_engine_offline import MAX_TOKENS, WINDOW, prompts, run_engine
from vllm_kvzap.config import KVPruningConfig, KVPruningConfigError
from vllm_kvzap.scorers.baselines import knorm_scores, random_uniform, window_scores

CASES = {  # method -> (threshold, extra options)
    "window": (-4.0, {"sinks": 4}),
    "knorm": (-5.6, {}),
    "random": (-0.4, {"seed": 3}),
}


def test_random_draws_match_the_reference_hash_and_are_uniform():
    positions = torch.arange(0, 4000)
    u = random_uniform(positions, layer_idx=2, num_kv_heads=3, seed=7)
    for p in (0, 1, 17, 3999):
        for h in range(3):
            assert u[p, h].item() == pytest.approx(_random_uniform(7, 2, p, h), abs=1e-7)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs((u < 0.4).float().mean().item() - 0.4) < 0.02
    # a tensor-parallel rank's heads 1..2 draw what the whole model's heads 1..2 draw
    rank = random_uniform(positions[:50], layer_idx=2, num_kv_heads=2, seed=7, first_head=1)
    for p in (0, 49):
        for h in range(2):
            assert rank[p, h].item() == pytest.approx(_random_uniform(7, 2, p, h + 1), abs=1e-7)


def test_window_and_knorm_scores():
    s = window_scores(torch.tensor([0, 3, 4, 100]), num_kv_heads=2, sinks=4)
    assert (s[:2] == float("inf")).all() and (s[2:] == float("-inf")).all()
    keys = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])
    assert knorm_scores(keys).flatten().tolist() == [-5.0, -1.0]


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"method": "knorm", "sinks": 2}, "'sinks' applies to method(s) ['window'] only"),
        ({"method": "kvzap-mlp", "seed": 1}, "'seed' applies to method(s) ['random'] only"),
        ({"method": "window", "surrogate": "x"}, "uses no surrogate"),
        ({"method": "window", "sinks": -1}, "sinks must be >= 0"),
    ],
)
def test_baseline_options_are_validated(options, needle):
    with pytest.raises(KVPruningConfigError) as e:
        KVPruningConfig.from_dict(options)
    assert needle in str(e.value)


@pytest.fixture(scope="module", params=sorted(CASES))
def baseline_run(request, tiny_model_dir, tmp_path_factory):
    method = request.param
    threshold, extra = CASES[method]
    pruning = {"method": method, "threshold": threshold, "window": WINDOW, **extra}
    return method, run_engine(tiny_model_dir, tmp_path_factory, pruning)


def test_baseline_equals_reference(baseline_run, tiny_model_dir):
    method, run = baseline_run
    threshold, extra = CASES[method]
    fractions = []
    for prompt, result in zip(prompts(), run["results"]):
        ref = dms_generate(tiny_model_dir["model"], None, prompt, MAX_TOKENS, threshold, WINDOW,
                           method=method, **extra)  # fmt: skip
        assert result["tokens"] == ref["output_ids"], f"{method}, prompt of {len(prompt)} tokens"
        ref_pairs = [int(m.sum()) for m in ref["pruned_mask"]]
        assert all(
            abs(a - b) <= 1 for a, b in zip(result["stats"]["pruned_pairs_per_layer"], ref_pairs)
        )
        fractions.append(result["stats"]["pruned_fraction"])
    assert 0.05 < max(fractions) < 0.95  # the baseline really prunes, and not everything
