"""Engine configuration when pruning is on (front-end process, before any engine process starts).

`prepare_engine_args` turns off what assumes every token stays resident (one warning listing what
was changed; an error where the user asked for it explicitly) and names the plugin's KV connector,
which carries per-request statistics from the workers to the scheduler. `finish_vllm_config`
checks the surrogate checkpoint against the served model and records the resolved options.
"""

from __future__ import annotations

import dataclasses

from vllm_kvzap.compat import KVTransferConfig, init_logger
from vllm_kvzap.config import (
    ADDITIONAL_CONFIG_KEY,
    KVPruningConfig,
    KVPruningConfigError,
)
from vllm_kvzap.plugin import CONNECTOR_NAME

logger = init_logger(__name__)


def prepare_engine_args(args, pruning: KVPruningConfig) -> None:
    from vllm_kvzap.compat import current_platform

    errors: list[str] = []
    changed: list[str] = []

    if current_platform.is_cuda():
        choose_cuda_backend(args, pruning, errors)
        # vLLM 0.34's extensible KV cache (compat `enable_extensible_kv_cache`; absent before)
        # commits KV memory after warm-up and gives each layer its own storage; the page pool
        # (`cache/page_pool.py`) needs one fully backed buffer.
        extensible = getattr(args, "enable_extensible_kv_cache", False)
        if extensible:
            errors.append("the extensible KV cache (drop --enable-extensible-kv-cache)")
        elif extensible is None:
            args.enable_extensible_kv_cache = False
            changed.append("the extensible KV cache (the page pool needs all KV memory committed)")
    elif not current_platform.is_cpu():
        # Refuse rather than silently run unpruned: the plugin's attention backends are
        # vLLM's CPU and CUDA (Triton) ones.
        raise KVPruningConfigError(
            f"kv_pruning runs on vLLM's CPU and CUDA platforms, not on "
            f"{current_platform.device_name}; run without --kv-pruning on this machine"
        )

    if args.enable_prefix_caching:
        errors.append("prefix caching (drop --enable-prefix-caching / enable_prefix_caching=True)")
    elif args.enable_prefix_caching is None:
        args.enable_prefix_caching = False
        changed.append("prefix caching (it assumes every token stays in the KV cache)")
    if args.speculative_config:
        errors.append("speculative decoding (drop --speculative-config)")
    if args.pipeline_parallel_size != 1:
        # each stage would hold some layers only; the page table and scores index all of them
        errors.append("pipeline parallelism (drop --pipeline-parallel-size; tensor and data "
                      "parallelism work)")  # fmt: skip
    if args.kv_transfer_config is not None:
        errors.append("a KV connector (--kv-transfer-config); the plugin uses its own")
    if args.kv_cache_dtype not in ("auto", None):
        errors.append(f"kv_cache_dtype={args.kv_cache_dtype!r} (use the model dtype)")
    if pruning.ratio_mode and not pruning.paged:
        errors.append("a ratio in mask mode (ratio mode runs in paged mode only)")
    if pruning.paged and args.async_scheduling:
        errors.append("async scheduling (drop --async-scheduling)")
    if errors:
        raise KVPruningConfigError(
            f"kv_pruning method {pruning.method!r} cannot be combined with: " + "; ".join(errors)
        )
    # torch.compile stays on: scoring is a custom op inside the graph (`attention/scoring_op.py`).
    # On CPU vLLM compiles with DYNAMO_TRACE_ONCE (one inductor graph, no CUDA graphs); on CUDA
    # with VLLM_COMPILE and piecewise CUDA graphs split at the attention ops (vLLM's defaults).
    # The scoring op only copies into a persistent buffer, so it needs no split of its own.
    if pruning.paged and args.async_scheduling is None:
        # the block manager sizes each step from the previous step's page counts
        args.async_scheduling = False
    args.kv_transfer_config = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both")
    if changed:
        logger.warning("KV pruning (%s) is on: turned off %s.", pruning.method, "; ".join(changed))


