"""One pruning engine in a fresh process, on the runner and attention backend a test names; what it
did goes to JSON for the test (in the parent process) to check against the references.

    TRITON_INTERPRET=1 python -m tests.engine_harness SPEC.json OUT.json

vLLM picks its model runner and the plugin its backend once per process, so each combination runs
in its own process:
- `runner`: "v1" (vLLM's CPU default) or "v2" (Model Runner V2, what vLLM runs on CUDA; on CPU with
  `VLLM_USE_V2_MODEL_RUNNER=1` and vLLM's Triton kernels under the interpreter);
- `backend`: "cpu" (`attention/cpu_backend.py`) or "cuda" (`attention/cuda_backend.py` in place of
  the CPU one: vLLM's Triton `unified_attention` under the interpreter, plain page layout).
The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the harness reads the
scheduler's block pool and the worker's page table directly. vLLM's CPU build hands out Triton
placeholders; they are replaced by the real `triton` before any vLLM module that uses them.

Phases, each optional (SPEC keys):
- `non_scheduled`: forwards that are not scheduled steps, as vLLM runs them on a GPU before and
  around serving: V2's dummy runs with attention metadata (zeroed block tables, first block 0,
  padding; one with `max_num_seqs` fake requests, uniform decode as in graph capture; one profile
  run) and V2's JIT warm-up (`warmup_kernels`: `max_num_seqs` fake requests prefilled and decoded
  with the KV connector disabled). The page table (every tensor, free counts), the block pool and
  the statistics are recorded before and after.
- `prompts` (+ `values`, per-request options): greedy generation with log-probabilities; each
  request's statistics line.
- `pressure`: requests (each with its own per-request value, e.g. "none": unpruned) that outgrow
  the KV budget while they decode (preemptions counted), then requests aborted mid-way.
The pools (free pages, free batch slots, free blocks, live requests) are recorded at the start,
between phases and at the end.
"""

from __future__ import annotations

import contextlib

import json
import os
import sys


def _prepare_process(spec: dict) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    v2 = spec["runner"] == "v2"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if v2 else "0"
    import triton
    import triton.language as tl
    import vllm.triton_utils as tu

    # the real Triton for the kernels that import it from vLLM (`unified_attention`; V2's own);
    # V1 keeps `HAS_TRITON` False, as on vLLM's CPU build, so its sampler stays in torch (its
    # top-k/top-p kernel does not run under the interpreter)
    tu.triton, tu.tl, tu.HAS_TRITON = triton, tl, v2

    from vllm_kvzap import plugin

    plugin.register()
    if spec["backend"] == "cuda":
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        path = "vllm_kvzap.attention.cuda_backend.KVzapTritonAttentionBackend"
        register_backend(AttentionBackendEnum.CPU_ATTN, path)  # what the CPU platform selects
        register_backend(AttentionBackendEnum.CUSTOM, path)  # the backend's own name


def page_state(llm, stats_path: str) -> dict:
    """Everything the page table holds (tensors cloned), the block pool's free count and the
    statistics lines written so far."""
    import torch
    from pathlib import Path

    from vllm_kvzap.attention.runtime import get_runtime

    tensors, scalars = {}, {}

    def walk(obj, prefix: str) -> None:  # the table and its parts (pool, row state, requests, ...)
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor):
                tensors[prefix + k] = v.clone()
            elif isinstance(v, (int, float)):
                scalars[prefix + k] = v
            elif type(v).__module__.startswith("vllm_kvzap.cache."):
                walk(v, f"{prefix}{k}.")

    walk(get_runtime().pages, "")
    core = llm.llm_engine.engine_core.engine_core
    return {
        "tensors": tensors,
        "scalars": scalars,
        "free_blocks": core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
        "stats_lines": len(Path(stats_path).read_text().splitlines())
        if Path(stats_path).exists() else 0,
    }


def pool_counts(llm) -> dict:
    """Free pages, free request indices, free blocks and live requests of the page table and pool."""
    from vllm_kvzap.attention.runtime import get_runtime

    pages = get_runtime().pages
    core = llm.llm_engine.engine_core.engine_core
    return {
        "free_pages": pages.num_free,
        "free_request_indices": len(pages.requests.free),
        "free_blocks": core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
        "live_requests": int((pages.requests.req_key[: pages.max_reqs] >= 0).sum()),
    }


def diff_states(before: dict, after: dict) -> list[str]:
    """Names of whatever changed between two `page_state`s."""
    import torch

    changed = [
        k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])
        and not (v.is_floating_point() and torch.allclose(v, after["tensors"][k], 0, 0, True))
    ]  # float tensors may hold NaN (no value)
    changed += [k for k, v in before["scalars"].items() if after["scalars"][k] != v]
    changed += [k for k in ("free_blocks", "stats_lines") if before[k] != after[k]]
    return changed


