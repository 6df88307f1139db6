"""Scoring as a custom op, so that it runs inside vLLM's compiled graph (eager and compiled alike).

Place in the data flow: the forward pre-hook on `layers.{l}.self_attn` (`runtime.install_runtime`)
calls `torch.ops.vllm_kvzap.score(hidden_states, positions, l)` on the self-attention input; its
real impl is `runtime.score(l, hidden_states, positions)`, which stores the step's keep flags that
layer `l`'s attention backend reads right after. Under torch.compile (on CPU vLLM 0.32 traces the
whole model once into one inductor graph, `CompilationMode.DYNAMO_TRACE_ONCE`), a Python side
effect in the hook would run after the compiled frame; an opaque op runs where the graph puts it.

Ordering and dead-code elimination come from the schema, not from node order: the op is declared
to mutate `hidden_states` (it does not write to it). After functionalization every later reader of
that tensor, `qkv_proj` and through it the attention op, reads the op's output, so the op must
run first and cannot be dropped; inductor's reinplace pass turns it back into one in-place call on
the same buffer (no copy), since nothing else reads the pre-op value.
"""

from __future__ import annotations

import torch
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_kvzap.attention.runtime import get_runtime

# The op is registered in this library and lives as long as it (i.e. the process).
_lib = torch.library.Library("vllm_kvzap", "FRAGMENT")


def _score(hidden_states: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> None:
    runtime = get_runtime()
    if runtime is not None:
        runtime.score(layer_idx, hidden_states, positions)


def _score_fake(hidden_states: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> None:
    return None


def _register() -> None:
    if hasattr(torch.ops.vllm_kvzap, "score"):
        return  # already defined in this process (e.g. the module was re-imported)
    direct_register_custom_op(
        "score",
        _score,
        mutates_args=["hidden_states"],
        fake_impl=_score_fake,
        target_lib=_lib,
    )


_register()
score = torch.ops.vllm_kvzap.score