def choose_cuda_backend(args, pruning: KVPruningConfig, errors: list[str]) -> None:
    """On CUDA, pruning runs in the plugin's backend on vLLM's Triton attention (registered as
    CUSTOM, `attention/cuda_backend.py`): chosen when the user names none, TRITON_ATTN or CUSTOM;
    any other backend cannot prune and is refused."""
    from vllm_kvzap.compat import AttentionBackendEnum, AttentionConfig

    if not pruning.paged:
        errors.append("mode 'mask' on a GPU (it runs on vLLM's CPU platform only; use 'paged')")
    config = args.attention_config
    if isinstance(config, dict):
        config = AttentionConfig(**config)
    chosen = config.backend
    if args.attention_backend is not None:
        chosen = AttentionConfig.validate_backend_before(args.attention_backend)
    prunable = (None, AttentionBackendEnum.TRITON_ATTN, AttentionBackendEnum.CUSTOM)
    if chosen not in prunable:
        errors.append(
            f"attention backend {chosen.name} (pruning runs on vLLM's Triton attention: leave "
            "--attention-backend unset or use TRITON_ATTN)"
        )
    if config.backend_per_kind:
        errors.append("per-kind attention backends (attention_config.backend_per_kind)")
    args.attention_config = dataclasses.replace(config, backend=None)
    args.attention_backend = AttentionBackendEnum.CUSTOM
    logger.info("KV pruning: attention runs in the plugin's Triton backend (CUSTOM)")


def default_block_size(head_size: int) -> int:
    """Page size for paged mode when the user gives none: the smallest vLLM's CPU kernel reads.

    A row's pages hold its kept pairs plus less than one page of spare slots, and a request holds
    less than one slab (layers x KV heads pages) more than it uses, so the smallest page serves
    memory best: 16 slots (vLLM's `vec16` kernel; vLLM's own CPU default is 128). Measured by
    `benchmarks/block_size_benchmark.py` (concurrency gain / ideal at p ~ 0.5 and 0.67; the README
    has the table): 1.00 and 0.87 at 16, 0.95 and 0.77 at 32. Head sizes must be multiples of 16.
    """
    if head_size % 16:
        raise KVPruningConfigError(
            f"kv_pruning paged mode needs a head size that is a multiple of 16, not {head_size}"
        )
    return 16


def finish_vllm_config(vllm_config, pruning: KVPruningConfig) -> None:
    from vllm_kvzap.scorers import load_surrogate, resolve_checkpoint_dir

    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    if getattr(cache_config, "enable_extensible_kv_cache", False):  # vLLM 0.34+, resolved
        raise KVPruningConfigError(
            "kv_pruning needs vLLM's KV cache committed in one buffer: add "
            "--no-enable-extensible-kv-cache"
        )
    num_ranks = vllm_config.parallel_config.tensor_parallel_size
    total_kv_heads = model_config.get_total_num_kv_heads()
    if total_kv_heads % num_ranks:
        # fewer KV heads than ranks: vLLM would replicate heads across ranks
        raise KVPruningConfigError(
            f"kv_pruning with tensor parallelism needs the model's {total_kv_heads} KV heads "
            f"split evenly over the {num_ranks} ranks (each rank prunes its own heads): use a "
            f"tensor parallel size that divides {total_kv_heads}"
        )
    if pruning.paged and not cache_config.user_specified_block_size:
        cache_config.block_size = default_block_size(model_config.get_head_size())
    if not pruning.uses_surrogate:
        logger.info(
            "KV pruning: %s baseline (%s mode), %s",
            pruning.method, pruning.mode, pruning.describe_rule(),
        )  # fmt: skip
        return
    surrogate_id = pruning.resolve_surrogate(model_config.model)
    surrogate_dir = resolve_checkpoint_dir(surrogate_id)
    surrogate = load_surrogate(surrogate_dir)
    surrogate.check_compatible(
        hidden_size=model_config.get_hidden_size(),
        num_kv_heads=model_config.get_total_num_kv_heads(),
        num_layers=model_config.get_num_layers(vllm_config.parallel_config),
        model_name=model_config.model,
    )
    if surrogate.kind != pruning.surrogate_kind:
        raise KVPruningConfigError(
            f"kv_pruning method {pruning.method!r} needs a {pruning.surrogate_kind} surrogate, "
            f"but {surrogate_id} is {surrogate.kind} (hidden_dim={surrogate.config.hidden_dim})"
        )
    resolved = dataclasses.replace(pruning, surrogate=str(surrogate_dir))
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = resolved.to_dict()
    logger.info(
        "KV pruning: %s (%s mode), %s, surrogate %s",
        pruning.method,
        pruning.mode,
        pruning.describe_rule(),
        surrogate_id,
    )
