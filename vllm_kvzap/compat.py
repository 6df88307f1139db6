"""The one module that knows vLLM: where each vLLM symbol the plugin uses lives, per vLLM version.

Place in the data flow: every other module of the plugin gets its vLLM classes, functions and
modules from here (`from vllm_kvzap.compat import TritonAttentionBackend`; resolved on first use,
so importing this module imports no vLLM). `plugin.register` asks `supported()` before it touches
anything; `tools/check_vllm_api.py` reads `SYMBOLS` to check a vLLM source tree (an installed vLLM
or an unpacked wheel) without importing it.

Supported: vLLM >= 0.32, < 0.35 (`SUPPORTED`). Each entry of `SYMBOLS` names its location in
0.32 and, where vLLM moved it, the version it moved in and where to (`moved`); `calls` are the
parameters the plugin passes to a callable (by name, or in that order when positional),
`members` the attributes it reads, calls or overrides on a class or module (a method's own
parameter list where the plugin calls it; the plugin's overrides are checked against vLLM's
signatures by the tool, from the plugin's source). `note` says what changed across the range and
how the plugin meets it.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

SUPPORTED = ">=0.32,<0.35"
SUPPORTED_RANGE = ((0, 32), (0, 35))  # [first, end)

Version = tuple[int, int]


@dataclass(frozen=True)
class Symbol:
    location: str  # "module" or "module:Qual.name", as of vLLM 0.32 (or of `since`)
    moved: dict[Version, str] = field(default_factory=dict)  # first version -> new location
    since: Version | None = None  # first version that has it (None: all supported ones)
    calls: tuple[str, ...] = ()
    members: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    note: str = ""

    def location_for(self, version: Version) -> str | None:
        """Where the symbol is in `version`; None where that version does not have it."""
        if self.since is not None and version < self.since:
            return None
        where = self.location
        for since in sorted(self.moved):
            if version >= since:
                where = self.moved[since]
        return where


def _members(*names: str, **methods: tuple[str, ...]) -> dict[str, tuple[str, ...] | None]:
    """Attributes (`names`) and methods with the parameters the plugin passes (`methods`)."""
    return {**dict.fromkeys(names), **methods}


def _cpu_op(name: str, *calls: str) -> Symbol:
    """One of vLLM's CPU attention ops, called with `calls`."""
    return Symbol(
        f"vllm._custom_ops:{name}",
        moved={(0, 34): f"vllm._cpu_ops:{name}"},
        calls=calls,
        note="0.34 moved the CPU ops from vllm._custom_ops to vllm._cpu_ops",
    )


_BACKEND_CLASS = _members("get_name", "get_impl_cls", "get_builder_cls", customize_spec=("spec",))
# what the plugin reads and overrides on both attention impls (`paged_step.unsupported_features`)
_IMPL_CLASS = _members(
    "attn_type", "kv_cache_dtype", "sliding_window", "logits_soft_cap", "alibi_slopes", "sinks",
    "num_heads", "head_size", "scale",
    do_kv_cache_update=("layer", "key", "value", "kv_cache", "slot_mapping"),
    forward=(
        "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
        "output_block_scale",
    ),
)  # fmt: skip
_CONNECTOR_BASE = "vllm.distributed.kv_transfer.kv_connector.v1.base"

