"""vLLM's data parallelism with pruning: `vllm-kvzap serve --data-parallel-size 2`.

vLLM runs one engine core per data-parallel rank, each with its own scheduler, workers and pools;
its API server spreads requests over them. With pruning on, every engine prunes its own requests
(its own KV connector, block manager and page table) and writes statistics lines that name it.
Checked on loopback: concurrent requests are served by both engines, each request's tokens and
per-layer pruned pairs equal the plain-torch DMS reference, and every line carries its engine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.reference_dms import dms_generate
from tests.test_serve import post, running_server, wait_for_stats

MAX_TOKENS = 16
PROMPT_LENS = (30, 45, 60, 75, 90, 105)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(10, 900, (n,), generator=g).tolist() for n in PROMPT_LENS]
    tmp = tmp_path_factory.mktemp("dp")
    with running_server(tiny_model_dir, tmp, "--data-parallel-size", "2") as srv:

        def complete(ids):
            body = {"model": "tiny", "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}  # fmt: skip
            resp = post(f"{srv['base']}/v1/completions", body)
            return resp["choices"][0]["token_ids"], wait_for_stats(srv["stats_path"], resp["id"])

        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(complete, prompts))
    return prompts, results


def test_both_engines_serve_and_their_lines_name_them(served):
    _, results = served
    assert {stats["engine"] for _, stats in results} == {0, 1}


def test_each_engine_prunes_as_the_reference(served, tiny_model_dir):
    prompts, results = served
    for prompt, (tokens, stats) in zip(prompts, results):
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, MAX_TOKENS,
                           -4.0, 16)  # fmt: skip
        assert tokens == ref["output_ids"]
        ref_pairs = [int(m.sum()) for m in ref["pruned_mask"]]
        assert all(abs(a - b) <= 1 for a, b in zip(stats["pruned_pairs_per_layer"], ref_pairs))
        assert sum(ref_pairs) > 0
