"""Handing the scores to the attention backend as a custom op, inside vLLM's compiled graph.

Place in the data flow: the forward pre-hook on `layers.{l}.self_attn` (`runtime.install_runtime`)
computes the layer's scores with plain torch ops (`runtime.graph_scores`: the surrogate, or a
baseline), which torch.compile folds into the model's graph like any other layer, and calls
`torch.ops.vllm_kvzap.save_scores(hidden_states, scores, l)`; its real impl is
`runtime.save_scores(l, scores)`, which layer `l`'s attention backend reads right after. Under
torch.compile (on CPU vLLM 0.32 traces the whole model once into one inductor graph,
`CompilationMode.DYNAMO_TRACE_ONCE`), a Python side effect in the hook would run after the
compiled frame; an opaque op runs where the graph puts it. The impl copies the scores into the
runtime's persistent score buffer (inductor may reuse theirs once the op, their last reader in the
graph, has run), so the op has no Python side effect a captured CUDA graph would lose: a replay
repeats the copy into the same memory, and the op needs no graph split.

Ordering and dead-code elimination come from the schema, not from node order: the op is declared
to mutate `hidden_states` (it does not write to it). After functionalization every later reader of
that tensor, `qkv_proj` and through it the attention op, reads the op's output, so the op must
run first and cannot be dropped; inductor's reinplace pass turns it back into one in-place call on
the same buffer (no copy), since nothing else reads the pre-op value.
"""

from __future__ import annotations

import torch

from vllm_kvzap.attention.runtime import get_runtime
from vllm_kvzap.compat import direct_register_custom_op

# The op is registered in this library and lives as long as it (i.e. the process).
_lib = torch.library.Library("vllm_kvzap", "FRAGMENT")


def _save_scores(hidden_states: torch.Tensor, scores: torch.Tensor, layer_idx: int) -> None:
    runtime = get_runtime()
    if runtime is not None:
        runtime.save_scores(layer_idx, scores)  # a copy into the runtime's score buffer


def _save_scores_fake(hidden_states: torch.Tensor, scores: torch.Tensor, layer_idx: int) -> None:
    return None


def _register() -> None:
    if hasattr(torch.ops.vllm_kvzap, "save_scores"):
        return  # already defined in this process (e.g. the module was re-imported)
    direct_register_custom_op(
        "save_scores",
        _save_scores,
        mutates_args=["hidden_states"],
        fake_impl=_save_scores_fake,
        target_lib=_lib,
    )


_register()
save_scores = torch.ops.vllm_kvzap.save_scores
