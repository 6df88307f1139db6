"""Scheduler-side accounting of a request's KV memory by its resident pages, not its tokens.

A vLLM block id is a *slab*: on the worker it holds one page of `block_size` token slots for every
(layer, KV head) pair, so `pages_per_block = L * H_kv`. The worker's page pool (`pages.py`) hands
pages of any slab to any stream; this manager only guarantees that the sum over requests of pages
in use never exceeds the slabs they hold. A request holds:
- while its prompt is processed (or recomputed after preemption), the dense amount: one slab per
  `block_size` tokens, exactly like plain vLLM;
- afterwards, `ceil(pages it may hold during its next step / pages_per_block)` slabs, as reported by
  the worker after each step (through the plugin's KV connector). Slabs above that go back to the
  block pool at once, so admission, growth and preemption all see the compressed size.
Only a request's first allocation is sent to the worker (its first block id keys the request's
pages there); later slabs are pure accounting, so the worker's block-table rows never grow.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager


@dataclass
class ResidentReport:
    pages: int  # pages held after the last step
    next_pages: int  # most pages the next decoding step may hold
    dense: bool  # still in its prompt: the next step is a prefill chunk


class KVzapBlockManager(FullAttentionManager):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._record_new_block_ids = False  # the worker must not zero slabs: pages are shared
        self.pages_per_block = 0  # set by the connector (needs the number of layers)
        self.reports: dict[str, ResidentReport] = {}
        self.freed: list[tuple[str, int]] = []  # (request id, key) since the last step
        self.dense_blocks: dict[str, int] = {}  # what plain vLLM would hold, for the metrics
        self._target: tuple[str, int] | None = None

    def _target_blocks(self, request_id: str, num_tokens: int, num_computed: int) -> int:
        report = self.reports.get(request_id)
        if report is None or num_tokens - num_computed != 1:
            return cdiv(num_tokens, self.block_size)  # a prompt chunk: dense, as in vLLM
        target = cdiv(report.next_pages, self.pages_per_block)
        if report.dense:  # first decoding step: the prompt is compacted during it
            target = max(target, cdiv(num_tokens, self.block_size))
        return max(1, target)

    def get_num_blocks_to_allocate(
        self, request_id, num_tokens, new_computed_blocks, total_computed_tokens, *args, **kwargs
    ) -> int:
        assert not new_computed_blocks, "prefix caching is off while pruning"
        target = self._target_blocks(request_id, num_tokens, total_computed_tokens)
        self.dense_blocks[request_id] = cdiv(num_tokens, self.block_size)
        self._target = (request_id, target)
        return max(target - len(self.req_to_blocks.get(request_id, ())), 0)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        if self._target is not None and self._target[0] == request_id:
            target = self._target[1]
        else:
            target = cdiv(num_tokens, self.block_size)
        self._target = None
        req_blocks = self.req_to_blocks[request_id]
        first_allocation = not req_blocks
        if target <= len(req_blocks):
            return []
        new_blocks = self.block_pool.get_new_blocks(target - len(req_blocks))
        req_blocks.extend(new_blocks)
        return new_blocks if first_allocation else []

    def apply_report(self, request_id: str, report: ResidentReport) -> None:
        """Record the worker's report and give back slabs the request no longer needs."""
        if request_id not in self.req_to_blocks:
            return  # finished or preempted meanwhile
        self.reports[request_id] = report
        if report.dense:
            return
        keep = max(1, cdiv(report.next_pages, self.pages_per_block))
        req_blocks = self.req_to_blocks[request_id]
        if len(req_blocks) > keep:
            surplus = req_blocks[keep:]
            del req_blocks[keep:]
            self.block_pool.free_blocks(reversed(surplus))

    def free(self, request_id: str) -> None:
        blocks = self.req_to_blocks.get(request_id)
        if blocks:
            self.freed.append((request_id, blocks[0].block_id))
        self.reports.pop(request_id, None)
        self.dense_blocks.pop(request_id, None)
        super().free(request_id)

    def block_usage(self) -> tuple[int, int]:
        """(blocks held by requests, blocks plain vLLM would hold for them)."""
        held = sum(len(blocks) for blocks in self.req_to_blocks.values())
        return held, sum(self.dense_blocks.values())

    def take_freed(self) -> list[tuple[str, int]]:
        freed, self.freed = self.freed, []
        return freed

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0
