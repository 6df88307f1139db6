"""Per-request pruning statistics (scheduler process): JSON lines and a periodic log summary.

Counts come from the workers (see `connector.py`): pruned pairs per layer of a finished request.
A layer's pruned fraction is pruned pairs / (H_kv x tokens whose KV was computed), as kvpress
reports it; the request's `pruned_fraction` is the mean over layers.

Each line also records the decision rule (`StatsRecorder.from_config`): `method`, `rule`
("threshold" or "ratio") and its parameters (`threshold` and `window`, or `ratio` and `alpha`); in
ratio mode, where only the prompt is pruned, `prompt_pruned_fraction` = mean over layers of pruned
pairs / (H_kv x prompt tokens), which is the ratio asked for up to rounding (`n_kept` is an
integer). A request that gave its own threshold or ratio (`request_options.py`) has that value in
its line, with `"per_request": true`. Every line names its engine (`"engine"`: the data-parallel
rank; vLLM's data parallelism runs one engine, with its own scheduler, per rank; 0 without it).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_kvzap.compat import init_logger

if TYPE_CHECKING:
    from vllm_kvzap.config import KVPruningConfig

logger = init_logger(__name__)

SUMMARY_INTERVAL_S = 10.0


@dataclass
class FinishedRequest:
    """What the scheduler knows about a request when it finishes (sent to the workers)."""

    request_id: str
    engine_request_id: str
    block_ids: list[int]
    req_key: int  # first block id: names the request's pages on the worker
    num_prompt_tokens: int
    num_output_tokens: int
    num_kv_tokens: int  # tokens whose KV was computed
    value: float | None = None  # its own threshold (ratio in ratio mode), if it gave one


def wait_for_stats(path, expected: int, timeout_s: float = 30.0) -> list[dict]:
    """Read a stats file once it holds `expected` lines (or at the timeout): lines are written
    by the engine one step after each request finishes, so a caller may briefly be ahead."""
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= expected or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.2)


def request_stats(req: FinishedRequest, pruned_per_layer: list[int], num_kv_heads: int) -> dict:
    pairs = num_kv_heads * req.num_kv_tokens
    fractions = [c / pairs if pairs else 0.0 for c in pruned_per_layer]
    return {
        "request_id": req.request_id,
        "engine_request_id": req.engine_request_id,
        "num_prompt_tokens": req.num_prompt_tokens,
        "num_output_tokens": req.num_output_tokens,
        "num_kv_tokens": req.num_kv_tokens,
        "pruned_pairs_per_layer": pruned_per_layer,
        "pruned_fraction_per_layer": fractions,
        "pruned_fraction": sum(fractions) / len(fractions) if fractions else 0.0,
    }


class StatsRecorder:
    def __init__(
        self,
        stats_path: str | None,
        method: str,
        settings: dict[str, Any] | None = None,
        engine: int | None = None,
    ):
        """`settings`: the rule and its parameters (`KVPruningConfig.rule_settings()`), added to
        every line; without them lines carry the counts only. `engine`: the data-parallel rank
        of this engine (one scheduler each; 0 without data parallelism), in every line."""
        self.stats_path = stats_path
        self.method = method
        self.settings = dict(settings or {})
        self.engine = engine
        self._lock = threading.Lock()
        self._num_requests = 0
        self._sum_fraction = 0.0
        self._pairs = 0
        self._pruned = 0
        self._last_log = time.monotonic()
        if stats_path:
            os.makedirs(os.path.dirname(os.path.abspath(stats_path)), exist_ok=True)

    @classmethod
    def from_config(cls, config: KVPruningConfig, engine: int | None = None) -> StatsRecorder:
        return cls(config.stats_path, config.method, config.rule_settings(), engine)

    def _describe(self) -> str:
        if self.settings.get("rule") == "ratio":
            return f"{self.method}, ratio {self.settings['ratio']:g}"
        return self.method

    def record(self, stats: dict, num_kv_heads: int, value: float | None = None) -> None:
        """`value`: the request's own threshold (ratio in ratio mode), which the line records in
        place of the engine's, with `"per_request": true`."""
        if self.engine is not None:
            stats = {**stats, "engine": self.engine}
        if self.settings:
            stats = {**stats, "method": self.method, **self.settings}
            if value is not None:
                stats["ratio" if self.settings["rule"] == "ratio" else "threshold"] = value
                stats["per_request"] = True
            if self.settings.get("rule") == "ratio":
                pairs = num_kv_heads * stats["num_prompt_tokens"]
                per_layer = [c / pairs if pairs else 0.0 for c in stats["pruned_pairs_per_layer"]]
                stats["prompt_pruned_fraction"] = (
                    sum(per_layer) / len(per_layer) if per_layer else 0.0
                )
        with self._lock:
            if self.stats_path:
                with open(self.stats_path, "a") as f:
                    f.write(json.dumps(stats) + "\n")
            self._num_requests += 1
            self._sum_fraction += stats["pruned_fraction"]
            num_layers = len(stats["pruned_pairs_per_layer"])
            self._pairs += num_kv_heads * stats["num_kv_tokens"] * num_layers
            self._pruned += sum(stats["pruned_pairs_per_layer"])
            self.maybe_log()

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._num_requests or (not force and now - self._last_log < SUMMARY_INTERVAL_S):
            return
        self._last_log = now
        logger.info(
            "KV pruning (%s): %d requests finished, mean pruned fraction %.3f, "
            "%d of %d KV pairs pruned (%.1f%%)",
            self._describe(),
            self._num_requests,
            self._sum_fraction / self._num_requests,
            self._pruned,
            self._pairs,
            100.0 * self._pruned / max(self._pairs, 1),
        )
