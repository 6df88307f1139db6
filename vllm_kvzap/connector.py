"""The plugin's KV connector: vLLM's official channel between scheduler and workers.

It moves no KV data. Scheduler side: when a request finishes it records the request's blocks
and token counts and ships them to the workers with the next step's connector metadata. Worker
side: at bind time (before that step writes anything into the freed blocks) it counts the
request's pruned pairs per layer from the keep caches and returns them with the step's output;
the scheduler side then writes the statistics (`stats.py`). The engine runs one more (possibly
empty) step after a request finishes, so every finished request is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from vllm_kvzap.config import KVPruningConfig
from vllm_kvzap.stats import FinishedRequest, StatsRecorder, request_stats


@dataclass
class KVzapConnectorMetadata(KVConnectorMetadata):
    finished: list[FinishedRequest] = field(default_factory=list)
    block_size: int = 0


@dataclass
class KVzapWorkerMetadata(KVConnectorWorkerMetadata):
    # (finished request, pruned pairs per layer)
    counts: list[tuple[FinishedRequest, list[int]]] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVzapWorkerMetadata)
        return KVzapWorkerMetadata(self.counts + other.counts)


def _external_request_id(engine_request_id: str) -> str:
    """The id the user sees: vLLM appends "-<8 random chars>" to it inside the engine."""
    from vllm import envs

    if envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION:
        return engine_request_id
    return engine_request_id.rsplit("-", 1)[0]


class KVzapPruningConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.pruning = KVPruningConfig.from_additional_config(vllm_config.additional_config)
        self.num_kv_heads = vllm_config.model_config.get_total_num_kv_heads()
        self._finished: list[FinishedRequest] = []
        self._counts: list[tuple[FinishedRequest, list[int]]] = []
        self._recorder = (
            StatsRecorder(self.pruning.stats_path, self.pruning.method)
            if role == KVConnectorRole.SCHEDULER
            else None
        )

    # ---------------- worker side ----------------
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, KVzapConnectorMetadata)
        if not connector_metadata.finished:
            return
        from vllm_kvzap.attention.runtime import get_runtime

        runtime = get_runtime()
        for req in connector_metadata.finished:
            if runtime is None:
                counts = []
            else:
                counts = runtime.count_pruned(
                    req.block_ids, req.num_kv_tokens, connector_metadata.block_size
                )
            self._counts.append((req, counts))

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._counts:
            return None
        meta, self._counts = KVzapWorkerMetadata(self._counts), []
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

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        block_size = self._kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        meta, self._finished = KVzapConnectorMetadata(self._finished, block_size), []
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        self._finished.append(
            FinishedRequest(
                request_id=_external_request_id(request.request_id),
                engine_request_id=request.request_id,
                block_ids=list(block_ids),
                num_prompt_tokens=request.num_prompt_tokens,
                num_output_tokens=request.num_output_tokens,
                num_kv_tokens=request.num_computed_tokens,
            )
        )
        return False, None

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, KVzapWorkerMetadata) or self._recorder is None:
            return
        for req, counts in meta.counts:
            self._recorder.record(request_stats(req, counts, self.num_kv_heads), self.num_kv_heads)
