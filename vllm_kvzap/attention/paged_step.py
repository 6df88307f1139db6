"""What the plugin's attention backends share: the pruning options, which layers prune, the paged
spec, the step's rows, one layer's paged forward, and the model features pruning refuses.

Place in the data flow: a backend's metadata builder turns vLLM's `CommonAttentionMetadata` into
`StepRows` (`step_rows`); when the KV connector binds the step, the runtime has the page table
plan them (`runtime.bind_step`, `cache/page_table.py`); each decoder layer's `forward` then runs
`paged_forward`: the bound plan, the layer's scores from the scoring op (`runtime.py`), its K/V and
scores written into the rows' pages, and attention over the rows in the backend's kernel
(`rows.attend_layer` on CPU, `triton_rows.attend_layer_triton` on CUDA). Forwards that vLLM runs
outside scheduled steps find no bound plan and leave the page state alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from vllm_kvzap.attention.runtime import get_runtime
from vllm_kvzap.cache.page_table import PageTable
from vllm_kvzap.cache.step_plan import StepPlan, StepRows
from vllm_kvzap.compat import AttentionType, CommonAttentionMetadata, FullAttentionSpec
from vllm_kvzap.config import KVPruningConfig


def pruning_config(vllm_config) -> KVPruningConfig:
    return KVPruningConfig.from_additional_config(vllm_config.additional_config)


def prunes(impl) -> bool:
    """Whether a backend impl (with `pruning` and `attn_type`) applies pruning to its layer."""
    return (
        impl.pruning.enabled
        and impl.attn_type == AttentionType.DECODER
        and get_runtime() is not None
    )


def layer_index(impl, layer) -> int:
    """The impl's decoder layer index, from its layer's name (found once)."""
    if impl.layer_idx is None:
        from vllm_kvzap.compat import extract_layer_index

        impl.layer_idx = extract_layer_index(layer.layer_name)
    return impl.layer_idx


def paged_spec(spec):
    """A backend's `customize_spec` in paged mode: the plugin's spec, which selects its block
    manager (`cache/spec.py`); the runtime is installed with the model, before specs are asked."""
    runtime = get_runtime()
    if runtime is not None and runtime.config.paged and type(spec) is FullAttentionSpec:
        from vllm_kvzap.cache.spec import KVzapAttentionSpec

        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        return KVzapAttentionSpec(**fields)
    return spec


def step_rows(cm: CommonAttentionMetadata) -> StepRows | None:
    """The step's requests from vLLM's metadata: sizes from its host copies (no device sync),
    request keys (first block ids) from its block table, on the device. None where the metadata lacks the
    prefill flags, which only forwards that are not scheduled steps may do (`runtime.bind_step`
    refuses a scheduled step without rows)."""
    if cm.is_prefilling is None:
        return None
    num_reqs = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: num_reqs + 1].long()
    query_lens = qsl[1:] - qsl[:-1]
    # exact without speculative decoding, which pruning refuses (`engine_setup.py`)
    seq_lens = cm.seq_lens_cpu_upper_bound
    seq_lens = cm.seq_lens.cpu() if seq_lens is None else seq_lens
    return StepRows(
        req_keys=cm.block_table_tensor[:num_reqs, 0].long(),
        num_computed=seq_lens[:num_reqs].long() - query_lens,
        query_lens=query_lens,
        is_prefilling=torch.as_tensor(cm.is_prefilling[:num_reqs]).cpu().bool(),
        query_start_loc=qsl,
    )


def unsupported_features(impl, sliding_window: bool, fp8: bool) -> None:
    """Refuse models whose attention the rows cannot express."""
    unsupported = {
        "sliding window": sliding_window,
        "logits soft-capping": bool(impl.logits_soft_cap),
        "ALiBi": impl.alibi_slopes is not None,
        "attention sinks": impl.sinks is not None,
        "an fp8 KV cache": fp8,
    }
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise ValueError(f"kv_pruning does not support models with {', '.join(bad)}")


def paged_forward(
    layer_idx: int,
    rows: StepRows,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    num_tokens: int,
    num_heads: int,
    head_size: int,
    attend: Callable[[PageTable, StepPlan, int, torch.Tensor, torch.Tensor], None],
    isa: str | None = None,
) -> torch.Tensor:
    """One decoder layer in paged mode; `attend(table, plan, layer, query, out)` is the
    backend's kernel call over the rows. A forward that is not a scheduled step (no bound plan:
    profile runs, memory estimates, warm-up, CUDA-graph capture) writes nothing and attends to
    nothing: its output is zero and the page state stays as it was."""
    runtime = get_runtime()
    plan = runtime.bound_plan(rows)
    if plan is None:
        return output.zero_()
    table = runtime.pages
    scores = runtime.layer_scores(layer_idx, key[:num_tokens])
    table.write_layer(plan, layer_idx, key, value, scores, isa)
    attend(table, plan, layer_idx, query, output[:num_tokens].view(num_tokens, num_heads, head_size))
    return output
