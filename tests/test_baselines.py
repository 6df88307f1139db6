"""Baseline pruning methods (window, knorm, random) through vLLM, against the plain-torch reference.

The reference (`reference_dms.py`) scores each baseline with its own code (Python-integer hash for
`random`, its own keys for `knorm`) and applies the same DMS rules; vLLM with the plugin must give
the same tokens and the same pruned pairs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.reference_dms import _random_uniform, dms_generate
from tests.test_engine_offline import MAX_TOKENS, WINDOW, prompts, run_engine
from vllm_kvzap.config import KVPruningConfig, KVPruningConfigError
from vllm_kvzap.scorers.baselines import (
    Knorm,
    Random,
    Window,
    knorm_scores,
    random_scores,
    random_uniform,
    window_scores,
)

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


def test_baseline_presses_carry_their_options_and_score_as_the_functions():
    c = KVPruningConfig.from_dict({"method": "window", "sinks": 2})
    assert c.press == Window(sinks=2) and c.to_dict()["sinks"] == 2
    assert KVPruningConfig(method="random").press == Random(seed=0)
    assert KVPruningConfig.from_dict({"method": "random", "seed": "3"}).press == Random(seed=3)
    assert KVPruningConfig().press is None
    positions, keys = torch.arange(9), torch.randn(9, 2, 4)
    rank = SimpleNamespace(num_kv_heads=2, heads=SimpleNamespace(first=1), surrogate=None)
    assert torch.equal(Window(sinks=2).input_scores(rank, 0, None, positions),
                       window_scores(positions, 2, 2))  # fmt: skip
    assert torch.equal(Random(seed=5).input_scores(rank, 3, None, positions),
                       random_scores(positions, 3, 2, 5, first_head=1))  # fmt: skip
    assert Knorm().input_scores(rank, 0, None, positions) is None
    assert torch.equal(Knorm().key_scores(keys), knorm_scores(keys))
    assert Window().key_scores(keys) is None and Random().key_scores(keys) is None


@pytest.mark.parametrize("method", ["window", "knorm", "random"])
def test_runtime_asks_the_methods_press(method):
    """The runtime's scores come from the press: from the layer's input, or from the keys."""
    from vllm_kvzap.attention.runtime import PruningRuntime

    config = KVPruningConfig.from_dict({"method": method})
    runtime = PruningRuntime(config, None, num_layers=2, num_kv_heads=2, max_num_tokens=8)
    positions, keys = torch.arange(5), torch.randn(5, 2, 4)
    scores = runtime.graph_scores(1, torch.randn(5, 3), positions)
    if method == "knorm":
        assert scores is None
        assert torch.equal(runtime.layer_scores(1, keys), knorm_scores(keys))
        return
    want = window_scores(positions, 2, 4) if method == "window" else random_scores(positions, 1, 2, 0)
    assert torch.equal(scores, want)
    runtime.save_scores(1, scores)
    assert torch.equal(runtime.layer_scores(1, keys), want)


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
