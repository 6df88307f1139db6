"""benchmarks/serve_benchmark.py's pure parts: the /metrics summary and the derived columns.

The /metrics page is written by prometheus_client itself (as vLLM's server writes it), with two
engines' label sets and the `_created` samples counters carry; no server runs.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from benchmarks.serve_benchmark import config_flags, derive, scrape, table


def metrics_page(pruned, pairs, preemptions, fractions) -> str:
    reg = CollectorRegistry()
    labels = ["model_name", "engine"]
    counters = {
        "vllm:kv_pruning_pruned_pairs": pruned,
        "vllm:kv_pruning_kv_pairs": pairs,
        "vllm:num_preemptions": preemptions,
    }
    for name, values in counters.items():
        c = Counter(name, "doc", labels, registry=reg)
        for engine, v in enumerate(values):
            c.labels("m", str(engine)).inc(v)
    g = Gauge("vllm:kv_pruning_pruned_fraction", "doc", labels, registry=reg)
    for engine, v in enumerate(fractions):
        g.labels("m", str(engine)).set(v)
    return generate_latest(reg).decode()


def test_scrape_sums_engines_and_divides_the_sums():
    page = metrics_page(pruned=[300, 50], pairs=[1000, 400], preemptions=[2, 5], fractions=[
        0.3, 0.125])  # fmt: skip
    assert "vllm:num_preemptions_created" in page  # a sample that must not count
    m = scrape(page)
    assert m["preemptions"] == 7
    assert m["pruned_pairs"] == 350 and m["kv_pairs"] == 1400
    assert m["pruned_fraction"] == pytest.approx(350 / 1400)  # not the mean of 0.3 and 0.125
    assert sorted(m["pruned_fraction_gauge"]) == [0.125, 0.3]


def test_scrape_of_plain_vllm_has_no_pruned_fraction():
    reg = CollectorRegistry()
    Counter("vllm:num_preemptions", "doc", ["engine"], registry=reg).labels("0").inc(0)
    m = scrape(generate_latest(reg).decode())
    assert m["preemptions"] == 0 and m["pruned_fraction"] is None and m["kv_pairs"] is None


def test_derived_columns():
    rows = [
        {"config": "plain", "output_throughput": 80.0},
        {"config": "plain-ample", "output_throughput": 200.0},
        {"config": "kvzap t=-4 dense", "output_throughput": 100.0, "pruned_fraction": 0.6},
        {"config": "kvzap t=-2 dense", "error": "server exited (1)"},
    ]
    derive(rows)
    assert rows[1]["x_plain"] == 2.5 and rows[2]["x_plain"] == 1.25
    assert rows[2]["ideal_gain"] == pytest.approx(2.5)
    assert "ideal_gain" not in rows[0] and "x_plain" not in rows[3]
    lines = table(rows).splitlines()
    assert lines[4].split()[3:] == ["100.0", "1.25", "-/-", "-/-", "0.600", "-", "2.50"]
    assert "error: server exited (1)" in lines[5]


def test_config_names():
    assert config_flags("plain") == ([], False) and config_flags("plain-ample") == ([], True)
    flags, _ = config_flags("kvzap t=-2.5 chunked")
    assert flags == ["--kv-pruning", "kvzap-mlp", "--kv-pruning-threshold=-2.5",
                     "--kv-pruning-prefill", "chunked"]  # fmt: skip
    assert "--kv-pruning-prefill" not in config_flags("kvzap t=-4 dense")[0]
    with pytest.raises(SystemExit):
        config_flags("kvzap -4")
