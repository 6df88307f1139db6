"""KVzap surrogates: checkpoint I/O (published format, local dir or Hub) and the per-layer scorer.

Data flow: checkpoint on disk -> Surrogate -> kernel (``vllm_kvzap.kernels``) -> keep flags
consumed by the attention backend. Pure torch + safetensors + huggingface_hub; no vLLM import.
"""

from vllm_kvzap.scorers.checkpoint import (
    SurrogateCheckpointError,
    SurrogateConfig,
    read_checkpoint,
    resolve_checkpoint_dir,
    save_checkpoint,
    validate_state_dict,
)
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
    "Surrogate",
    "bundled_checkpoint_dir",
    "SurrogateCheckpointError",
    "SurrogateConfig",
    "default_surrogate_id",
    "load_surrogate",
    "read_checkpoint",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "validate_state_dict",
]
