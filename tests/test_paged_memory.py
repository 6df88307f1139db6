"""Paged mode: pruned pairs give their memory back, and nothing leaks.

One in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, uniprocess executor) so that the test
can read the scheduler's block pool and the worker's page pool directly. Checked against the
independent reference (`reference_dms.py`): the tokens, the pruned pairs, and the exact number of
pages each request holds at the end, recomputed from the reference's pruning masks with the page
layout's rule (per stream: ceil(survivors / block_size) pages plus the ring pages it touched).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine_harness import counting_preemptions, drain, offline_engine
from tests.reference_dms import dms_generate

WINDOW = 16
BLOCK_SIZE = 32
MAX_TOKENS = 48
PROMPT_LENS = (20, 70, 200, 333)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, 900, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    stats_path = tmp_path_factory.mktemp("paged") / "stats.jsonl"
    with offline_engine(
        in_process=True,
        model=str(tiny_model_dir["model"]),
        dtype="float32",
        max_model_len=1024,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=36 * 2**16,  # 36 blocks of 32 tokens: little room, preemptions
        distributed_executor_backend="uni",
        seed=0,
        additional_config={"kv_pruning": {
            "method": "kvzap-mlp", "threshold": -4, "window": WINDOW,
            "surrogate": str(tiny_model_dir["mlp"]), "stats_path": str(stats_path),
        }},
    ) as llm:  # fmt: skip
        yield llm, stats_path


def pools(llm):
    from vllm_kvzap.attention.runtime import get_runtime

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    return scheduler.kv_cache_manager.block_pool, get_runtime().pages


def live_requests(pages) -> int:
    return int((pages.requests.req_key >= 0).sum())


def expected_end_pages(ref: dict, window: int = WINDOW, block_size: int = BLOCK_SIZE) -> int:
    """Pages a finished request holds, from the reference's masks and the page layout rule:
    each (layer, head) row holds exactly the pairs its last step's query saw (the window, the
    token leaving it, the kept older ones), in ceil(that / block_size) pages."""
    n = ref["num_kv_tokens"]
    last = n - 1  # position of the last token written
    positions = torch.arange(n)
    total = 0
    for mask in ref["pruned_mask"]:  # [H, n] per layer, True = pruned
        seen = (positions >= last - window) | ~mask
        total += int((-(-seen.sum(dim=1) // block_size)).sum())
    return total


@pytest.fixture(scope="module")
def run(engine, tiny_model_dir):
    from vllm import SamplingParams

    llm, stats_path = engine
    block_pool, paged = pools(llm)
    free_blocks, free_pages = block_pool.get_num_free_blocks(), paged.num_free
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
    drain(llm)
    stats = {}
    for line in stats_path.read_text().splitlines():
        s = json.loads(line)
        stats[s["request_id"]] = s
    return {
        "outs": outs,
        "stats": stats,
        "free_before": (free_blocks, free_pages),
        "free_after": (block_pool.get_num_free_blocks(), paged.num_free),
        "live_requests": live_requests(paged),
    }


def test_tokens_and_pruned_pairs_equal_reference(run, tiny_model_dir):
    for prompt, out in zip(prompts(), run["outs"]):
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, MAX_TOKENS,
                           -4.0, WINDOW)  # fmt: skip
        assert list(out.outputs[0].token_ids) == ref["output_ids"]
        stats = run["stats"][out.request_id]
        ref_pairs = [int(m.sum()) for m in ref["pruned_mask"]]
        assert all(abs(a - b) <= 1 for a, b in zip(stats["pruned_pairs_per_layer"], ref_pairs))


def test_resident_pages_follow_what_is_kept(run, tiny_model_dir):
    for prompt, out in zip(prompts(), run["outs"]):
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, MAX_TOKENS,
                           -4.0, WINDOW)  # fmt: skip
        stats = run["stats"][out.request_id]
        assert stats["resident_kv_pages_end"] == expected_end_pages(ref)
        assert stats["resident_kv_pages_end"] <= stats["resident_kv_pages_peak"]
    longest = run["stats"][run["outs"][-1].request_id]
    # the 333-token prompt: far less than the dense pages plain vLLM would hold
    assert longest["resident_kv_pages_end"] < 0.8 * longest["dense_kv_pages"]
    # its peak is the dense prompt, held until the first decoding step compacts it
    assert longest["resident_kv_pages_peak"] > longest["resident_kv_pages_end"]


def test_pools_return_to_their_initial_free_count(run):
    assert run["free_after"] == run["free_before"]
    assert run["live_requests"] == 0


def test_preemption_recomputes_and_frees_everything(engine):
    """A budget too small for all requests at once: some are preempted and recomputed, and keep
    their own per-request thresholds across the restart."""
    from vllm import SamplingParams

    from vllm_kvzap.stats import wait_for_stats

    llm, stats_path = engine
    block_pool, paged = pools(llm)
    before = (block_pool.get_num_free_blocks(), paged.num_free)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    g = torch.Generator().manual_seed(2)
    many = [torch.randint(10, 900, (400,), generator=g).tolist() for _ in range(10)]
    values = ["none" if i % 2 else -3.0 for i in range(len(many))]
    params = [SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True,
                             extra_args={"kv_pruning": v}) for v in values]  # fmt: skip
    with counting_preemptions(scheduler) as preemptions:
        outs = llm.generate([{"prompt_token_ids": p} for p in many], params)
        drain(llm)
    assert all(len(o.outputs[0].token_ids) == 200 for o in outs)
    assert preemptions, "the workload was meant to preempt; shrink the budget"
    ids = {o.request_id for o in outs}
    lines = [s for s in wait_for_stats(stats_path, 10**6, timeout_s=5) if s["request_id"] in ids]
    stats = {s["request_id"]: s for s in lines}
    from vllm_kvzap.connector import _external_request_id

    off = {o.request_id for o, v in zip(outs, values) if v == "none"}
    assert off & {_external_request_id(r) for r in preemptions}, "no 'none' request was preempted"
    for out, value in zip(outs, values):  # preempted ones included: the value survives a restart
        s = stats[out.request_id]
        assert s["per_request"] and s["threshold"] == (float("-inf") if value == "none" else value)
        assert (s["pruned_fraction"] == 0.0) == (value == "none")
    assert (block_pool.get_num_free_blocks(), paged.num_free) == before
    assert live_requests(paged) == 0


def test_aborted_requests_free_everything(engine):
    from vllm import SamplingParams

    llm, _ = engine
    block_pool, paged = pools(llm)
    before = (block_pool.get_num_free_blocks(), paged.num_free)
    engine_ = llm.llm_engine
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for i, n in enumerate((60, 150, 90)):
        engine_.add_request(f"abort-{i}", {"prompt_token_ids": list(range(10, 10 + n))}, params)
    for _ in range(8):  # prompts done, a few decoding steps: pages are compacted and in use
        engine_.step()
    assert live_requests(paged) and paged.num_free < before[1]
    engine_.abort_request(["abort-0", "abort-2"])
    finished = []
    while engine_.has_unfinished_requests():
        finished += [o.request_id for o in engine_.step() if o.finished]
    drain(llm)
    assert finished == ["abort-1"]
    assert (block_pool.get_num_free_blocks(), paged.num_free) == before
    assert live_requests(paged) == 0


def test_soak_random_lengths_preemptions_and_aborts(engine):
    """Many requests of random prompt and output lengths in a budget that forces preemptions,
    some aborted mid-way: the page pool never runs out under the scheduler's accounting (the
    worker raises if it would), every other request completes, and nothing leaks."""
    from vllm import SamplingParams

    llm, _ = engine
    block_pool, paged = pools(llm)
    before = (block_pool.get_num_free_blocks(), paged.num_free)
    engine_ = llm.llm_engine
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 420, (40,), generator=g).tolist()
    outs = torch.randint(1, 160, (40,), generator=g).tolist()
    for i, (n, m) in enumerate(zip(lens, outs)):
        prompt = torch.randint(10, 900, (n,), generator=g).tolist()
        params = SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
        engine_.add_request(f"soak-{i}", {"prompt_token_ids": prompt}, params)
    aborted = {f"soak-{i}" for i in range(0, 40, 7)}
    done, steps, low = {}, 0, paged.pool.capacity
    while engine_.has_unfinished_requests():
        for o in engine_.step():
            if o.finished:
                done[o.request_id] = len(o.outputs[0].token_ids)
        steps += 1
        low = min(low, paged.num_free)
        if steps == 30:
            engine_.abort_request(sorted(aborted))
    drain(llm)
    expected = {f"soak-{i}": m for i, m in enumerate(outs) if f"soak-{i}" not in aborted}
    assert {k: v for k, v in done.items() if k in expected} == expected
    assert low < 0.5 * paged.pool.capacity  # the pool was really under pressure
    assert (block_pool.get_num_free_blocks(), paged.num_free) == before
    assert live_requests(paged) == 0
