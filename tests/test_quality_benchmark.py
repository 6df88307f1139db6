"""The quality benchmark's tasks and scoring (no engine): prompts hold what their questions ask,
at the lengths asked; calibration targets the fractions it claims; agreement is counted position by
position against the unpruned answer."""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks import quality_benchmark as qb
from tools import smollm2


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2.convert())


def test_passkey_prompt_hides_the_key_at_the_length(tokenizer):
    for length in (500, 2000):
        case = qb.passkey_case(tokenizer, length, random.Random(length))
        text = tokenizer.decode(case.prompt)
        assert text.count(case.answer) == 2 and len(case.answer) == 5
        assert length - 60 <= len(case.prompt) <= length
        assert text.rstrip().endswith("assistant")  # the question is the last user turn


def test_facts_prompts_hold_every_fact_and_ask_one(tokenizer):
    cases = qb.facts_cases(tokenizer, 800, random.Random(3), qb.module_docs())
    assert len(cases) == 4
    facts = {(c.info["name"], c.info["thing"], c.answer) for c in cases}
    for c in cases:
        text = tokenizer.decode(c.prompt)
        for name, thing, value in facts:
            assert f"{name}'s favourite {thing} is {value}." in text
        assert f"what is {c.info['name']}'s favourite {c.info['thing']}?" in text
        assert qb.is_correct(c, f"It is {c.answer.upper()}.") and not qb.is_correct(c, "unknown")


def test_window_calibration_hits_the_fraction():
    cases = [qb.Case("passkey", n, [0] * n) for n in (500, 1000, 4000)] + [
        qb.Case("chat", 300, [0] * 300)]
    for f in (0.3, 0.7, 0.9):
        w = qb.calibrate("window", f, None, 1.0, cases, sinks=4)["window"]
        new = [qb.ANSWER_TOKENS] * 3 + [qb.CHAT_TOKENS]
        kept = [min(1.0, (w + 4) / (len(c.prompt) + n)) for c, n in zip(cases, new)]
        assert abs((1 - sum(kept) / len(kept)) - f) < 0.01


def test_threshold_calibration_is_the_score_quantile():
    scores = {"knorm": torch.arange(1000, dtype=torch.float32).view(1, -1, 1)}
    t = qb.calibrate("knorm", 0.4, scores, 0.8, [], sinks=4)["threshold"]
    assert (scores["knorm"] < t).float().mean().item() == pytest.approx(0.5, abs=0.002)
    assert qb.calibrate("random", 0.4, scores, 0.8, [], 4)["threshold"] == pytest.approx(-0.5)


def test_agreement_is_positionwise_against_the_reference():
    cases = [qb.Case("chat", 10, [1, 2, 3])]
    ref = {"tokens": {0: [5, 6, 7, 8]}}
    res = {"tokens": {0: [5, 9, 7, 1]}, "texts": {0: ""}, "logprob": {0: -0.5},
           "stats": [{"pruned_fraction": 0.4, "pruned_fraction_per_layer": [0.4],
                      "resident_kv_bytes_end": 10, "resident_kv_bytes_peak": 16,
                      "dense_kv_bytes": 20}]}  # fmt: skip
    point = qb.summarise(cases, res, ref)
    assert point["chat_agreement"] == 0.5 and point["chat_logprob"] == -0.5
    assert point["pruned_fraction"] == 0.4
    assert qb.peak_kv(point) == "0.800" and qb.peak_kv({}) == "-"


def test_chunked_prefill_engines_split_prompts_and_dense_ones_keep_their_settings():
    pruning = {"method": "kvzap-mlp", "window": 128}
    assert qb.engine_options(pruning, "dense", 256) == (pruning, {})
    opts, llm = qb.engine_options(pruning, "chunked", 256)
    assert opts == {**pruning, "prefill": "chunked"} and "prefill" not in pruning
    assert llm == {"enable_chunked_prefill": True, "max_num_batched_tokens": 256}
    assert qb.CHUNK_TOKENS < min(qb.PASSKEY_LENS) and qb.CHUNK_TOKENS > 128  # split, > window
    with pytest.raises(ValueError, match="unknown prefill"):
        qb.engine_options(pruning, "sparse", 256)
    assert qb.series_name("kvzap-mlp", "dense") == "kvzap-mlp"
    assert qb.series_name("kvzap-mlp", "chunked") == "kvzap-mlp chunked"


def test_table_shows_chunked_rows_beside_dense_ones(capsys):
    metrics = {"passkey": 1.0, "facts": 0.5, "chat_agreement": 0.25, "chat_logprob": -0.75}
    point = {"target": 0.5, "pruned_fraction": 0.48, **metrics}
    dense = {"unpruned": metrics, "methods": {"kvzap-mlp": [point]}}
    rows = qb.table(dense).splitlines()
    assert "prefill" not in rows[0] and rows[3].split()[:3] == ["kvzap-mlp", "0.50", "0.480"]
    both = {"unpruned": metrics, "methods": {
        "kvzap-mlp": [{**point, "method": "kvzap-mlp", "prefill": "dense"}],
        "kvzap-mlp chunked": [{**point, "method": "kvzap-mlp", "prefill": "chunked",
                               "pruned_fraction": 0.51, "kv_bytes_peak_per_request": 3,
                               "dense_kv_bytes_per_request": 8}]}}  # fmt: skip
    rows = qb.table(both).splitlines()
    assert rows[0].split()[:4] == ["method", "prefill", "target", "pruned"]
    assert rows[2].split()[:4] == ["unpruned", "-", "-", "0.000"]
    assert [r.split()[:4] for r in rows[3:]] == [["kvzap-mlp", "dense", "0.50", "0.480"],
                                                 ["kvzap-mlp", "chunked", "0.50", "0.510"]]
    assert rows[4].split()[4:] == ["1.000", "0.500", "0.250", "-0.750", "0.375"]
    assert rows[0].split()[-2:] == ["peak", "KV"] and rows[3].split()[-1] == "-"
