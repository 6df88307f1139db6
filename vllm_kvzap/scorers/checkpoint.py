"""KVzap surrogate checkpoints: the published format on disk or on the Hugging Face Hub.

Data flow: **checkpoint on disk** (this module) -> ``Surrogate`` -> kernel -> scores ``[T, H_kv]``
stored with their pairs by the attention backend.

A checkpoint is a directory with ``config.json`` and ``model.safetensors``, as written by kvpress's
``KVzapModel.save_pretrained``::

    {"architectures": ["KVzapModel"], "model_type": "kvzap", "input_dim": 4096, "output_dim": 8,
     "n_modules": 36, "hidden_dim": 512, "dtype": "float32"}        # hidden_dim null = linear

    linear: layers.{i}.weight [H_kv, D], layers.{i}.bias [H_kv]
    mlp:    layers.{i}.0.weight [hidden, D], layers.{i}.0.bias [hidden],
            layers.{i}.2.weight [H_kv, hidden], layers.{i}.2.bias [H_kv]

Both files are read directly (json + safetensors), without transformers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "kvzap"
ARCHITECTURE = "KVzapModel"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name (absolute, ~ and ./ paths never match)
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


class SurrogateCheckpointError(ValueError):
    """A surrogate checkpoint cannot be found, read, or used with the served model."""


@dataclass(frozen=True)
class SurrogateConfig:
    """Shape of a KVzap surrogate: one module per layer mapping D -> H_kv (via hidden for MLP)."""

    input_dim: int  # D, the model's hidden size
    output_dim: int  # H_kv, KV heads per layer
    n_modules: int  # L, decoder layers
    hidden_dim: int | None = None  # None = linear
    dtype: str = "float32"

    @property
    def kind(self) -> str:
        return "linear" if self.hidden_dim is None else "mlp"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, exactly as in the published safetensors file."""
        D, H, N = self.input_dim, self.output_dim, self.hidden_dim
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(self.n_modules):
            if N is None:
                shapes[f"layers.{i}.weight"] = (H, D)
                shapes[f"layers.{i}.bias"] = (H,)
            else:
                shapes[f"layers.{i}.0.weight"] = (N, D)
                shapes[f"layers.{i}.0.bias"] = (N,)
                shapes[f"layers.{i}.2.weight"] = (H, N)
                shapes[f"layers.{i}.2.bias"] = (H,)
        return shapes

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "n_modules": self.n_modules,
            "hidden_dim": self.hidden_dim,
            "dtype": self.dtype,
        }

    @classmethod
    def from_json_dict(cls, cfg: dict[str, Any], source: str = "config") -> SurrogateConfig:
        if not isinstance(cfg, dict):
            raise SurrogateCheckpointError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if model_type != MODEL_TYPE:
            raise SurrogateCheckpointError(
                f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r} "
                "(not a KVzap surrogate checkpoint)"
            )

        def dim(key: str, optional: bool = False) -> int | None:
            value = cfg.get(key)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SurrogateCheckpointError(
                    f"{source}: {key!r} must be a positive integer, got {value!r}"
                )
            return value

        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
        if dtype not in _DTYPES:
            raise SurrogateCheckpointError(
                f"{source}: unsupported dtype {dtype!r} (expected one of {sorted(_DTYPES)})"
            )
        return cls(
            input_dim=dim("input_dim"),  # type: ignore[arg-type]
            output_dim=dim("output_dim"),  # type: ignore[arg-type]
            n_modules=dim("n_modules"),  # type: ignore[arg-type]
            hidden_dim=dim("hidden_dim", optional=True),
            dtype=dtype,
        )


