"""The plugin's KV connector: vLLM's official channel between scheduler and workers.

It moves no KV data. Worker -> scheduler, after every step (`build_connector_worker_meta` ->
`update_connector_output`): in paged mode each running request's page count and the most pages its
next step may need, from which the block manager (`cache/manager.py`) sizes the request and gives
surplus blocks back. Scheduler -> worker, with the next step's metadata: the requests that finished
(their blocks, token counts and key) and, in paged mode, the keys of every request freed (finished
or preempted). At bind time, before that step writes anything, the worker counts each finished
request's pruned pairs per layer (from its pages, or in mask mode from the keep caches), releases
the freed requests' pages, and returns the counts with the step's output; the scheduler side then
writes the statistics (`stats.py`) and feeds the metrics (`metrics.py`). The engine runs one more
(possibly empty) step after a request finishes, so every finished request is reported.
Per-request thresholds/ratios (`request_options.py`) go scheduler -> worker with the step that
schedules a request for the first time or resumes it after a preemption, keyed by its first block;
the page table gives them to the request's slot when the request takes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_kvzap.cache.manager import KVzapBlockManager
from vllm_kvzap.cache.step_plan import ResidentReport
from vllm_kvzap.compat import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    cdiv,
)
from vllm_kvzap.config import KVPruningConfig
from vllm_kvzap.metrics import COUNTERS, TOTALS, KVzapConnectorStats, KVzapPromMetrics
from vllm_kvzap.stats import FinishedRequest, StatsRecorder, request_stats


@dataclass
class KVzapConnectorMetadata(KVConnectorMetadata):
    finished: list[FinishedRequest] = field(default_factory=list)
    freed_req_keys: list[int] = field(default_factory=list)  # paged mode: finished, preempted
    block_size: int = 0
    num_scheduled_tokens: int = 0  # 0: no forward pass in this step
    # paged mode: request key -> its own threshold (ratio in ratio mode), for requests that start
    # (or restart after a preemption) in this step
    request_values: dict[int, float] = field(default_factory=dict)


@dataclass
class FinishedCounts:
    request: FinishedRequest
    pruned_per_layer: list[int]
    peak_pages: int | None = None  # paged mode
    end_pages: int | None = None

    def add(self, other: FinishedCounts) -> FinishedCounts:
        """The same request's counts over two ranks' KV heads (tensor parallelism)."""

        def total(a, b):
            return None if a is None or b is None else a + b

        pruned = [a + b for a, b in zip(self.pruned_per_layer, other.pruned_per_layer)]
        return FinishedCounts(
            self.request, pruned, total(self.peak_pages, other.peak_pages),
            total(self.end_pages, other.end_pages),
        )  # fmt: skip


@dataclass
class KVzapWorkerMetadata(KVConnectorWorkerMetadata):
    counts: list[FinishedCounts] = field(default_factory=list)
    reports: dict[int, ResidentReport] = field(default_factory=dict)  # by request key

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Two tensor-parallel ranks' metadata of the same step (vLLM's `KVOutputAggregator`):
        each rank holds its own KV heads, so a request's pruned pairs and pages add up, and its
        report is the larger need (the scheduler's blocks hold `layers x local heads` pages on
        every rank)."""
        assert isinstance(other, KVzapWorkerMetadata)
        counts = {c.request.engine_request_id: c for c in self.counts}
        for c in other.counts:
            mine = counts.get(c.request.engine_request_id)
            counts[c.request.engine_request_id] = c if mine is None else mine.add(c)
        reports = dict(self.reports)
        for key, r in other.reports.items():
            mine = reports.get(key)
            reports[key] = r if mine is None else ResidentReport(
                max(mine.pages, r.pages), max(mine.next_pages, r.next_pages), mine.dense or r.dense
            )
        return KVzapWorkerMetadata(list(counts.values()), reports)


def _external_request_id(engine_request_id: str) -> str:
    """The id the user sees: vLLM appends "-<8 random chars>" to it inside the engine."""
    from vllm_kvzap.compat import envs

    if envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION:
        return engine_request_id
    return engine_request_id.rsplit("-", 1)[0]


