"""`prefill: chunked` in an engine: prompts pruned while they are prefilled.

One in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with vLLM's chunked prefill (48 tokens
a step), long prompts and a KV budget far below their dense sum; at two chosen steps the requests
in the middle of their prompt are preempted with vLLM's own routine (`Scheduler._preempt_request`:
this budget alone makes the scheduler wait rather than preempt, since prompts no longer grow
dense). vLLM's scheduler decides the chunks; the test records them (a
wrapper around `Scheduler.schedule`) and gives each request's chunks to the independent reference
(`reference_dms.dms_generate(..., prefill_chunks=...)`), which judges the prompt tokens older than
the window after each chunk. Checked: every request completes; tokens, log-probs and pruned pairs
equal the reference's for each request whose last computation started before its first output
token (a request preempted while decoding recomputes its generated tokens as prompt); pages at the
end and at the peak follow the reference's masks with the page layout rule; the peak stays far
below the dense prompt; both pools return to their initial free counts.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from tests.engine_harness import counting_preemptions, drain, offline_engine
from tests.reference_dms import dms_generate
from tests.test_paged_memory import expected_end_pages

WINDOW = 16
BLOCK_SIZE = 32
CHUNK = 48  # max_num_batched_tokens
MAX_TOKENS = 32
PROMPT_LENS = (900, 40, 610, 130, 96, 450)  # 96: two whole chunks
PREEMPT_AT = (6, 30)  # scheduler steps before which the requests in mid-prompt are preempted


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(10, 900, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    from vllm import SamplingParams

    from vllm_kvzap.attention.runtime import get_runtime

    stats_path = tmp_path_factory.mktemp("chunked") / "stats.jsonl"
    with offline_engine(
        in_process=True,
        model=str(tiny_model_dir["model"]),
        dtype="float32",
        max_model_len=960,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=34 * 2**16,  # 34 blocks of 32 tokens: 1088 tokens dense
        enable_chunked_prefill=True,
        max_num_batched_tokens=CHUNK,
        max_num_seqs=6,
        distributed_executor_backend="uni",
        seed=0,
        additional_config={"kv_pruning": {
            "method": "kvzap-mlp", "threshold": -4, "window": WINDOW, "prefill": "chunked",
            "surrogate": str(tiny_model_dir["mlp"]), "stats_path": str(stats_path),
        }},
    ) as llm:  # fmt: skip
        core = llm.llm_engine.engine_core.engine_core
        scheduler, pages = core.scheduler, get_runtime().pages
        block_pool = scheduler.kv_cache_manager.block_pool
        free_before = (block_pool.get_num_free_blocks(), pages.num_free)
        steps: dict[tuple, list[tuple[int, int]]] = {}  # prompt -> (computed before, scheduled)
        schedule, calls = scheduler.schedule, []

        def recording_schedule(*args, **kwargs):
            calls.append(None)
            if len(calls) in PREEMPT_AT:  # vLLM's own preemption, at a chosen time
                for request in list(scheduler.running):
                    if 0 < request.num_computed_tokens < request.num_prompt_tokens:
                        scheduler.running.remove(request)
                        scheduler._preempt_request(request, time.monotonic())
            out = schedule(*args, **kwargs)
            for req_id, n in out.num_scheduled_tokens.items():
                request = scheduler.requests[req_id]
                steps.setdefault(tuple(request.prompt_token_ids), []).append(
                    (request.num_computed_tokens - n, n)  # the scheduler already advanced it
                )
            return out

        scheduler.schedule = recording_schedule
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                logprobs=1)  # fmt: skip
        with counting_preemptions(scheduler) as preempted:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params)
            drain(llm)
        scheduler.schedule = schedule
        stats = {}
        for line in stats_path.read_text().splitlines():
            s = json.loads(line)
            stats[s["request_id"]] = s
        yield {
            "outs": outs, "stats": stats, "steps": steps, "preempted": preempted,
            "free_before": free_before,
            "free_after": (block_pool.get_num_free_blocks(), pages.num_free),
        }  # fmt: skip


def last_prompt_chunks(steps: list[tuple[int, int]], prompt_len: int) -> list[int] | None:
    """The chunks of the request's last computation from its first token, or None if that
    computation began after its first output token (it then recomputes generated tokens)."""
    start = max(i for i, (before, _) in enumerate(steps) if before == 0)
    chunks, done = [], 0
    for before, n in steps[start:]:
        if before >= prompt_len:
            break
        chunks.append(n)
        done = before + n
    return chunks if done == prompt_len else None


def preempted_mid_prompt(steps: list[tuple[int, int]], prompt_len: int) -> bool:
    """Restarted from token 0 after a computation that had not finished its prompt."""
    restarts = [i for i, (before, _) in enumerate(steps) if before == 0 and i > 0]
    return any(steps[i - 1][0] + steps[i - 1][1] < prompt_len for i in restarts)


def expected_peak_pages(ref: dict, chunks: list[int]) -> int:
    """The most pages the request held: at the end of a prompt chunk, before its compaction (each
    row: the kept pairs judged before the chunk, then every token from `judged` to the chunk's
    end), or at the end (pages never shrink while decoding)."""
    peak, end = 0, 0
    for size in chunks:
        start, end = end, end + size
        judged = max(start - WINDOW, 0)
        pages = 0
        for mask in ref["pruned_mask"]:  # [H, n] per layer, True = pruned
            kept = (~mask[:, :judged]).sum(dim=1) + (end - judged)
            pages += int((-(-kept // BLOCK_SIZE)).sum())
        peak = max(peak, pages)
    return max(peak, expected_end_pages(ref, WINDOW, BLOCK_SIZE))


def comparable(run) -> list[tuple]:
    found = []
    for prompt, out in zip(prompts(), run["outs"]):
        chunks = last_prompt_chunks(run["steps"][tuple(prompt)], len(prompt))
        if chunks is not None:
            found.append((prompt, out, chunks))
    return found


def test_every_request_completes_under_preemption_mid_prompt(run):
    assert [len(o.outputs[0].token_ids) for o in run["outs"]] == [MAX_TOKENS] * len(PROMPT_LENS)
    assert run["preempted"], "no preemption: the budget is not tight enough"
    mid = [preempted_mid_prompt(run["steps"][tuple(p)], len(p)) for p in prompts()]
    assert any(mid), "no request was preempted in the middle of its prompt"
    restarted = [p for p, m in zip(prompts(), mid) if m]
    assert {tuple(p) for p in restarted} <= {tuple(p) for p, _, _ in comparable(run)}
    assert len(comparable(run)) >= 4
    # vLLM chunked the prompts: some in chunks of CHUNK, others cut by the step's token budget
    assert any(len(chunks) > 2 and len(set(chunks[:-1])) > 1 for _, _, chunks in comparable(run))


def test_tokens_logprobs_and_pruned_pairs_equal_reference(run, tiny_model_dir):
    for prompt, out, chunks in comparable(run):
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, MAX_TOKENS,
                           -4.0, WINDOW, prefill_chunks=chunks)  # fmt: skip
        got = out.outputs[0]
        assert list(got.token_ids) == ref["output_ids"], chunks
        for tok, lp, logits in zip(got.token_ids, got.logprobs, ref["logits"]):
            want = float(torch.log_softmax(logits.double(), -1)[tok])
            assert math.isclose(lp[tok].logprob, want, abs_tol=2e-3)
        stats = run["stats"][out.request_id]
        ref_pairs = [int(m.sum()) for m in ref["pruned_mask"]]
        assert stats["pruned_pairs_per_layer"] == ref_pairs
        assert stats["resident_kv_pages_end"] == expected_end_pages(ref, WINDOW, BLOCK_SIZE)
        assert stats["resident_kv_pages_peak"] == expected_peak_pages(ref, chunks)


def test_a_long_prompt_peaks_far_below_its_dense_size(run):
    """The 700-token prompt's peak is about kept + window + one chunk per row, not its dense
    size (the default, dense prefill, holds the whole prompt until its first decoding step)."""
    first = run["stats"][run["outs"][0].request_id]
    assert first["resident_kv_pages_peak"] < 0.75 * first["dense_kv_pages"]
    assert first["pruned_fraction"] > 0.3


def test_pools_return_to_their_initial_free_count(run):
    assert run["free_after"] == run["free_before"]
