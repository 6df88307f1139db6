"""Pruning under vLLM's default compilation (on CPU: DYNAMO_TRACE_ONCE, one inductor graph).

Scores are computed in torch ops traced with the model and handed to the attention backend by the
custom op `vllm_kvzap::save_scores` (`vllm_kvzap/attention/scoring_op.py`), called by the pre-hook
of each `self_attn`. With the tiny model, threshold -4 and window 16:
- the engine is not forced into eager mode, and the inductor code it generated calls the op once
  per layer, in place on the buffer the layer's projections then read, before that layer's
  attention op;
- its greedy tokens and per-layer pruned pairs equal an `enforce_eager=True` engine's, and tokens,
  log-probabilities and pruned pairs equal the plain-torch DMS reference (`reference_dms.py`);
  more than 20% of the pairs are pruned, so a run where scoring silently did nothing fails.
Paged mode, the default (each mode in MODES costs two engine starts: 15-25 s eager, 40-65 s
compiled with a fresh inductor compile, on 2 cores).
"""

from __future__ import annotations

import re

import pytest

from tests.test_engine_offline import WINDOW, check_against_reference, run_engine

MODES = ("paged",)


def _pruning(tiny, mode: str) -> dict:
    return {"method": "kvzap-mlp", "threshold": -4, "window": WINDOW, "mode": mode,
            "surrogate": str(tiny["mlp"])}  # fmt: skip


@pytest.fixture(scope="module", params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def compiled(tiny_model_dir, tmp_path_factory, mode):
    # vLLM keeps its AOT-compile artifacts and inductor's output code under VLLM_CACHE_ROOT
    # (read by the engine processes, which inherit the environment): a fresh root per run means
    # a fresh compile, and the generated code can be read back.
    cache_root = tmp_path_factory.mktemp("vllm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CACHE_ROOT", str(cache_root))
        run = run_engine(tiny_model_dir, tmp_path_factory, _pruning(tiny_model_dir, mode))
    sources = [p.read_text() for p in cache_root.rglob("*.py")]
    return {**run, "inductor_code": [s for s in sources if "torch.ops.vllm_kvzap.save_scores" in s]}


@pytest.fixture(scope="module")
def eager(tiny_model_dir, tmp_path_factory, mode):
    return run_engine(
        tiny_model_dir, tmp_path_factory, _pruning(tiny_model_dir, mode), enforce_eager=True
    )


def test_scoring_op_survives_inductor_and_runs_before_its_readers(monkeypatch):
    """The op alone, no engine: not eliminated, gets the scores computed in the graph, and is
    called in place on the buffer the next matmul reads, before that matmul."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from vllm_kvzap.attention import runtime, scoring_op

    seen = []

    class Recorder:
        def save_scores(self, layer_idx, scores):
            seen.append((layer_idx, scores.clone()))

    monkeypatch.setattr(runtime, "_runtime", Recorder())

    def layer(x, positions, w):
        hidden_states = torch.nn.functional.rms_norm(x, (x.shape[-1],))
        scores = torch.nn.functional.gelu(hidden_states[:, :2]) * positions[:, None]
        scoring_op.save_scores(hidden_states, scores, 3)
        return hidden_states @ w

    x, positions, w = torch.randn(5, 8), torch.arange(5), torch.randn(8, 4)
    torch._dynamo.reset()
    # vLLM's CPU inductor options (`compilation_config.inductor_compile_config`)
    options = {"enable_auto_functionalized_v2": False, "dce": True, "fx_graph_cache": False}
    compiled_layer = torch.compile(layer, backend="inductor", fullgraph=True, options=options)
    out, (code,) = run_and_get_code(compiled_layer, x, positions, w)
    hidden = torch.nn.functional.rms_norm(x, (8,))
    assert [s[0] for s in seen] == [3]
    torch.testing.assert_close(seen[0][1], torch.nn.functional.gelu(hidden[:, :2]) * positions[:, None])
    torch.testing.assert_close(out, hidden @ w)
    lines = code[code.index("def call(") :].splitlines()
    op_line = next(i for i, line in enumerate(lines) if "vllm_kvzap.save_scores.default(" in line)
    buf = re.search(r"save_scores\.default\((\w+),", lines[op_line])[1]
    readers = [i for i, line in enumerate(lines) if re.search(rf"mm\(.*\b{buf}\b", line)]
    assert readers and min(readers) > op_line
    assert "clone" not in code


def test_pruning_keeps_default_compilation(tiny_model_dir):
    from vllm.config import CompilationMode
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(
        model=str(tiny_model_dir["model"]),
        dtype="float32",
        max_model_len=512,
        additional_config={"kv_pruning": _pruning(tiny_model_dir, "mask")},
    ).create_engine_config()
    assert not config.model_config.enforce_eager
    assert config.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE
    assert config.compilation_config.backend == "inductor"


def test_scoring_runs_inside_the_compiled_graph_before_each_attention(compiled):
    assert len(compiled["inductor_code"]) == 1, "expected one inductor graph calling the op"
    code = compiled["inductor_code"][0]
    # The wrapper's `call` runs its lines in order. Per layer: the op, in place on the buffer
    # that holds the self-attention input, then a read of that same buffer (the projection),
    # then the attention op. A copy (auto_functionalized not reinplaced) would show as a clone.
    events, scored = [], None
    for line in code[code.index("def call(") :].splitlines():
        if m := re.search(r"torch\.ops\.vllm_kvzap\.save_scores\.default\((\w+), \w+, (\d+)\)", line):
            events.append(f"score {m[2]}")
            scored = m[1]
        elif "torch.ops.vllm.unified_attention_with_output.default(" in line:
            events.append("attention")
        elif scored is not None and re.search(rf"\(.*\b{scored}\b", line):
            events.append("read")
            scored = None
    assert events == [e for layer in range(4) for e in (f"score {layer}", "read", "attention")]
    assert "clone" not in code


def test_compiled_equals_eager(compiled, eager):
    fractions = []
    for comp, eag in zip(compiled["results"], eager["results"], strict=True):
        assert comp["tokens"] == eag["tokens"]
        assert comp["stats"]["pruned_pairs_per_layer"] == eag["stats"]["pruned_pairs_per_layer"]
        fractions.append(comp["stats"]["pruned_fraction"])
    assert max(fractions) > 0.2  # scoring really ran: with no flags nothing would be pruned


def test_compiled_equals_reference(compiled, tiny_model_dir):
    fractions = check_against_reference(compiled, tiny_model_dir, "mlp")
    assert max(fractions) > 0.2
