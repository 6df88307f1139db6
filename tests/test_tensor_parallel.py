"""Tensor parallelism (TP=2) with pruning, against the independent reference.

vLLM's CPU build runs TP=2 here with its multiprocessing executor, one core per rank
(`VLLM_CPU_OMP_THREADS_BIND="0|1"`); the engine core runs in the test process, so the scheduler's
block pool is read directly and each rank's page table through `LLM.collective_rpc`. Each rank
holds one of the tiny model's two KV heads, scores it with its shard of the surrogate, and keeps its
own page table and pool. Checked:
- tokens, log-probabilities and per-layer pruned pairs (summed over the ranks by the connector's
  aggregation) equal the plain-torch DMS reference, as TP=1's do (`test_engine_offline.py`); the
  pages a request holds at its end, summed over ranks, follow the page layout rule applied to the
  reference's masks; with chunked prefill;
- a batch of per-request thresholds (`"none"` included) gives each request the reference's result
  at its own value;
- a batch that outgrows the KV budget preempts, completes, and aborted requests free everything:
  the scheduler's blocks and every rank's pages return to their initial free counts;
- ratio mode: AdaKV's layer-wide rule spans both ranks' heads (an all-gather), and the result
  equals the AdaKV reference.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from tests.engine_harness import counting_preemptions, drain
from tests.reference_dms import dms_generate
from tests.test_paged_memory import expected_end_pages
from vllm_kvzap.stats import wait_for_stats

WINDOW = 16
BLOCK_SIZE = 16
MAX_TOKENS = 24
PROMPT_LENS = (9, 40, 150)
TP_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",  # one core per rank
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc(rank_pools)
}


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(10, 900, (n,), generator=g).tolist() for n in PROMPT_LENS]


def rank_pools(worker) -> dict:
    """On each rank: its heads, free pages, total pages and live requests of its page table."""
    from vllm_kvzap.attention.runtime import get_runtime

    runtime = get_runtime()
    pages = runtime.pages
    return {
        "first_head": runtime.heads.first if runtime.heads else 0,
        "num_kv_heads": runtime.num_kv_heads,
        "free": pages.num_free,
        "held": pages.pool.num_pages_total - pages.num_free,
        "live": int((pages.requests.req_key >= 0).sum()),
    }


def start_engine(tiny, stats_path, pruning: dict, **kwargs):
    from vllm import LLM

    return LLM(
        model=str(tiny["model"]),
        dtype="float32",
        max_model_len=1024,
        block_size=BLOCK_SIZE,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        enforce_eager=True,  # compilation is tested elsewhere (test_compile.py); starts faster
        seed=0,
        additional_config={"kv_pruning": {**pruning, "stats_path": str(stats_path)}},
        **kwargs,
    )


@pytest.fixture(scope="module")
def tp_env():
    old = {k: os.environ.get(k) for k in TP_ENV}
    os.environ.update(TP_ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def shutdown(llm) -> None:
    if getattr(llm, "_test_closed", False):
        return
    llm._test_closed = True
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


@pytest.fixture(scope="module")
def engine(tp_env, tiny_model_dir, tmp_path_factory):
    stats_path = tmp_path_factory.mktemp("tp") / "stats.jsonl"
    pruning = {"method": "kvzap-mlp", "threshold": -4, "window": WINDOW,
               "surrogate": str(tiny_model_dir["mlp"])}  # fmt: skip
    llm = start_engine(
        tiny_model_dir, stats_path, pruning,
        kv_cache_memory_bytes=17 * 2**16,  # per rank: 66 blocks of 16 tokens, preemptions
        enable_chunked_prefill=True, max_num_batched_tokens=64, max_num_seqs=8,
    )  # fmt: skip
    try:
        yield llm, stats_path
    finally:
        shutdown(llm)


def free_counts(llm) -> tuple[int, list[int]]:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    blocks = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    return blocks, [r["free"] for r in llm.collective_rpc(rank_pools)]


def generate(llm, stats_path, prompt_ids, values=None, max_tokens=MAX_TOKENS) -> list[dict]:
    from vllm import SamplingParams

    def params(value):
        extra = None if value is None else {"kv_pruning": value}
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                              logprobs=1, extra_args=extra)  # fmt: skip

    values = values or [None] * len(prompt_ids)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], [params(v) for v in values])
    drain(llm)
    ids = {o.request_id for o in outs}
    lines = [s for s in wait_for_stats(stats_path, 10**6, timeout_s=5) if s["request_id"] in ids]
    stats = {s["request_id"]: s for s in lines}
    results = []
    for out in outs:
        c = out.outputs[0]
        tokens = list(c.token_ids)
        logprobs = [c.logprobs[i][t].logprob for i, t in enumerate(tokens)]
        results.append({"tokens": tokens, "logprobs": logprobs, "stats": stats[out.request_id]})
    return results


def check_reference(result: dict, ref: dict, exact: bool = False) -> None:
    assert result["tokens"] == ref["output_ids"]
    ref_logprobs = [
        torch.log_softmax(ref["logits"][i], -1)[t].item() for i, t in enumerate(result["tokens"])
    ]
    assert result["logprobs"] == pytest.approx(ref_logprobs, abs=1e-3)
    stats = result["stats"]
    assert stats["num_kv_tokens"] == ref["num_kv_tokens"]
    ref_pairs = [int(m.sum()) for m in ref["pruned_mask"]]
    if exact:  # ratio mode: counts are the rule's, exactly
        assert stats["pruned_pairs_per_layer"] == ref_pairs
    else:  # equal up to float noise in scores that sit exactly at the threshold
        assert all(abs(a - b) <= 1 for a, b in zip(stats["pruned_pairs_per_layer"], ref_pairs))


@pytest.fixture(scope="module")
def first_run(engine):
    llm, stats_path = engine
    before = free_counts(llm)
    results = generate(llm, stats_path, prompts())
    return results, before, free_counts(llm), llm.collective_rpc(rank_pools)


def test_each_rank_holds_its_own_heads(first_run):
    *_, ranks = first_run
    assert [(r["first_head"], r["num_kv_heads"]) for r in ranks] == [(0, 1), (1, 1)]


def test_tokens_logprobs_and_pruned_pairs_equal_the_reference(first_run, tiny_model_dir):
    results, *_ = first_run
    pruned = 0
    for prompt, result in zip(prompts(), results):
        ref = dms_generate(
            tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, MAX_TOKENS, -4.0, WINDOW
        )
        check_reference(result, ref)
        # pages at the end, summed over the ranks' heads, follow the layout rule
        assert result["stats"]["resident_kv_pages_end"] == expected_end_pages(
            ref, WINDOW, BLOCK_SIZE
        )
        pruned += sum(result["stats"]["pruned_pairs_per_layer"])
    assert pruned > 0


def test_every_rank_returns_its_pages(first_run):
    _, before, after, ranks = first_run
    assert after == before
    assert all(r["live"] == 0 for r in ranks)


def test_per_request_thresholds_equal_the_reference_at_each_value(engine, tiny_model_dir):
    llm, stats_path = engine
    values = ["none", -3.0, -5.0]
    results = generate(llm, stats_path, prompts(), values)
    for prompt, value, result in zip(prompts(), values, results):
        threshold = float("-inf") if value == "none" else value
        ref = dms_generate(
            tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, MAX_TOKENS, threshold, WINDOW
        )
        check_reference(result, ref)
        assert result["stats"]["threshold"] == threshold


def test_preemption_and_aborts_free_every_ranks_pages(engine):
    from vllm import SamplingParams

    llm, stats_path = engine
    before = free_counts(llm)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    engine_ = llm.llm_engine
    with counting_preemptions(scheduler) as preemptions:
        g = torch.Generator().manual_seed(4)
        for i in range(8):  # every other request unpruned: dense, growing memory
            params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True,
                                    extra_args={"kv_pruning": "none" if i % 2 else -4.0})
            ids = torch.randint(10, 900, (300,), generator=g).tolist()
            engine_.add_request(f"tp-{i}", {"prompt_token_ids": ids}, params)
        for _ in range(12):
            engine_.step()
        engine_.abort_request(["tp-1", "tp-6"])
        finished = {}
        while engine_.has_unfinished_requests():
            for o in engine_.step():
                if o.finished:
                    finished[o.request_id] = len(o.outputs[0].token_ids)
        drain(llm)
    assert preemptions, "the workload was meant to preempt; shrink the budget"
    assert finished == {f"tp-{i}": 120 for i in range(8) if i not in (1, 6)}
    assert free_counts(llm) == before
    assert all(r["live"] == 0 for r in llm.collective_rpc(rank_pools))


def test_ratio_mode_spans_both_ranks_heads(tp_env, tiny_model_dir, tmp_path_factory, engine):
    """AdaKV prunes a share of each layer over all its heads: the ranks gather their scores."""
    from tests.reference_dms import dms_generate as reference

    llm, _ = engine
    shutdown(llm)  # one engine at a time (two cores)
    stats_path = tmp_path_factory.mktemp("tp_ratio") / "stats.jsonl"
    pruning = {"method": "kvzap-mlp", "ratio": 0.5, "surrogate": str(tiny_model_dir["mlp"])}
    llm = start_engine(
        tiny_model_dir, stats_path, pruning, kv_cache_memory_bytes=64 * 2**20,
        enable_chunked_prefill=True, max_num_batched_tokens=48,
    )  # fmt: skip
    try:
        before = free_counts(llm)
        results = generate(llm, stats_path, prompts())
        assert free_counts(llm) == before
    finally:
        shutdown(llm)
    for prompt, result in zip(prompts(), results):
        ref = reference(
            tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, MAX_TOKENS, ratio=0.5
        )
        check_reference(result, ref, exact=True)


def test_ranks_metadata_adds_counts_and_takes_the_larger_need():
    """`KVzapWorkerMetadata.aggregate` (vLLM's KVOutputAggregator calls it across ranks): a
    request's pruned pairs and pages add up over the ranks' heads, its report is the larger need,
    requests only one rank reported pass through, and the order of ranks does not matter."""
    from vllm_kvzap.cache.step_plan import ResidentReport
    from vllm_kvzap.connector import FinishedCounts, KVzapWorkerMetadata
    from vllm_kvzap.stats import FinishedRequest

    def request(i):
        return FinishedRequest(f"r{i}", f"r{i}-x", [i], i, 10, 5, 14, None)

    rank0 = KVzapWorkerMetadata(
        [FinishedCounts(request(1), [3, 4], 9, 7), FinishedCounts(request(2), [1, 0], 2, 2)],
        {5: ResidentReport(4, 5, False), 6: ResidentReport(1, 1, True)},
    )
    rank1 = KVzapWorkerMetadata(
        [FinishedCounts(request(1), [2, 6], 8, 8)],
        {5: ResidentReport(6, 6, False), 7: ResidentReport(2, 3, False)},
    )
    for merged in (rank0.aggregate(rank1), rank1.aggregate(rank0)):
        counts = {c.request.request_id: c for c in merged.counts}
        assert (counts["r1"].pruned_per_layer, counts["r1"].peak_pages) == ([5, 10], 17)
        assert counts["r1"].end_pages == 15
        assert counts["r2"].pruned_per_layer == [1, 0]
        assert merged.reports == {
            5: ResidentReport(6, 6, False), 6: ResidentReport(1, 1, True),
            7: ResidentReport(2, 3, False),
        }  # fmt: skip
