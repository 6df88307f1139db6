"""Both of vLLM's model runners, with both of the plugin's attention backends, against the
independent references.

vLLM runs Model Runner V2 on CUDA (its default there) and V1 on CPU; each combination runs in its
own process (`tests/engine_harness.py`): V2 with its Triton kernels and the CUDA backend's
`unified_attention` under the Triton interpreter. In-process V1 runs of the CPU backend are in
`test_engine_offline.py` (per-request thresholds included), `test_paged_memory.py` and
`test_ratio_mode.py`. Checked here, for every combination below:
- forwards that are not scheduled steps (V2's dummy runs with its capture-like metadata: zeroed
  block tables, first block 0, padding, `max_num_seqs` fake requests; its memory-profile run with
  attention; its JIT warm-up with fake requests) leave the page table, the pools and the
  statistics exactly as they were, and real requests served afterwards equal the reference;
- greedy tokens, log-probabilities and pruned pairs per layer equal the plain-torch DMS reference
  (`reference_dms.py`), with chunked prefill, also for a request with its own threshold; each
  request holds at its end exactly the pages the reference's masks imply;
- a KV-bound batch (preemptions) and aborted requests: every request completes, and the pools
  return to their initial counts (with the CPU backend; the CUDA backend's interpreted attention
  makes that batch too slow here: the page table's plain layout under preemption is covered by
  `test_page_table.py`);
- ratio mode (kvpress's AdaKV) under V2: tokens and pruned pairs equal the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.interpreter import REPO_ROOT
from tests.reference_dms import dms_generate
from tests.test_engine_offline import MAX_TOKENS, WINDOW, check_against_reference, prompts
from tests.test_paged_memory import expected_end_pages

BLOCK_SIZE = 16  # the plugin's default page size
OWN_THRESHOLD = -3.0  # one request's own threshold (per-request options)
# four unpruned requests (admitted together: 4 x 6 blocks) outgrow the KV budget within a few
# decoding steps (4 x 7 blocks); a pruned one runs when a batch slot frees
# generated tokens per reference prompt; fewer on the CUDA backend, whose attention runs in the
# Triton interpreter (~1 s a step), still well past the window on every prompt
TOKENS = {"cpu": MAX_TOKENS, "cuda": 20}
PRESSURE = {"values": ["none"] * 4 + [None], "prompt_len": 90, "max_tokens": 24}


def test_only_a_bound_step_has_a_plan_made_once():
    """`runtime.bind_step`: the step the connector binds is planned once, every layer of its
    forward gets that plan; rows the connector never bound (forwards that are not scheduled
    steps) get none; a step with no tokens binds nothing; a step with tokens and no rows raises."""
    from vllm_kvzap.attention.runtime import PruningRuntime
    from vllm_kvzap.config import KVPruningConfig

    class CountingPages:
        def __init__(self):
            self.planned = []

        def plan(self, rows):
            self.planned.append(rows)
            return ("plan", rows)

    config = KVPruningConfig.from_additional_config({"kv_pruning": {"method": "window"}})
    runtime = PruningRuntime(config, None, num_layers=2, num_kv_heads=2, max_num_tokens=8)
    runtime.pages = pages = CountingPages()
    step, dummy = object(), object()
    runtime.next_rows = step
    runtime.bind_step(5)
    assert [runtime.bound_plan(step) for _ in range(3)] == [("plan", step)] * 3
    assert pages.planned == [step]  # once, whatever the number of layers asking
    assert runtime.bound_plan(dummy) is None and runtime.bound_plan(None) is None
    runtime.next_rows = dummy  # described by a dummy run's builder, then a step without a forward
    runtime.bind_step(0)
    assert runtime.bound_plan(dummy) is None and runtime.next_rows is None
    assert pages.planned == [step]
    with pytest.raises(RuntimeError, match="no rows"):
        runtime.bind_step(3)


def run_harness(spec: dict, tmp) -> dict:
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine_harness", str(tmp / "spec.json"), str(tmp / "out.json")],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


def engine_spec(tiny, tmp, runner: str, backend: str, pruning: dict, **engine) -> dict:
    return {
        "runner": runner,
        "backend": backend,
        "model": str(tiny["model"]),
        "pruning": {**pruning, "stats_path": str(tmp / "stats.jsonl")},
        # 32-token steps: the longer prompts are prefilled in chunks, beside decodes
        "engine": {"max_model_len": 1024, "enable_chunked_prefill": True,
                   "max_num_batched_tokens": 32, "max_num_seqs": 4, **engine},  # fmt: skip
    }


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def v2_run(request, tiny_model_dir, tmp_path_factory):
    """Model Runner V2 with the named backend: non-scheduled forwards, then the reference prompts
    (the longest once more with its own threshold), then a KV-bound batch and aborts."""
    tmp = tmp_path_factory.mktemp(f"v2_{request.param}")
    pruning = {"method": "kvzap-mlp", "threshold": -4, "window": WINDOW,
               "surrogate": str(tiny_model_dir["mlp"])}  # fmt: skip
    spec = engine_spec(
        tiny_model_dir, tmp, "v2", request.param, pruning,
        # 26 blocks of 16 tokens (4 layers x 2 KV heads x 260 bytes: K, V, score per slot)
        max_model_len=400, kv_cache_memory_bytes=26 * BLOCK_SIZE * 2080,
    )  # fmt: skip
    spec.update(
        prompts=prompts() + [prompts()[-1]],
        values=[None, None, None, OWN_THRESHOLD],
        max_tokens=TOKENS[request.param],
        non_scheduled=True,
    )
    if request.param == "cpu":  # the interpreted attention of the CUDA backend costs ~1 s a step
        spec["pressure"] = PRESSURE
    out = run_harness(spec, tmp)
    out["backend"], out["max_tokens"] = request.param, TOKENS[request.param]
    return out


def test_v2_really_ran(v2_run):
    assert v2_run["runner_module"] == "vllm.v1.worker.cpu.model_runner"  # V2's CPU subclass
    layout = {"cpu": "transposed", "cuda": "plain"}[v2_run["backend"]]
    assert v2_run["key_layout"] == layout  # the named backend's page table ran


def test_forwards_that_are_not_steps_leave_the_page_state_alone(v2_run):
    done = v2_run["non_scheduled"]
    assert "warmup_kernels" in done["forwards"] and len(done["forwards"]) == 5
    # every part of the page state was compared: pages, directory, row state, requests, stacks
    parts = {"pool.kv_pages", "pool.free_pages.items", "chunk_table", "chunks", "free_chunks.items",
             "rows.packed", "requests.req_key", "requests.value", "requests.free.items", "_top"}
    assert parts <= set(done["compared"])
    assert done["changed"] == []


def test_v2_tokens_logprobs_and_pruned_pairs_equal_reference(v2_run, tiny_model_dir):
    run = {"results": v2_run["results"][:3]}
    fractions = check_against_reference(run, tiny_model_dir, "mlp", v2_run["max_tokens"])
    assert max(fractions) > 0.2  # pruning really happened


def test_v2_per_request_threshold_equals_reference(v2_run, tiny_model_dir):
    result, prompt = v2_run["results"][3], prompts()[-1]
    ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt,
                       v2_run["max_tokens"], OWN_THRESHOLD, WINDOW)  # fmt: skip
    assert result["tokens"] == ref["output_ids"]
    stats = result["stats"]
    assert stats["per_request"] and stats["threshold"] == OWN_THRESHOLD
    ref_pairs = [int(m.sum()) for m in ref["pruned_mask"]]
    assert all(abs(a - b) <= 1 for a, b in zip(stats["pruned_pairs_per_layer"], ref_pairs))
    # a higher threshold prunes more than the engine's -4 on the same prompt
    assert stats["pruned_fraction"] > v2_run["results"][2]["stats"]["pruned_fraction"]


def test_v2_resident_pages_follow_what_is_kept(v2_run, tiny_model_dir):
    for prompt, result in zip(prompts(), v2_run["results"]):
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt,
                           v2_run["max_tokens"], -4.0, WINDOW)  # fmt: skip
        want = expected_end_pages(ref, WINDOW, BLOCK_SIZE)
        assert result["stats"]["resident_kv_pages_end"] == want


def test_v2_pools_return_to_their_initial_counts(v2_run):
    start = v2_run["pools_start"]
    assert v2_run["pools_end"] == start and start["live_requests"] == 0


def test_v2_preemptions_and_aborts_free_everything(v2_run):
    if v2_run["backend"] == "cuda":
        pytest.skip("run with the CPU backend only: the CUDA backend's interpreted attention is slow")
    pressure = v2_run["pressure"]
    assert pressure["completed"] == [PRESSURE["max_tokens"]] * len(PRESSURE["values"])
    assert pressure["preemptions"] > 0, "the batch was meant to preempt; shrink the budget"
    start = v2_run["pools_start"]
    assert pressure["after_batch"] == start
    assert pressure["during_abort"]["live_requests"] >= 2
    assert pressure["during_abort"]["free_pages"] < start["free_pages"]
    assert pressure["finished_after_abort"] == ["abort-1"]
    assert v2_run["pools_end"] == start and start["live_requests"] == 0


RATIO, ALPHA, RATIO_TOKENS = 0.6, 0.2, 16


@pytest.fixture(scope="module")
def v2_ratio_run(tiny_model_dir, tmp_path_factory):
    """Ratio mode under V2, on the CUDA backend (the CPU backend's runs under V1 are in
    `test_ratio_mode.py`)."""
    tmp = tmp_path_factory.mktemp("v2_ratio")
    pruning = {"method": "kvzap-mlp", "ratio": RATIO, "alpha": ALPHA,
               "surrogate": str(tiny_model_dir["mlp"])}  # fmt: skip
    spec = engine_spec(tiny_model_dir, tmp, "v2", "cuda", pruning,
                       kv_cache_memory_bytes=64 * 2**20)  # fmt: skip
    spec.update(prompts=prompts(), max_tokens=RATIO_TOKENS)
    return run_harness(spec, tmp)


def test_v2_ratio_mode_equals_reference(v2_ratio_run, tiny_model_dir):
    for prompt, result in zip(prompts(), v2_ratio_run["results"]):
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, RATIO_TOKENS,
                           ratio=RATIO, alpha=ALPHA)  # fmt: skip
        assert result["tokens"] == ref["output_ids"]
        assert result["stats"]["pruned_pairs_per_layer"] == [
            int(m.sum()) for m in ref["pruned_mask"]
        ]
        assert result["stats"]["rule"] == "ratio"
    assert v2_ratio_run["pools_end"] == v2_ratio_run["pools_start"]


CHUNKED_LENS, CHUNKED_TOKENS, CHUNK = (40, 150), 12, 32


@pytest.fixture(scope="module")
def v2_chunked_run(tiny_model_dir, tmp_path_factory):
    """`prefill: chunked` under V2 on the CUDA backend (the GPU's default path), one request at a
    time, so vLLM cuts each prompt into chunks of `max_num_batched_tokens` (32) and a last one."""
    tmp = tmp_path_factory.mktemp("v2_chunked")
    pruning = {"method": "kvzap-mlp", "threshold": -4, "window": WINDOW, "prefill": "chunked",
               "surrogate": str(tiny_model_dir["mlp"])}  # fmt: skip
    spec = engine_spec(tiny_model_dir, tmp, "v2", "cuda", pruning, max_num_seqs=1,
                       kv_cache_memory_bytes=64 * 2**20)  # fmt: skip
    spec.update(prompts=[p for p in prompts() if len(p) in CHUNKED_LENS],
                max_tokens=CHUNKED_TOKENS)  # fmt: skip
    return run_harness(spec, tmp)


def test_v2_chunked_prefill_equals_reference(v2_chunked_run, tiny_model_dir):
    """Tokens, log-probs, pruned pairs and end pages equal the reference fed the same chunks."""
    found = [p for p in prompts() if len(p) in CHUNKED_LENS]
    assert len(found) == len(v2_chunked_run["results"]) == len(CHUNKED_LENS)
    for prompt, result in zip(found, v2_chunked_run["results"]):
        chunks = [CHUNK] * (len(prompt) // CHUNK) + [len(prompt) % CHUNK] * bool(len(prompt) % CHUNK)
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, CHUNKED_TOKENS,
                           -4.0, WINDOW, prefill_chunks=chunks)  # fmt: skip
        assert result["tokens"] == ref["output_ids"]
        want = [torch.log_softmax(ref["logits"][i], -1)[t].item()
                for i, t in enumerate(result["tokens"])]  # fmt: skip
        assert result["logprobs"] == pytest.approx(want, abs=1e-3)
        stats = result["stats"]
        assert stats["prefill"] == "chunked"
        assert stats["pruned_pairs_per_layer"] == [int(m.sum()) for m in ref["pruned_mask"]]
        assert stats["resident_kv_pages_end"] == expected_end_pages(ref, WINDOW, BLOCK_SIZE)
    assert v2_chunked_run["pools_end"] == v2_chunked_run["pools_start"]
