"""Pruning metrics through vLLM's KV-connector stats channel: Prometheus and the periodic log.

The scheduler-side connector returns a `KVzapConnectorStats` after every step (finished requests'
pruned and total pairs as counters, the KV memory running requests hold as gauges); vLLM carries it
to the front end, whose Prometheus logger calls `KVzapPromMetrics.observe` and whose logging
logger prints `reduce()` with its periodic engine statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_kvzap.compat import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    create_metric_per_engine,
)

COUNTERS = ("finished_requests", "pruned_pairs", "kv_pairs")
# the engine's totals since it started: the pruned-fraction gauge is their ratio, whichever of
# vLLM's API-server processes reports it (with `--api-server-count`/`--data-parallel-size` each
# sees only some steps' stats, so it cannot sum the counters itself)
TOTALS = ("pruned_pairs_since_start", "kv_pairs_since_start")
GAUGES = ("resident_kv_bytes", "dense_kv_bytes", *TOTALS)


@dataclass
class KVzapConnectorStats(KVConnectorStats):
    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = {k: self.data.get(k, 0) + other.data.get(k, 0) for k in COUNTERS}
        for key in GAUGES:  # the latest value wins
            if key in other.data or key in self.data:
                merged[key] = other.data.get(key, self.data.get(key))
        return KVzapConnectorStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        pairs = d.get("kv_pairs", 0)
        resident, dense = d.get("resident_kv_bytes", 0), d.get("dense_kv_bytes", 0)
        return {
            "KV pruning: finished requests": d.get("finished_requests", 0),
            "pruned fraction": round(d.get("pruned_pairs", 0) / pairs, 4) if pairs else 0.0,
            "KV held by running requests (MiB)": round(resident / 2**20, 2),
            "KV freed vs plain vLLM (MiB)": round((dense - resident) / 2**20, 2),
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in COUNTERS + GAUGES)


class KVzapPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(cls, name: str, doc: str):
            # gauges: one value per engine across API-server processes, the latest (as vLLM's)
            extra = {} if cls is self._counter_cls else {"multiprocess_mode": "mostrecent"}
            metric = cls(name=name, documentation=doc, labelnames=labelnames, **extra)
            return create_metric_per_engine(metric, per_engine_labelvalues)

        self.counters = {
            "finished_requests": per_engine(
                self._counter_cls, "vllm:kv_pruning_requests", "Requests finished with KV pruning."
            ),
            "pruned_pairs": per_engine(
                self._counter_cls, "vllm:kv_pruning_pruned_pairs",
                "KV pairs (layer x KV head x token) pruned in finished requests.",
            ),
            "kv_pairs": per_engine(
                self._counter_cls, "vllm:kv_pruning_kv_pairs",
                "KV pairs (layer x KV head x token) computed in finished requests.",
            ),
        }  # fmt: skip
        self.pruned_fraction = per_engine(
            self._gauge_cls, "vllm:kv_pruning_pruned_fraction",
            "Pruned fraction of KV pairs over all finished requests.",
        )  # fmt: skip
        self.gauges = {
            "resident_kv_bytes": per_engine(
                self._gauge_cls, "vllm:kv_pruning_resident_kv_bytes",
                "KV cache bytes held by running requests (blocks they hold).",
            ),
            "freed_kv_bytes": per_engine(
                self._gauge_cls, "vllm:kv_pruning_freed_kv_bytes",
                "KV cache bytes running requests would hold in plain vLLM, minus what they hold.",
            ),
        }  # fmt: skip

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        d = transfer_stats_data
        for key, metric in self.counters.items():
            if d.get(key):
                metric[engine_idx].inc(d[key])
        if d.get("kv_pairs_since_start"):
            fraction = d["pruned_pairs_since_start"] / d["kv_pairs_since_start"]
            self.pruned_fraction[engine_idx].set(fraction)
        if "resident_kv_bytes" in d:
            resident, dense = d["resident_kv_bytes"], d.get("dense_kv_bytes", 0)
            self.gauges["resident_kv_bytes"][engine_idx].set(resident)
            self.gauges["freed_kv_bytes"][engine_idx].set(max(0, dense - resident))
