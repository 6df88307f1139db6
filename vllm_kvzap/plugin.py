"""vLLM general-plugin entry point (`vllm.general_plugins` group, called in every vLLM process).

It registers the project's pieces through vLLM's official registries and installs the few
engine-argument and model-loading hooks from `vllm_kvzap.patches`. Idempotent and cheap: vLLM
calls it several times per process. With no `kv_pruning` option nothing of this changes any
behaviour: the attention backend and the hooks pass straight through.

On a vLLM outside the supported range (`compat.SUPPORTED`) it registers nothing and never raises:
one warning, and an engine asked to prune refuses with one line naming the range
(`patches.apply_refusal`).
"""

from __future__ import annotations

import logging
import os

CONNECTOR_NAME = "KVzapPruningConnector"
_WARNED = "VLLM_KVZAP_UNSUPPORTED_WARNED"

_registered = False
logger = logging.getLogger("vllm.kvzap")  # under vLLM's logger, whatever its version


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from vllm_kvzap import compat, patches

    if not compat.supported():
        patches.apply_refusal()
        if not os.environ.get(_WARNED):  # once per deployment: vLLM's processes inherit it
            os.environ[_WARNED] = "1"
            logger.warning(
                "%s; vllm-kvzap registered nothing and vLLM runs unchanged.",
                compat.unsupported_message(),
            )
        return

    from vllm_kvzap.cache.spec import register_spec
    from vllm_kvzap.compat import (
        AttentionBackendEnum,
        KVConnectorFactory,
        current_platform,
        register_backend,
    )

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
