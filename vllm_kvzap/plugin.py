"""vLLM general-plugin entry point (`vllm.general_plugins` group, called in every vLLM process).

It registers the project's pieces through vLLM's official registries and installs the few
engine-argument and model-loading hooks from `vllm_kvzap.patches`. Idempotent and cheap: vLLM
calls it several times per process. With no `kv_pruning` option nothing of this changes any
behaviour: the attention backend and the hooks pass straight through.
"""

from __future__ import annotations

CONNECTOR_NAME = "KVzapPruningConnector"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_kvzap import patches

    from vllm_kvzap.cache.spec import register_spec

    patches.apply()
    register_spec()
    if current_platform.is_cpu():
        # The CPU platform always selects CPU_ATTN; our subclass behaves exactly like it
        # unless kv_pruning is on.
        register_backend(
            AttentionBackendEnum.CPU_ATTN,
            "vllm_kvzap.attention.cpu_backend.KVzapCPUAttentionBackend",
        )
    if current_platform.is_cuda():
        # Selected only when pruning is on (`engine_setup.choose_cuda_backend`).
        register_backend(
            AttentionBackendEnum.CUSTOM,
            "vllm_kvzap.attention.cuda_backend.KVzapTritonAttentionBackend",
        )
    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(
            CONNECTOR_NAME, "vllm_kvzap.connector", "KVzapPruningConnector"
        )
