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


def test_lines_record_the_rule_and_its_parameters(tmp_path, monkeypatch):
    from vllm_kvzap.config import KVPruningConfig

    messages = []
    monkeypatch.setattr(stats_mod.logger, "info", lambda msg, *a: messages.append(msg % a))
    # threshold mode
    path = tmp_path / "t.jsonl"
    cfg = KVPruningConfig.from_dict({"method": "kvzap-mlp", "stats_path": str(path), "window": 16})
    rec = StatsRecorder.from_config(cfg)
    s = request_stats(finished(10), [5, 15], num_kv_heads=2)
    rec.record(s, num_kv_heads=2)
    line = json.loads(path.read_text())
    assert {k: line[k] for k in s} == s  # the existing keys, unchanged
    assert (line["method"], line["rule"], line["threshold"], line["window"]) == (
        "kvzap-mlp", "threshold", -4.0, 16
    )
    assert "ratio" not in line and "prompt_pruned_fraction" not in line
    assert "pruned_fraction" in s and "rule" not in s  # the caller's dict is not modified
    rec.maybe_log(force=True)
    assert messages[-1].startswith("KV pruning (kvzap-mlp): 1 requests finished")
    # ratio mode: prompt of 7 tokens, 2 KV heads, 2 layers
    path = tmp_path / "r.jsonl"
    cfg = KVPruningConfig.from_dict(
        {"method": "kvzap-linear", "stats_path": str(path), "ratio": 0.5, "alpha": 0.1}
    )
    rec = StatsRecorder.from_config(cfg)
    rec.record(request_stats(finished(10), [8, 6], num_kv_heads=2), num_kv_heads=2)
    line = json.loads(path.read_text())
    assert (line["method"], line["rule"], line["ratio"], line["alpha"]) == (
        "kvzap-linear", "ratio", 0.5, 0.1
    )
    assert "threshold" not in line and "window" not in line
    assert line["pruned_fraction"] == (8 / 20 + 6 / 20) / 2  # over H_kv x num_kv_tokens, as before
    assert line["prompt_pruned_fraction"] == (8 / 14 + 6 / 14) / 2  # over H_kv x prompt tokens
    rec.maybe_log(force=True)
    assert messages[-1].startswith("KV pruning (kvzap-linear, ratio 0.5): 1 requests finished")


def test_recorder_without_settings_writes_the_counts_only(tmp_path):
    path = tmp_path / "s.jsonl"
    rec = StatsRecorder(str(path), "kvzap-mlp")
    s = request_stats(finished(10), [5, 15], num_kv_heads=2)
    rec.record(s, num_kv_heads=2)
    assert json.loads(path.read_text()) == s
