"""Run vLLM's CPU engine with the CUDA path's attention backend (`attention/cuda_backend.py`) in
place of the CPU one, its Triton kernels under `TRITON_INTERPRET=1`; greedy outputs to JSON.

    TRITON_INTERPRET=1 python -m tests.cuda_path_engine SPEC.json OUT.json

SPEC holds the model and surrogate paths, the pruning options, engine arguments and the prompts.
The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that the backend
registered here is the one it uses; vLLM's CPU build hands out Triton placeholders, replaced here
by the real `triton` before any vLLM attention module is imported.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import triton
    import triton.language as tl
    import vllm.triton_utils as tu

    tu.triton, tu.tl, tu.HAS_TRITON = triton, tl, True

    from vllm_kvzap import plugin

    plugin.register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    path = "vllm_kvzap.attention.cuda_backend.KVzapTritonAttentionBackend"
    register_backend(AttentionBackendEnum.CPU_ATTN, path)  # what the CPU platform selects
    register_backend(AttentionBackendEnum.CUSTOM, path)  # the backend's own name

    from vllm import LLM, SamplingParams

    from tests.test_engine_offline import greedy_results
    from vllm_kvzap.attention.runtime import get_runtime
    from vllm_kvzap.stats import wait_for_stats

    spec = json.load(open(spec_path))
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        seed=0,
        additional_config={"kv_pruning": spec["pruning"]},
        **spec["engine"],
    )
    params = SamplingParams(
        max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=1
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params)
    # in-process, the engine stops stepping when the batch is done; the last finished request's
    # counts reach the scheduler with the next step, so run one more
    llm.generate([{"prompt_token_ids": [1]}], SamplingParams(max_tokens=1), use_tqdm=False)
    stats = {s["request_id"]: s for s in wait_for_stats(spec["pruning"]["stats_path"], len(outs))}
    results = greedy_results(outs, stats)
    runtime = get_runtime()
    # "plain" comes only from the CUDA path's backend (`page_key_layout`)
    json.dump({"results": results, "key_layout": runtime.pages.key_layout}, open(out_path, "w"))
    print("OK")


if __name__ == "__main__":
    main(*sys.argv[1:3])
