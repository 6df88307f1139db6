"""Scoring: the methods (presses, ``registry.methods()``), KVzap's surrogates (checkpoint I/O in the
published format, local dir or Hub; the per-layer scorer) and the ratio rule (``adakv``).

Data flow: ``kv_pruning`` method -> its press (``kvzap``: checkpoint on disk -> Surrogate -> kernel,
``vllm_kvzap.kernels``; ``baselines``) -> scores ``[T, H_kv]`` the attention backend stores with
their pairs. Pure torch + safetensors + huggingface_hub; no vLLM import.
"""

from vllm_kvzap.scorers.checkpoint import (
    SurrogateCheckpointError,
    SurrogateConfig,
    read_checkpoint,
    resolve_checkpoint_dir,
    save_checkpoint,
    validate_state_dict,
)
from vllm_kvzap.scorers.registry import Press, methods
from vllm_kvzap.scorers.surrogate import (
    BUNDLED_DIR,
    SURROGATE_KINDS,
    Surrogate,
    bundled_checkpoint_dir,
    default_surrogate_id,
    load_surrogate,
)

__all__ = [
    "BUNDLED_DIR",
    "SURROGATE_KINDS",
    "Press",
    "Surrogate",
    "SurrogateCheckpointError",
    "SurrogateConfig",
    "bundled_checkpoint_dir",
    "default_surrogate_id",
    "load_surrogate",
    "methods",
    "read_checkpoint",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "validate_state_dict",
]