def _data_parallel_engine(vllm_config) -> int:
    """This engine's data-parallel rank (vLLM runs one engine core per rank; for models without
    experts each runs as DP=1, and only `data_parallel_index` keeps the rank), 0 without DP."""
    return vllm_config.parallel_config.data_parallel_index


class KVzapPruningConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.pruning = KVPruningConfig.from_additional_config(vllm_config.additional_config)
        self.num_kv_heads = vllm_config.model_config.get_total_num_kv_heads()
        # tensor parallelism: every rank holds `pages_per_block` pages per block for its heads;
        # the workers' counts arrive summed over ranks (`KVzapWorkerMetadata.aggregate`)
        self.num_ranks = vllm_config.parallel_config.tensor_parallel_size
        self._finished: list[FinishedRequest] = []
        self._counts: list[FinishedCounts] = []
        self._manager: KVzapBlockManager | None = None
        self._request_values: dict[str, float] = {}  # scheduler side: by engine request id
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._since_start = dict.fromkeys(TOTALS, 0)
        self._recorder = (
            StatsRecorder.from_config(self.pruning, _data_parallel_engine(vllm_config))
            if role == KVConnectorRole.SCHEDULER
            else None
        )

    # ---------------- worker side ----------------
    def register_kv_caches(self, kv_caches) -> None:
        from vllm_kvzap.attention.runtime import get_runtime

        runtime = get_runtime()
        if self.pruning.paged and runtime is not None:
            runtime.setup_paged(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Before the step's forward pass: count finished requests, release freed pages, plan
        the step's pages (`cache/page_table.py`)."""
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, KVzapConnectorMetadata)
        from vllm_kvzap.attention.runtime import get_runtime

        runtime = get_runtime()
        pages = runtime.pages if runtime is not None else None
        for req in connector_metadata.finished:
            if runtime is None:
                self._counts.append(FinishedCounts(req, []))
            elif pages is None:
                counts = runtime.count_pruned(
                    req.block_ids, req.num_kv_tokens, connector_metadata.block_size
                )
                self._counts.append(FinishedCounts(req, counts))
            else:
                found = pages.finished_counts(req.req_key)
                if found is None:  # finished before any KV was computed
                    self._counts.append(FinishedCounts(req, [0] * runtime.num_layers, 0, 0))
                    continue
                self._counts.append(FinishedCounts(req, *found))
        if pages is not None:
            pages.release(connector_metadata.freed_req_keys)
            pages.set_request_values(connector_metadata.request_values)
            # plan the step the metadata builder just described (once: the layers reuse it)
            runtime.bind_step(connector_metadata.num_scheduled_tokens)

    def clear_connector_metadata(self) -> None:
        """After the step's forward pass: its plan is spent."""
        super().clear_connector_metadata()
        from vllm_kvzap.attention.runtime import get_runtime

        runtime = get_runtime()
        if runtime is not None:
            runtime.bound = None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        from vllm_kvzap.attention.runtime import get_runtime

        runtime = get_runtime()
        reports = {}
        if runtime is not None and runtime.pages is not None:
            runtime.pages.finish_step()  # after the forward pass: chunked prefill's compaction
            reports = runtime.pages.reports()
        if not self._counts and not reports:
            return None
        meta, self._counts = KVzapWorkerMetadata(self._counts, reports), []
        return meta

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        return

    # ---------------- scheduler side ----------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        return

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        for manager in kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, KVzapBlockManager):
                group = self._kv_cache_config.kv_cache_groups[manager.kv_cache_group_id]
                manager.pages_per_block = len(group.layer_names) * group.kv_cache_spec.num_kv_heads
                self._manager = manager
        if self.pruning.paged and self._manager is None:
            raise RuntimeError("kv_pruning paged mode: the KVzap block manager is not in use")

    def _page_bytes(self, dense: bool = False) -> int:
        """Bytes of one (layer, block, KV head) page: as the plugin holds it (K, V and scores), or
        as plain vLLM would (`dense`: K and V only)."""
        spec = self._kv_cache_config.kv_cache_groups[0].kv_cache_spec
        size = spec.dense_page_size_bytes if dense else spec.page_size_bytes
        return size // spec.num_kv_heads

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        block_size = self._kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        freed = [key for _, key in self._manager.take_freed()] if self._manager else []
        meta = KVzapConnectorMetadata(
            self._finished, freed, block_size, scheduler_output.total_num_scheduled_tokens
        )
        self._finished = []
        if self.pruning.paged:
            meta.request_values = self._starting_request_values(scheduler_output)
        return meta

    def _starting_request_values(self, scheduler_output) -> dict[int, float]:
        """Per-request values of the requests that take an index in this step, by request key."""
        from vllm_kvzap.request_options import request_value

        values = {}
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            value = request_value(params.extra_args if params else None, self.pruning)
            if value is not None:
                self._request_values[new.req_id] = value
                values[new.block_ids[0][0]] = value
        cached = scheduler_output.scheduled_cached_reqs
        for req_id in cached.resumed_req_ids:
            blocks = cached.new_block_ids[cached.req_ids.index(req_id)]
            if req_id in self._request_values and blocks:
                values[blocks[0][0]] = self._request_values[req_id]
        return values

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        self._finished.append(
            FinishedRequest(
                request_id=_external_request_id(request.request_id),
                engine_request_id=request.request_id,
                block_ids=list(block_ids),
                req_key=block_ids[0] if block_ids else -1,
                num_prompt_tokens=request.num_prompt_tokens,
                num_output_tokens=request.num_output_tokens,
                num_kv_tokens=request.num_computed_tokens,
                value=self._request_values.pop(request.request_id, None),
            )
        )
        return False, None

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, KVzapWorkerMetadata) or self._recorder is None:
            return
        if self._manager is not None and meta.reports:
            by_key = {
                blocks[0].block_id: req_id
                for req_id, blocks in self._manager.req_to_blocks.items()
                if blocks
            }
            for key, report in meta.reports.items():
                if key in by_key:
                    self._manager.apply_report(by_key[key], report)
            self._manager.shrink_reserve()
        for c in meta.counts:
            stats = request_stats(c.request, c.pruned_per_layer, self.num_kv_heads)
            if c.peak_pages is not None:
                page_bytes = self._page_bytes()
                pages_per_block = self._manager.pages_per_block if self._manager else 0
                pages_per_block *= self.num_ranks  # all ranks' pages, as the counts are
                dense_pages = pages_per_block * cdiv(c.request.num_kv_tokens, self._block_size())
                stats.update(
                    resident_kv_pages_peak=c.peak_pages,
                    resident_kv_pages_end=c.end_pages,
                    dense_kv_pages=dense_pages,
                    resident_kv_bytes_peak=c.peak_pages * page_bytes,
                    resident_kv_bytes_end=c.end_pages * page_bytes,
                    dense_kv_bytes=dense_pages * self._page_bytes(dense=True),
                )
            self._recorder.record(stats, self.num_kv_heads, c.request.value)
            self._counters["finished_requests"] += 1
            self._counters["pruned_pairs"] += sum(c.pruned_per_layer)
            num_layers = len(c.pruned_per_layer)
            self._counters["kv_pairs"] += num_layers * self.num_kv_heads * c.request.num_kv_tokens

    # ---------------- metrics (vLLM's KV-connector stats channel) ----------------
    def get_kv_connector_stats(self) -> KVzapConnectorStats | None:
        if self._recorder is None:  # worker side: the scheduler side reports everything
            return None
        data, self._counters = self._counters, dict.fromkeys(COUNTERS, 0)
        self._since_start["pruned_pairs_since_start"] += data["pruned_pairs"]
        self._since_start["kv_pairs_since_start"] += data["kv_pairs"]
        data.update(self._since_start)
        if self._manager is not None:
            held, dense = self._manager.block_usage()
            per_block = self._manager.pages_per_block * self.num_ranks
            data.update(resident_kv_bytes=held * self._page_bytes() * per_block,
                        dense_kv_bytes=dense * self._page_bytes(dense=True) * per_block)  # fmt: skip
        return KVzapConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data=None) -> KVzapConnectorStats:
        return KVzapConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVzapPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def _block_size(self) -> int:
        return self._kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