SYMBOLS: dict[str, Symbol] = {
    # --- engine arguments, model loading and request intake (patched in `patches.py`) ---
    "EngineArgs": Symbol(
        "vllm.engine.arg_utils:EngineArgs",
        members=_members(
            "add_cli_args", "from_cli_args", "create_engine_config",
            "additional_config", "enable_prefix_caching", "speculative_config",
            "tensor_parallel_size", "pipeline_parallel_size", "kv_transfer_config",
            "kv_cache_dtype", "async_scheduling", "attention_config", "attention_backend",
        ),
    ),  # fmt: skip
    "enable_extensible_kv_cache": Symbol(
        "vllm.engine.arg_utils:EngineArgs.enable_extensible_kv_cache",
        since=(0, 34),
        note="0.34 reserves the KV cache as virtual memory on CUDA, commits it after warm-up and "
        "gives each layer its own committed storage; the page pool needs one fully backed buffer, "
        "so pruning turns it off (engine_setup.prepare_engine_args)",
    ),
    "CacheConfig.enable_extensible_kv_cache": Symbol(
        "vllm.config.cache:CacheConfig.enable_extensible_kv_cache",
        since=(0, 34),
        note="resolved by VllmConfig (on for CUDA unless turned off): checked off when pruning",
    ),
    "BaseModelLoader": Symbol(
        "vllm.model_executor.model_loader.base_loader:BaseModelLoader",
        members=_members(load_model=("vllm_config", "model_config")),
    ),
    "InputProcessor": Symbol(
        "vllm.v1.engine.input_processor:InputProcessor",
        members=_members("vllm_config", _build_logits_processors_params_validator=()),
    ),
    "VLLMValidationError": Symbol(
        "vllm.exceptions:VLLMValidationError", calls=("message", "parameter", "value")
    ),
    "vllm_cli_main": Symbol("vllm.entrypoints.cli.main:main"),
    "FlexibleArgumentParser": Symbol(
        "vllm.utils.argparse_utils:FlexibleArgumentParser",
        members=_members(parse_args=("args", "namespace")),
    ),
    "envs": Symbol(
        "vllm.envs",
        members=_members("VLLM_CPU_ATTN_SPLIT_KV", "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"),
    ),
    "init_logger": Symbol("vllm.logger:init_logger", calls=("name",)),
    "current_platform": Symbol("vllm.platforms:current_platform"),
    # --- configuration ---
    "KVTransferConfig": Symbol("vllm.config:KVTransferConfig", calls=("kv_connector", "kv_role")),
    "AttentionConfig": Symbol(
        "vllm.config.attention:AttentionConfig",
        members=_members("backend", "backend_per_kind", validate_backend_before=("value",)),
    ),
    "get_current_vllm_config": Symbol("vllm.config:get_current_vllm_config"),
    "ParallelConfig": Symbol(
        "vllm.config.parallel:ParallelConfig",
        members=_members(
            "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_index",
        ),
    ),  # fmt: skip
    # --- registries: backends, KV cache specs, KV connectors ---
    "AttentionBackendEnum": Symbol(
        "vllm.v1.attention.backends.registry:AttentionBackendEnum",
        members=_members("CPU_ATTN", "CUSTOM", "TRITON_ATTN"),
    ),
    "register_backend": Symbol(
        "vllm.v1.attention.backends.registry:register_backend", calls=("backend", "class_path")
    ),
    "KVCacheSpecRegistry": Symbol(
        "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry",
        members=_members(
            _ensure_registered=(),
            register=("kvcache_spec_cls", "manager_class", "uniform_type_base_spec"),
        ),
    ),
    "KVConnectorFactory": Symbol(
        "vllm.distributed.kv_transfer.kv_connector.factory:KVConnectorFactory",
        members=_members("_registry", register_connector=("name", "module_path", "class_name")),
    ),
    # --- attention backends the plugin's backends extend ---
    "AttentionType": Symbol("vllm.v1.attention.backend:AttentionType", members=_members("DECODER")),
    "AttentionCGSupport": Symbol(
        "vllm.v1.attention.backend:AttentionCGSupport", members=_members("NEVER")
    ),
    "MultipleOf": Symbol("vllm.v1.attention.backend:MultipleOf", calls=("base",)),
    "CommonAttentionMetadata": Symbol(
        "vllm.v1.attention.backend:CommonAttentionMetadata",
        members=_members(
            "num_actual_tokens", "num_reqs", "max_query_len", "max_seq_len", "query_start_loc",
            "query_start_loc_cpu", "seq_lens", "block_table_tensor", "slot_mapping",
            "is_prefilling",
        ),
    ),  # fmt: skip
    "CPUAttentionBackend": Symbol(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend", members=_BACKEND_CLASS
    ),
    "CPUAttentionBackendImpl": Symbol(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl", members=_IMPL_CLASS
    ),
    "CPUAttentionMetadata": Symbol("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata"),
    "CPUAttentionMetadataBuilder": Symbol(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder",
        members=_members(
            "isa",
            build=("common_prefix_len", "common_attn_metadata", "fast_build"),
            _set_isa_to_layers=("layer_names",),
        ),
        note="0.34 dropped CPUAttentionBackendImpl.is_fp8_kv_cache: the plugin asks "
        "is_quantized_kv_cache(kv_cache_dtype) instead",
    ),
    "TritonAttentionBackend": Symbol(
        "vllm.v1.attention.backends.triton_attn:TritonAttentionBackend", members=_BACKEND_CLASS
    ),
    "TritonAttentionImpl": Symbol(
        "vllm.v1.attention.backends.triton_attn:TritonAttentionImpl",
        members={**_IMPL_CLASS, **_members("chunk_lookback", fused_rope_kvcache_supported=())},
    ),
    "TritonAttentionMetadata": Symbol("vllm.v1.attention.backends.triton_attn:TritonAttentionMetadata"),
    "TritonAttentionMetadataBuilder": Symbol(
        "vllm.v1.attention.backends.triton_attn:TritonAttentionMetadataBuilder",
        members=_members(build=("common_prefix_len", "common_attn_metadata", "fast_build")),
        note="0.34 reads num_kv_heads and head_size from the KV cache spec instead of the model "
        "config: the plugin's spec copies both fields unchanged (the scores' bytes are only in "
        "state_content_size_bytes), and they size split-KV scratch the plugin does not use",
    ),
    "MIN_LAUNCH_GRID_SIZE_2D": Symbol("vllm.v1.attention.backends.triton_attn:MIN_LAUNCH_GRID_SIZE_2D"),
    "NUM_PAR_SOFTMAX_SEGMENTS": Symbol("vllm.v1.attention.backends.triton_attn:NUM_PAR_SOFTMAX_SEGMENTS"),
    "KVCacheLayout": Symbol("vllm.v1.kv_cache_layout:KVCacheLayout", members=_members("LBHNC")),
    # --- kernels ---
    "unified_attention": Symbol(
        "vllm.v1.attention.ops.triton_unified_attention:unified_attention",
        note="0.33 also splits KV (3D) for steps whose rows have 1 < query len <= 8 when the "
        "scratch holds every query token, and skips rows with seq_len <= 0: rows of the plan "
        "always hold their query tokens, and the scratch (MIN_LAUNCH_GRID_SIZE_2D rows) is "
        "indexed per query token, so both stay correct (summation order may differ in ULPs)",
        calls=(
            "q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k",
            "softmax_scale", "causal", "window_size", "block_table", "softcap", "q_descale",
            "k_descale", "v_descale", "seq_threshold_3D", "num_par_softmax_segments",
            "softmax_segm_output", "softmax_segm_max", "softmax_segm_expsum",
        ),
    ),  # fmt: skip
    "cpu_attn_get_scheduler_metadata": _cpu_op(
        "cpu_attn_get_scheduler_metadata",
        "num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype",
        "query_start_loc", "causal", "sliding_window_size", "isa", "enable_kv_split",
    ),
    "cpu_attention_with_kv_cache": _cpu_op(
        "cpu_attention_with_kv_cache",
        "query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens", "scale",
        "causal", "alibi_slopes", "sliding_window", "block_table", "softcap",
        "scheduler_metadata", "s_aux",
    ),
    "cpu_attn_reshape_and_cache": _cpu_op(
        "cpu_attn_reshape_and_cache",
        "key", "value", "key_cache", "value_cache", "slot_mapping", "isa",
    ),  # fmt: skip
    "direct_register_custom_op": Symbol(
        "vllm.utils.torch_utils:direct_register_custom_op",
        calls=("op_name", "op_func", "mutates_args", "fake_impl", "target_lib"),
    ),
    # --- KV cache spec and scheduler-side block manager ---
    "FullAttentionSpec": Symbol(
        "vllm.v1.kv_cache_interface:FullAttentionSpec",
        members=_members("state_content_size_bytes", "num_heads", "num_states", "block_size"),
    ),
    "is_quantized_kv_cache": Symbol(
        "vllm.v1.kv_cache_interface:is_quantized_kv_cache",
        calls=("kv_cache_dtype",),
        note="0.33 removed the copy in vllm.utils.torch_utils; this one is in 0.32-0.34",
    ),
    "FullAttentionManager": Symbol(
        "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager",
        members=_members(
            "block_pool", "req_to_blocks", "block_size", "_record_new_block_ids",
            get_num_blocks_to_allocate=(
                "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
            ),
            allocate_new_blocks=("request_id", "num_tokens", "num_tokens_main_model"),
            free=("request_id",),
            get_num_skipped_tokens=("num_computed_tokens",),
        ),
    ),  # fmt: skip
    "BlockPool": Symbol(
        "vllm.v1.core.block_pool:BlockPool",
        note="0.34 adds free_blocks(..., evict_first=False): the plugin frees surplus slabs with "
        "the default (no prefix caching while pruning, so freed blocks go to the free list's "
        "front as in 0.32)",
        members=_members(get_new_blocks=("num_blocks",), free_blocks=("ordered_blocks",)),
    ),
    "cdiv": Symbol("vllm.utils.math_utils:cdiv", calls=("a", "b")),
    "next_power_of_2": Symbol("vllm.utils.math_utils:next_power_of_2", calls=("n",)),
    # --- the model ---
    "Attention": Symbol("vllm.model_executor.layers.attention:Attention"),
    "extract_layer_index": Symbol(
        "vllm.model_executor.models.utils:extract_layer_index", calls=("layer_name",)
    ),
    # --- tensor parallelism ---
    "get_tensor_model_parallel_rank": Symbol(
        "vllm.distributed.parallel_state:get_tensor_model_parallel_rank"
    ),
    "get_tensor_model_parallel_world_size": Symbol(
        "vllm.distributed.parallel_state:get_tensor_model_parallel_world_size"
    ),
    "tensor_model_parallel_all_gather": Symbol(
        "vllm.distributed.communication_op:tensor_model_parallel_all_gather",
        calls=("input_", "dim"),
    ),
    # --- the KV connector and its metrics ---
    "KVConnectorBase_V1": Symbol(
        f"{_CONNECTOR_BASE}:KVConnectorBase_V1",
        calls=("vllm_config", "role", "kv_cache_config"),
        members=_members(
            bind_connector_metadata=("connector_metadata",),
            clear_connector_metadata=(),
            bind_kv_cache_manager=("kv_cache_manager",),
        ),
    ),
    "KVConnectorMetadata": Symbol(f"{_CONNECTOR_BASE}:KVConnectorMetadata"),
    "KVConnectorRole": Symbol(f"{_CONNECTOR_BASE}:KVConnectorRole", members=_members("SCHEDULER", "WORKER")),
    "KVConnectorWorkerMetadata": Symbol(f"{_CONNECTOR_BASE}:KVConnectorWorkerMetadata"),
    "KVConnectorStats": Symbol(
        "vllm.distributed.kv_transfer.kv_connector.v1.metrics:KVConnectorStats",
        members=_members("data"),
    ),
    "KVConnectorPromMetrics": Symbol(
        "vllm.distributed.kv_transfer.kv_connector.v1.metrics:KVConnectorPromMetrics",
        calls=("vllm_config", "metric_types", "labelnames", "per_engine_labelvalues"),
    ),
    "create_metric_per_engine": Symbol("vllm.v1.metrics.utils:create_metric_per_engine"),
}


