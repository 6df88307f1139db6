"""Pruning under vLLM's default compilation (on CPU: DYNAMO_TRACE_ONCE, one inductor graph).

Scores are computed in torch ops traced with the model and handed to the attention backend by the
custom op `vllm_kvzap::save_scores` (`vllm_kvzap/attention/scoring_op.py`), called by the pre-hook
of each `self_attn`. Without an engine:
- the op, compiled by inductor with vLLM's CPU options, is not eliminated, gets the scores computed
  in the graph, and is called in place on the buffer the next matmul reads, before that matmul;
- pruning does not force the engine into eager mode.
In an engine (tiny model, threshold -4, window 16, paged mode: `test_engine_offline.py`, whose
compiled `pruned_mlp` engine serves these checks beside its others): the inductor code it generated
calls the op once per layer, in place on the buffer the layer's projections then read, before that
layer's attention op; its greedy tokens and per-layer pruned pairs equal an `enforce_eager=True`
engine's, and tokens, log-probabilities and pruned pairs equal the plain-torch DMS reference.
"""

from __future__ import annotations

import re

from tests.test_engine_offline import WINDOW


def _pruning(tiny, mode: str) -> dict:
    return {"method": "kvzap-mlp", "threshold": -4, "window": WINDOW, "mode": mode,
            "surrogate": str(tiny["mlp"])}  # fmt: skip


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