def run_non_scheduled_forwards(llm) -> dict:
    """V2's dummy runs and JIT warm-up, as on a GPU before serving."""
    from vllm.v1.worker.gpu.warmup import warmup_kernels

    core = llm.llm_engine.engine_core.engine_core
    worker = core.model_executor.driver_worker.worker
    runner = worker.model_runner
    max_seqs = runner.scheduler_config.max_num_seqs
    done = []
    # the attention metadata of these runs is V2's own dummy metadata: zeroed block tables, every
    # request's first block 0, zero computed tokens, rows marked as padding
    for num_tokens, kwargs in (
        (1, {}),
        (max_seqs, {"uniform_decode": True}),  # a decode capture batch of max_num_seqs requests
        (runner.max_num_tokens, {"is_profile": True}),  # the memory profile, attention included
        (max_seqs + 3, {}),  # padded past the request count
    ):
        runner._dummy_run(num_tokens, skip_attn=False, **kwargs)
        done.append(f"dummy_run({num_tokens}, {kwargs})")
    # JIT warm-up: fake requests through the real step (connector disabled), sampled greedily:
    # vLLM's top-k/top-p and grammar bitmask kernels do not run under the Triton interpreter, and
    # only the forward passes matter here
    from vllm import SamplingParams

    warmup_params = SamplingParams.for_sampler_warmup
    SamplingParams.for_sampler_warmup = staticmethod(lambda: SamplingParams(temperature=0.0))
    try:
        warmup_kernels(runner, worker.execute_model, lambda grammar: worker.sample_tokens(None))
    finally:
        SamplingParams.for_sampler_warmup = warmup_params
    done.append("warmup_kernels")
    return {"forwards": done, "runner_class": f"{type(runner).__module__}.{type(runner).__name__}"}


@contextlib.contextmanager
def offline_engine(in_process: bool = False, **llm_kwargs):
    """vLLM's offline `LLM(**llm_kwargs)`, shut down and collected on exit. `in_process`: the
    engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, restored on exit), so
    that a test reads the scheduler's block pool (and, with `distributed_executor_backend="uni"`,
    the worker's page table) directly."""
    from benchmarks.harness import engine

    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    old = os.environ.get(key)
    if in_process:
        os.environ[key] = "0"
    try:
        with engine(**llm_kwargs) as llm:
            yield llm
    finally:
        if in_process:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def counting_preemptions(scheduler):
    """The ids of the requests the scheduler preempts inside the block, in order."""
    preempted: list[str] = []
    orig = scheduler._preempt_request

    def counting_preempt(request, *args, **kwargs):
        preempted.append(request.request_id)
        return orig(request, *args, **kwargs)

    scheduler._preempt_request = counting_preempt
    try:
        yield preempted
    finally:
        scheduler._preempt_request = orig


def drain(llm) -> None:
    """Engine steps until finished requests have been reported and released."""
    core = llm.llm_engine.engine_core.engine_core
    for _ in range(4):
        if not core.scheduler.has_requests():
            break
        core.step()


def generate(llm, spec: dict) -> list[dict]:
    from vllm import SamplingParams

    from tests.test_engine_offline import greedy_results
    from vllm_kvzap.stats import wait_for_stats

    values = spec.get("values") or [None] * len(spec["prompts"])
    params = [
        SamplingParams(
            max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=1,
            extra_args=None if v is None else {"kv_pruning": v},
        )
        for v in values
    ]  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params)
    drain(llm)
    lines = wait_for_stats(spec["pruning"]["stats_path"], 10**6, timeout_s=5)
    stats = {s["request_id"]: s for s in lines}
    return greedy_results(outs, stats)


def run_pressure(llm, spec: dict) -> dict:
    """A KV-bound batch (preemptions), then aborts mid-way; pools before and after."""
    import torch
    from vllm import SamplingParams

    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    pressure = spec["pressure"]
    g = torch.Generator().manual_seed(3)
    many = [
        torch.randint(10, 900, (pressure["prompt_len"],), generator=g).tolist()
        for _ in pressure["values"]
    ]
    # per-request values: "none" (unpruned) requests grow a block every `block_size` tokens
    each = [
        SamplingParams(max_tokens=pressure["max_tokens"], temperature=0.0, ignore_eos=True,
                       extra_args=None if v is None else {"kv_pruning": v})
        for v in pressure["values"]
    ]  # fmt: skip
    with counting_preemptions(scheduler) as preempted:
        outs = llm.generate([{"prompt_token_ids": p} for p in many], each, use_tqdm=False)
        drain(llm)
    completed = [len(o.outputs[0].token_ids) for o in outs]
    after_batch = pool_counts(llm)

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i, n in enumerate((60, 150, 90)):
        engine.add_request(f"abort-{i}", {"prompt_token_ids": list(range(10, 10 + n))}, params)
    for _ in range(14):  # prompts done (32-token steps), a few decoding steps: pages in use
        engine.step()
    during_abort = pool_counts(llm)
    engine.abort_request(["abort-0", "abort-2"])
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    drain(llm)
    return {
        "completed": completed,
        "preemptions": len(preempted),
        "after_batch": after_batch,
        "during_abort": during_abort,
        "finished_after_abort": finished,
    }


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    _prepare_process(spec)
    from vllm import LLM

    from vllm_kvzap.attention.runtime import get_runtime

    llm = LLM(
        model=spec["model"],
        dtype="float32",
        seed=0,
        additional_config={"kv_pruning": spec["pruning"]},
        **spec["engine"],
    )
    out: dict = {"pools_start": pool_counts(llm)}
    if spec.get("non_scheduled"):
        stats_path = spec["pruning"]["stats_path"]
        before = page_state(llm, stats_path)
        out["non_scheduled"] = run_non_scheduled_forwards(llm)
        out["non_scheduled"]["changed"] = diff_states(before, page_state(llm, stats_path))
        out["non_scheduled"]["compared"] = sorted(before["tensors"])
    if spec.get("prompts"):
        out["results"] = generate(llm, spec)
    if spec.get("pressure"):
        out["pressure"] = run_pressure(llm, spec)
    out["pools_end"] = pool_counts(llm)
    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    out["runner_module"] = type(runner).__module__
    out["key_layout"] = get_runtime().pages.pool.layout  # "plain" only from the CUDA backend
    json.dump(out, open(out_path, "w"))
    print("OK")


if __name__ == "__main__":
    main(*sys.argv[1:3])