def parse_version(text: str) -> Version | None:
    """(major, minor) of a vLLM version string ("0.32.0", "0.34.1+cu129", "0.35.0.dev3")."""
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def vllm_version_text() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def supported(version_text: str | None = None) -> bool:
    version = parse_version(vllm_version_text() if version_text is None else version_text)
    return version is not None and SUPPORTED_RANGE[0] <= version < SUPPORTED_RANGE[1]


def unsupported_message(version_text: str | None = None) -> str:
    found = vllm_version_text() if version_text is None else version_text
    return (
        f"vllm-kvzap supports vLLM {SUPPORTED}, found vLLM {found}: "
        f"install a vLLM in that range (pip install 'vllm{SUPPORTED}') to use kv_pruning"
    )


def resolve(name: str):
    """The vLLM object `SYMBOLS[name]` names, for the running vLLM version."""
    symbol = SYMBOLS[name]
    version = parse_version(vllm_version_text()) or SUPPORTED_RANGE[0]
    location = symbol.location_for(version)
    if location is None:
        raise AttributeError(f"vLLM {vllm_version_text()} has no {name} (since {symbol.since})")
    module, _, qualname = location.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def __getattr__(name: str):
    if name not in SYMBOLS:
        raise AttributeError(f"vllm_kvzap.compat has no vLLM symbol {name!r}")
    value = resolve(name)
    globals()[name] = value  # resolved once per process
    return value
