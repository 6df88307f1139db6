"""The KVzap surrogate: per-layer scorer of the hidden states entering ``self_attn``.

Data flow: checkpoint on disk -> **Surrogate** (stacked float32 weights of all layers) -> kernel
(``kernels.surrogate_score``) -> scores ``[T, H_kv]``, asked for by the kvzap presses (kvzap.py).

Weights are stacked over layers so one layer is a view, with no Python module per layer:

    linear: w1 [L, H, D], b1 [L, H]                       w2 = b2 = None
    mlp:    w1 [L, N, D], b1 [L, N], w2 [L, H, N], b2 [L, H]

All float32 (the checkpoints' dtype). The GPU paths multiply x by w1 in x's (the model's) dtype:
w1 is cast to it once per dtype and kept (``w1_as``); the small b1, w2, b2 stay float32.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from vllm_kvzap.kernels.surrogate_score import scores_torch, surrogate_scores
from vllm_kvzap.scorers.checkpoint import (
    SurrogateCheckpointError,
    SurrogateConfig,
    read_checkpoint,
    save_checkpoint,
    validate_state_dict,
)

SURROGATE_KINDS = ("linear", "mlp")


class Surrogate:
    """Stacked per-layer KVzap surrogate; ``score`` maps ``[T, D]`` to ``[T, H_kv]`` float32."""

    def __init__(
        self,
        config: SurrogateConfig,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        source: str | None = None,
    ) -> None:
        L, D, H, N = config.n_modules, config.input_dim, config.output_dim, config.hidden_dim
        if N is None:
            expected = {"w1": (L, H, D), "b1": (L, H), "w2": None, "b2": None}
        else:
            expected = {"w1": (L, N, D), "b1": (L, N), "w2": (L, H, N), "b2": (L, H)}
        for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            got = None if t is None else tuple(t.shape)
            if got != expected[name]:
                raise SurrogateCheckpointError(
                    f"surrogate {name} has shape {got}, expected {expected[name]} for {config}"
                )
        self.config = config
        self.source = source
        self.w1 = w1.float().contiguous()
        self.b1 = b1.float().contiguous()
        self.w2 = None if w2 is None else w2.float().contiguous()
        self.b2 = None if b2 is None else b2.float().contiguous()
        self._w1_by_dtype: dict[torch.dtype, torch.Tensor] = {}

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def device(self) -> torch.device:
        return self.w1.device

    @classmethod
    def from_state_dict(
        cls,
        config: SurrogateConfig,
        state_dict: dict[str, torch.Tensor],
        source: str | None = None,
    ) -> Surrogate:
        """Build from tensors named as in the published format (``layers.{i}...``)."""
        validate_state_dict(config, state_dict, source=source or "state dict")
        L = range(config.n_modules)
        if config.hidden_dim is None:
            w1 = torch.stack([state_dict[f"layers.{i}.weight"] for i in L])
            b1 = torch.stack([state_dict[f"layers.{i}.bias"] for i in L])
            return cls(config, w1, b1, source=source)
        w1 = torch.stack([state_dict[f"layers.{i}.0.weight"] for i in L])
        b1 = torch.stack([state_dict[f"layers.{i}.0.bias"] for i in L])
        w2 = torch.stack([state_dict[f"layers.{i}.2.weight"] for i in L])
        b2 = torch.stack([state_dict[f"layers.{i}.2.bias"] for i in L])
        return cls(config, w1, b1, w2, b2, source=source)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors named as in the published format (CPU)."""
        sd: dict[str, torch.Tensor] = {}
        for i in range(self.config.n_modules):
            if self.w2 is None:
                sd[f"layers.{i}.weight"] = self.w1[i].cpu()
                sd[f"layers.{i}.bias"] = self.b1[i].cpu()
            else:
                assert self.b2 is not None
                sd[f"layers.{i}.0.weight"] = self.w1[i].cpu()
                sd[f"layers.{i}.0.bias"] = self.b1[i].cpu()
                sd[f"layers.{i}.2.weight"] = self.w2[i].cpu()
                sd[f"layers.{i}.2.bias"] = self.b2[i].cpu()
        return sd

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        return save_checkpoint(out_dir, self.config, self.state_dict())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Surrogate:
        """Move the weights (in place) and return self; with ``dtype`` (the model's), also cast
        w1 to it now (``w1_as``), before torch.compile traces the model."""
        self.w1 = self.w1.to(device)
        self.b1 = self.b1.to(device)
        if self.w2 is not None:
            self.w2 = self.w2.to(device)
            self.b2 = self.b2.to(device)  # type: ignore[union-attr]
        self._w1_by_dtype = {}
        if dtype is not None:
            self.w1_as(dtype)
        return self

    def select_heads(self, first: int, count: int) -> Surrogate:
        """The surrogate of KV heads ``first .. first + count - 1`` only: the rows of its last
        layer for those heads (a tensor-parallel rank's shard; the MLP's hidden layer is whole)."""
        if (first, count) == (0, self.config.output_dim):
            return self
        heads = slice(first, first + count)
        config = dataclasses.replace(self.config, output_dim=count)
        if self.w2 is None:
            return Surrogate(config, self.w1[:, heads], self.b1[:, heads], source=self.source)
        return Surrogate(
            config, self.w1, self.b1, self.w2[:, heads], self.b2[:, heads], source=self.source
        )

    def w1_as(self, dtype: torch.dtype) -> torch.Tensor:
        """All layers' w1 in ``dtype``, cast once and kept: the GPU paths' matmul operand (bf16
        reads half the bytes of float32 and runs on tensor cores). Not cast while torch.compile
        traces (the cast would be traced into the graph and rerun every step): then a dtype that
        ``to(device, dtype)`` did not prepare is returned as float32 and the kernels cast it on
        every call."""
        w1 = self._w1_by_dtype.get(dtype)
        if w1 is None and not torch.compiler.is_compiling():
            w1 = self._w1_by_dtype[dtype] = self.w1.to(dtype)
        return self.w1 if w1 is None else w1

    def layer_weights(
        self, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(w1, b1, w2, b2) of one layer, as views; w2/b2 are None for linear."""
        if not 0 <= layer_idx < self.config.n_modules:
            raise IndexError(
                f"layer_idx {layer_idx} out of range for a surrogate with "
                f"n_modules={self.config.n_modules}"
            )
        w2 = None if self.w2 is None else self.w2[layer_idx]
        b2 = None if self.b2 is None else self.b2[layer_idx]
        return self.w1[layer_idx], self.b1[layer_idx], w2, b2

    def score(self, hidden_states: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Scores [T, H_kv] float32 (approximate log KVzip+ importance) of one layer.

        CPU: the float32 torch twin, which torch.compile fuses into the model's graph. CUDA: the
        opaque op ``vllm_kvzap::surrogate_scores`` (inside vLLM's compiled, graph-captured model),
        with w1 in the model's dtype, which applies the rule of ``kernels.surrogate_score.
        use_triton`` to the step's token count T at run time:
        - linear surrogate: the Triton kernel, always;
        - MLP surrogate: the Triton kernel for T <= TRITON_MAX_TOKENS (1024: every decode step,
          latency-bound), cuBLAS GEMMs in the model's dtype above (long prefill chunks).
        The rule sits in the op, not here: T is symbolic when vLLM traces this code once for all
        step sizes, and a branch on it would be fixed at trace time.
        """
        if hidden_states.is_cuda:
            return surrogate_scores(hidden_states, *self._weights(hidden_states, layer_idx))
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.config.input_dim:
            raise ValueError(
                f"hidden_states must be [T, {self.config.input_dim}], "
                f"got {list(hidden_states.shape)}"
            )
        return scores_torch(hidden_states, *self._weights(hidden_states, layer_idx))

    def _weights(self, hidden_states: torch.Tensor, layer_idx: int):
        """layer_weights, with w1 in the hidden states' dtype on CUDA (float32 on CPU)."""
        w1, b1, w2, b2 = self.layer_weights(layer_idx)
        if hidden_states.is_cuda:
            w1 = self.w1_as(hidden_states.dtype)[layer_idx]
        return w1, b1, w2, b2

    def check_compatible(
        self,
        hidden_size: int,
        num_kv_heads: int,
        num_layers: int,
        model_name: str | None = None,
    ) -> None:
        """Raise SurrogateCheckpointError unless D, H_kv and L match the served model."""
        c = self.config
        if (c.input_dim, c.output_dim, c.n_modules) == (hidden_size, num_kv_heads, num_layers):
            return
        raise SurrogateCheckpointError(
            f"surrogate {self.source or '(in memory)'} has input_dim={c.input_dim}, "
            f"output_dim={c.output_dim}, n_modules={c.n_modules} but model "
            f"{model_name or '(served model)'} has hidden_size={hidden_size}, "
            f"num_kv_heads={num_kv_heads}, num_layers={num_layers}; use a surrogate trained "
            "for this model"
        )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Surrogate(kind={self.kind}, input_dim={c.input_dim}, output_dim={c.output_dim}, "
            f"n_modules={c.n_modules}, hidden_dim={c.hidden_dim}, device={self.device}, "
            f"source={self.source!r})"
        )


def load_surrogate(name_or_path: str | os.PathLike[str]) -> Surrogate:
    """Load a published KVzap checkpoint (local dir or Hub id) as a CPU float32 Surrogate."""
    config, state_dict = read_checkpoint(name_or_path)
    return Surrogate.from_state_dict(config, state_dict, source=os.fspath(name_or_path))


BUNDLED_DIR = Path(__file__).resolve().parents[1] / "surrogates"


def bundled_checkpoint_dir(kind: str, model_name_or_path: str | os.PathLike[str]) -> Path | None:
    """The surrogate shipped inside this package for a model, by basename:
    ``vllm_kvzap/surrogates/KVzap-{kind}-{basename}`` (None when there is none)."""
    path = BUNDLED_DIR / default_surrogate_id(kind, model_name_or_path).split("/", 1)[1]
    return path if (path / "config.json").is_file() else None


def default_surrogate_id(kind: str, model_name_or_path: str | os.PathLike[str]) -> str:
    """NVIDIA's Hub id for a model: ``nvidia/KVzap-{kind}-{basename}``."""
    if kind not in SURROGATE_KINDS:
        raise ValueError(f"surrogate kind must be one of {SURROGATE_KINDS}, got {kind!r}")
    basename = Path(os.fspath(model_name_or_path).rstrip("/")).name
    if not basename:
        raise ValueError(f"cannot derive a model basename from {model_name_or_path!r}")
    return f"nvidia/KVzap-{kind}-{basename}"
