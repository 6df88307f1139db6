"""Statistics lines and the log summary (`vllm_kvzap/stats.py`), against hand-computed values."""

from __future__ import annotations

import json

from vllm_kvzap import stats as stats_mod
from vllm_kvzap.stats import FinishedRequest, StatsRecorder, request_stats


def finished(num_kv_tokens=10) -> FinishedRequest:
    return FinishedRequest("r1", "r1-abcd1234", [3, 4], 3, 7, 4, num_kv_tokens)


def test_fractions_are_pairs_over_heads_times_tokens():
    s = request_stats(finished(10), [5, 0, 20], num_kv_heads=2)
    assert s["pruned_fraction_per_layer"] == [0.25, 0.0, 1.0]
    assert s["pruned_fraction"] == (0.25 + 0.0 + 1.0) / 3
    assert (s["request_id"], s["num_prompt_tokens"], s["num_output_tokens"]) == ("r1", 7, 4)


def test_request_without_computed_tokens_reports_zero():
    s = request_stats(finished(0), [0, 0], num_kv_heads=2)
    assert s["pruned_fraction"] == 0.0


def test_recorder_appends_json_lines_and_logs_a_summary(tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr(stats_mod.logger, "info", lambda msg, *a: messages.append(msg % a))
    path = tmp_path / "sub" / "stats.jsonl"
    rec = StatsRecorder(str(path), "kvzap-mlp")
    rec.record(request_stats(finished(10), [5, 15], num_kv_heads=2), num_kv_heads=2)
    rec.record(request_stats(finished(10), [0, 0], num_kv_heads=2), num_kv_heads=2)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["pruned_fraction"] for x in lines] == [0.5, 0.0]
    rec.maybe_log(force=True)
    assert "2 requests finished, mean pruned fraction 0.250, 20 of 80 KV pairs pruned (25.0%)" in (
        messages[-1]
    )


def test_connector_stats_sum_counters_and_keep_the_latest_gauges():
    from vllm_kvzap.metrics import KVzapConnectorStats

    a = KVzapConnectorStats(data={"finished_requests": 1, "pruned_pairs": 30, "kv_pairs": 100,
                                  "resident_kv_bytes": 5 * 2**20, "dense_kv_bytes": 9 * 2**20})
    b = KVzapConnectorStats(data={"finished_requests": 2, "pruned_pairs": 10, "kv_pairs": 100,
                                  "resident_kv_bytes": 2**20, "dense_kv_bytes": 4 * 2**20})
    merged = a.aggregate(b)
    assert merged.data["finished_requests"] == 3
    assert merged.data["resident_kv_bytes"] == 2**20
    summary = merged.reduce()
    assert summary["pruned fraction"] == 0.2
    assert summary["KV freed vs plain vLLM (MiB)"] == 3.0
    assert KVzapConnectorStats(data={}).is_empty() and not merged.is_empty()