def resolve_checkpoint_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """Local directory if it exists, else a Hub repo id fetched (or found in the cache) by
    ``huggingface_hub.snapshot_download``; honours ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise SurrogateCheckpointError(
            f"surrogate checkpoint {name!r} is a file; expected a directory with "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} (or a Hugging Face Hub repo id)"
        )
    if not isinstance(name_or_path, str) or not _HUB_ID.match(name):
        raise SurrogateCheckpointError(
            f"surrogate checkpoint {name!r} not found: no such local directory "
            f"({path.absolute()}), and it is not a Hugging Face Hub repo id of the form 'org/name'"
        )

    import huggingface_hub
    from huggingface_hub import constants as hf_constants

    tried = (
        f"tried local directory {path.absolute()} (does not exist), then Hugging Face Hub repo "
        f"{name!r} (cache {hf_constants.HF_HUB_CACHE}, "
        f"HF_HUB_OFFLINE={int(bool(hf_constants.HF_HUB_OFFLINE))})"
    )
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id=name, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]
        )
    except Exception as e:  # RepositoryNotFound, LocalEntryNotFound, connection errors, ...
        if hf_constants.HF_HUB_OFFLINE:
            reason = "offline mode is on and the repo is not in the local cache"
        else:
            reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise SurrogateCheckpointError(
            f"surrogate checkpoint {name!r} could not be resolved: {reason}; {tried}"
        ) from e
    return Path(snapshot)


def _read_config(ckpt_dir: Path) -> SurrogateConfig:
    config_path = ckpt_dir / CONFIG_NAME
    if not config_path.is_file():
        raise SurrogateCheckpointError(f"surrogate checkpoint {ckpt_dir}: missing {CONFIG_NAME}")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurrogateCheckpointError(f"{config_path}: cannot parse JSON ({e})") from e
    return SurrogateConfig.from_json_dict(raw, source=str(config_path))


def validate_state_dict(
    config: SurrogateConfig, state_dict: dict[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Raise SurrogateCheckpointError unless names and shapes match ``config`` exactly."""
    expected = config.expected_shapes()
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_preview(unexpected)}")
        raise SurrogateCheckpointError(
            f"{source}: {'; '.join(parts)} for a {config.kind} surrogate with "
            f"n_modules={config.n_modules} (hidden_dim={config.hidden_dim})"
        )
    for key, shape in expected.items():
        t = state_dict[key]
        if tuple(t.shape) != shape:
            raise SurrogateCheckpointError(
                f"{source}: tensor {key!r} has shape {list(t.shape)}, expected {list(shape)} "
                f"(input_dim={config.input_dim}, output_dim={config.output_dim}, "
                f"hidden_dim={config.hidden_dim})"
            )
        if not t.is_floating_point():
            raise SurrogateCheckpointError(f"{source}: tensor {key!r} has non-float dtype {t.dtype}")


def _preview(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{f', ... ({len(keys) - n} more)' if len(keys) > n else ''}]"


def read_checkpoint(
    name_or_path: str | os.PathLike[str],
) -> tuple[SurrogateConfig, dict[str, torch.Tensor]]:
    """Read and validate a published KVzap checkpoint (local dir or Hub id); tensors on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt_dir = resolve_checkpoint_dir(name_or_path)
    config = _read_config(ckpt_dir)
    weights_path = ckpt_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise SurrogateCheckpointError(f"surrogate checkpoint {ckpt_dir}: missing {WEIGHTS_NAME}")
    try:
        state_dict = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SurrogateCheckpointError(f"{weights_path}: cannot read safetensors ({e})") from e
    validate_state_dict(config, state_dict, source=str(weights_path))
    return config, state_dict


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    config: SurrogateConfig,
    state_dict: dict[str, torch.Tensor],
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the published format; returns the dir.

    Tensors are stored in ``config.dtype``.
    """
    from safetensors.torch import save_file

    validate_state_dict(config, state_dict)
    if config.dtype not in _DTYPES:
        raise SurrogateCheckpointError(f"unsupported dtype {config.dtype!r}")
    dtype = _DTYPES[config.dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: state_dict[k].detach().to("cpu", dtype).contiguous() for k in config.expected_shapes()
    }
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
    return out
