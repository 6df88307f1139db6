"""The accuracy benchmark's pieces (benchmarks/accuracy_benchmark.py, forcing.py) against independent
references.

- Questions asked during decoding: the forcing logits processor, the request layout and the answer
  check, on the task's own answers.
- Calibration of the baselines against the baselines' math (random's threshold, window's size).
- End to end: vLLM + plugin (KVzap MLP, paged mode) on the committed recall model with forced
  questions equals the plain-torch DMS reference (tests/reference_dms.py) run with the same forced
  tokens: every output token and every request's pruned fraction.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.accuracy_benchmark import (
    answer_hits,
    calibrate,
    engine_args,
    generate_answers,
    token_roles,
)
from benchmarks.forcing import FREE, ForcedTokens, query_request
from benchmarks.harness import engine
from experiments.recall.recall_task import QUERY, TOKEN_TO_ID, decode, make_example
from vllm_kvzap.scorers.baselines import random_scores

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "recall-qwen3"


def test_query_request_layout_and_answer_check():
    ex = make_example(11, 6, 4)
    prompt, forced = query_request(ex)
    assert prompt == ex.ids[: ex.context[1]] + [TOKEN_TO_ID[QUERY]]
    assert len(forced) == 4 * len(ex.query_keys)
    # The true continuation of the example is the forced tokens with the answers filled in.
    truth = ex.ids[ex.context[1] + 1 : -1]
    assert [t if f == FREE else f for t, f in zip(truth, forced)] == truth
    assert [truth[i] for i, f in enumerate(forced) if f == FREE] == ex.answers
    assert decode(forced[:2]) == ["?", ex.query_keys[0]]
    assert answer_hits(ex, truth) == [True] * len(ex.answers)
    wrong = list(truth)
    wrong[4 * 2 + 2] = TOKEN_TO_ID["v0"] if ex.answers[2] != TOKEN_TO_ID["v0"] else TOKEN_TO_ID["v1"]
    assert answer_hits(ex, wrong) == [i != 2 for i in range(len(ex.answers))]
    assert answer_hits(ex, truth[:5]) == [True] + [False] * (len(ex.answers) - 1)


@pytest.mark.parametrize("seed", range(5))
def test_token_roles_name_keys_and_values(seed):
    ex = make_example(seed, 8, 6)
    prompt, _ = query_request(ex)
    roles = token_roles(ex)
    assert len(roles) == len(prompt) and roles[0] == "sink"
    for tok, role in zip(decode(prompt), roles):
        assert (role == "key") == (tok[0] == "k" and tok[1:].isdigit())
        assert (role == "value") == (tok[0] == "v" and tok[1:].isdigit())


def test_forced_tokens_processor():
    from vllm import SamplingParams

    proc = ForcedTokens(None, torch.device("cpu"), False)
    assert proc.new_req_logits_processor(SamplingParams()) is None
    force = proc.new_req_logits_processor(SamplingParams(extra_args={"forced_tokens": [7, FREE]}))
    logits = torch.randn(20)
    out = force([], logits.clone())
    assert out.argmax().item() == 7 and torch.isinf(out).sum().item() == 19
    free = logits.clone()
    assert torch.equal(force([7], free), logits)  # the answer step is left to the model
    assert torch.equal(force([7, 3], logits.clone()), logits)  # past the list: untouched


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_random_calibration_prunes_the_target_fraction(fraction):
    judged_share = 0.9
    thr = calibrate("random", fraction, None, judged_share, 300.0, 4)["threshold"]
    s = random_scores(torch.arange(20_000), layer_idx=1, num_kv_heads=4, seed=0)
    pruned = (s < thr).float().mean().item()  # the plugin's rule: pruned iff score < threshold
    assert pruned * judged_share == pytest.approx(fraction, abs=0.01)


def test_window_calibration_keeps_sinks_plus_window():
    opts = calibrate("window", 0.75, None, 0.9, 400.0, 4)
    assert opts == {"window": 96, "sinks": 4}  # 400 * 0.25 = 100 kept = 4 sinks + 96


# ==================================================================================================
# End to end through vLLM against the reference
# ==================================================================================================

WINDOW = 16
N_EXAMPLES = 4


@pytest.fixture(scope="module")
def kvzap_run(tmp_path_factory):
    """Forced-question generation through vLLM + plugin (kvzap-mlp at the median score)."""
    from vllm_kvzap.stats import wait_for_stats

    examples = [make_example(1_700_000_000 + i, 16, 16) for i in range(N_EXAMPLES)]
    from benchmarks.accuracy_benchmark import collect_scores

    scores, _ = collect_scores(MODEL_DIR, examples[:2])
    threshold = float(torch.quantile(scores["kvzap-mlp"].reshape(-1), 0.5))
    stats_path = tmp_path_factory.mktemp("acc") / "stats.jsonl"
    pruning = {"method": "kvzap-mlp", "threshold": threshold, "window": WINDOW,
               "surrogate": str(MODEL_DIR / "kvzap-mlp"), "stats_path": str(stats_path)}
    with engine(**engine_args(MODEL_DIR, examples, {"kv_pruning": pruning})) as llm:
        outputs, request_ids = generate_answers(llm, examples, with_request_ids=True)
        by_id = {s["request_id"]: s for s in wait_for_stats(stats_path, len(examples))}
    return examples, threshold, outputs, [by_id.get(r) for r in request_ids]


def test_forced_questions_under_pruning_match_the_reference(kvzap_run):
    from tests.reference_dms import dms_generate

    examples, threshold, outputs, stats = kvzap_run
    assert None not in stats
    for ex, out, st in zip(examples, outputs, stats):
        prompt, forced = query_request(ex)
        ref = dms_generate(MODEL_DIR, MODEL_DIR / "kvzap-mlp", prompt, len(forced), threshold,
                           WINDOW, forced_tokens=forced)  # fmt: skip
        assert out == ref["output_ids"]
        assert [t for t, f in zip(out, forced) if f != FREE] == [f for f in forced if f != FREE]
        assert st["pruned_fraction"] == pytest.approx(ref["pruned_fraction"], abs=1e-9)
        assert 0.2 < ref["pruned_fraction"] < 0.9
