"""Scheduler-side accounting of a request's KV memory by its resident pages, not its tokens.

A vLLM block id is a *slab*: on the worker it holds one page of `block_size` token slots for every
(layer, KV head) pair, so `pages_per_block = L * H_kv`. The worker's page pool (`pages.py`) hands
pages of any slab to any stream; this manager only guarantees that the sum over requests of pages
in use never exceeds the slabs they hold. A request holds:
- while its prompt is processed (or recomputed after preemption), the dense amount: one slab per
  `block_size` tokens, exactly like plain vLLM; with chunked prefill (`prefill: chunked`), from
  its second chunk on, the slabs of the pages it held after the last chunk (compacted) plus the
  dense amount of the new chunk;
- afterwards, the whole slabs of the pages it may hold during its next step, as reported by the
  worker after each step (through the plugin's KV connector); what is left over (less than one
  slab per request) is summed over all decoding requests and covered by a shared *reserve* of
  `ceil(sum / pages_per_block)` slabs that the manager holds itself, so rounding costs less than
  one slab in all instead of up to one per request. Slabs above that go back to the block pool at
  once, so admission, growth and preemption all see the compressed size.
Only a request's first allocation is sent to the worker (its first block id keys the request's
pages there); later slabs are pure accounting, so the worker's block-table rows never grow.
"""

from __future__ import annotations

from vllm_kvzap.cache.step_plan import ResidentReport
from vllm_kvzap.compat import FullAttentionManager, cdiv


class KVzapBlockManager(FullAttentionManager):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._record_new_block_ids = False  # the worker must not zero slabs: pages are shared
        self.pages_per_block = 0  # set by the connector (needs the number of layers)
        self.reports: dict[str, ResidentReport] = {}
        self.freed: list[tuple[str, int]] = []  # (request id, key) since the last step
        self.dense_blocks: dict[str, int] = {}  # what plain vLLM would hold, for the metrics
        self.leftover: dict[str, int] = {}  # pages beyond a decoding request's whole slabs
        self.reserve: list = []  # slabs covering the sum of the leftovers
        self._target: tuple[str, int, int] | None = None

    def _split(self, next_pages: int) -> tuple[int, int]:
        """(whole slabs, leftover pages) of a decoding request; at least one slab (its key)."""
        whole = max(1, next_pages // self.pages_per_block)
        return whole, max(0, next_pages - whole * self.pages_per_block)

    def _target_blocks(self, request_id: str, num_tokens: int, num_computed: int):
        """(slabs the request holds itself, leftover pages for the reserve) for this step."""
        report = self.reports.get(request_id)
        chunk = num_tokens - num_computed
        if report is None or (chunk != 1 and report.dense):
            return cdiv(num_tokens, self.block_size), 0  # a prompt chunk: dense, as in vLLM
        if chunk != 1:  # chunked prefill: the compacted prompt so far, then the chunk in order
            # (a row of r slots needs at most ceil(r / bs) + ceil(chunk / bs) pages)
            return cdiv(report.pages, self.pages_per_block) + cdiv(chunk, self.block_size), 0
        if report.dense:  # first decoding step: the prompt is compacted during it
            target = cdiv(report.next_pages, self.pages_per_block)
            return max(1, target, cdiv(num_tokens, self.block_size)), 0
        return self._split(report.next_pages)

    def _reserve_needed(self, request_id: str | None = None, leftover: int = 0) -> int:
        total = sum(self.leftover.values()) + leftover - self.leftover.get(request_id, 0)
        return cdiv(total, self.pages_per_block) if self.pages_per_block else 0

    def _resize_reserve(self, target: int) -> None:
        if target > len(self.reserve):
            self.reserve.extend(self.block_pool.get_new_blocks(target - len(self.reserve)))
        elif target < len(self.reserve):
            surplus = self.reserve[target:]
            del self.reserve[target:]
            self.block_pool.free_blocks(reversed(surplus))

    def get_num_blocks_to_allocate(
        self, request_id, num_tokens, new_computed_blocks, total_computed_tokens, *args, **kwargs
    ) -> int:
        assert not new_computed_blocks, "prefix caching is off while pruning"
        target, leftover = self._target_blocks(request_id, num_tokens, total_computed_tokens)
        self.dense_blocks[request_id] = cdiv(num_tokens, self.block_size)
        self._target = (request_id, target, leftover)
        own = max(target - len(self.req_to_blocks.get(request_id, ())), 0)
        return own + max(0, self._reserve_needed(request_id, leftover) - len(self.reserve))

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        if self._target is not None and self._target[0] == request_id:
            _, target, leftover = self._target
        else:
            target, leftover = cdiv(num_tokens, self.block_size), 0
        self._target = None
        self._resize_reserve(max(len(self.reserve), self._reserve_needed(request_id, leftover)))
        self.leftover[request_id] = leftover
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
        # between steps: the reserve grows when the next step is scheduled (where the scheduler
        # can wait or preempt), and shrinks in `shrink_reserve`
        keep, self.leftover[request_id] = self._split(report.next_pages)
        req_blocks = self.req_to_blocks[request_id]
        if len(req_blocks) > keep:
            surplus = req_blocks[keep:]
            del req_blocks[keep:]
            self.block_pool.free_blocks(reversed(surplus))

    def shrink_reserve(self) -> None:
        """Give back reserve slabs no leftover needs any more (after reports, frees)."""
        self._resize_reserve(min(len(self.reserve), self._reserve_needed()))

    def free(self, request_id: str) -> None:
        blocks = self.req_to_blocks.get(request_id)
        if blocks:
            self.freed.append((request_id, blocks[0].block_id))
        self.reports.pop(request_id, None)
        self.dense_blocks.pop(request_id, None)
        self.leftover.pop(request_id, None)
        super().free(request_id)
        self.shrink_reserve()

    def block_usage(self) -> tuple[int, int]:
        """(blocks held by requests and the reserve, blocks plain vLLM would hold for them)."""
        held = sum(len(blocks) for blocks in self.req_to_blocks.values()) + len(self.reserve)
        return held, sum(self.dense_blocks.values())

    def take_freed(self) -> list[tuple[str, int]]:
        freed, self.freed = self.freed, []
        return freed

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0
