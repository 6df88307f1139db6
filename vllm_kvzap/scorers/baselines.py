"""Baseline pruning methods, scored like KVzap so that the same DMS machinery applies them.

Presses of the registry (registry.py). Every method maps the tokens of one step to scores
`[T, H_kv]`; a pair is pruned when its score is strictly below the threshold once it leaves the
window, exactly as for `kvzap-*`:
- `window` (StreamingLLM): the first `sinks` positions score +inf, every other one -inf, so only the
  attention sinks and the recent window survive (the threshold does not matter);
- `knorm` (kvpress's KnormPress): score = -||k|| of the cached key (after the key norm and RoPE,
  which preserves norms), so the largest keys go first;
- `random`: score = -u with u uniform in [0, 1), a fixed hash of (seed, layer, position, KV head),
  so that a threshold t in [-1, 0] prunes a fraction 1 + t of the judged pairs (-0.3 prunes 70%),
  reproducibly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvzap.scorers.registry import Press

_MULT = 2654435761  # Knuth's multiplicative hash constant
_MASK = 2**32 - 1


def window_scores(positions: torch.Tensor, num_kv_heads: int, sinks: int) -> torch.Tensor:
    keep = (positions < sinks)[:, None].expand(-1, num_kv_heads)
    inf = torch.tensor(float("inf"), device=positions.device)
    return torch.where(keep, inf, -inf)


def knorm_scores(keys: torch.Tensor) -> torch.Tensor:
    """keys [T, H_kv, D] -> -||k|| [T, H_kv] (float32)."""
    return -keys.float().norm(dim=-1)


def random_uniform(
    positions: torch.Tensor, layer_idx: int, num_kv_heads: int, seed: int, first_head: int = 0
) -> torch.Tensor:
    """u in [0, 1) [T, H_kv]: a hash of (seed, layer, position, head), independent of batching
    (heads ``first_head ..``: a tensor-parallel rank's, numbered as in the whole model)."""
    heads = torch.arange(num_kv_heads, device=positions.device, dtype=torch.int64) + first_head
    x = (
        positions.to(torch.int64)[:, None] * 1_000_003
        + heads[None, :] * 10_007
        + layer_idx * 101
        + seed
    ) & _MASK
    x = (x * _MULT) & _MASK
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    x = x ^ (x >> 16)
    return x.to(torch.float64).div(2**32).float()


def random_scores(
    positions: torch.Tensor, layer_idx: int, num_kv_heads: int, seed: int, first_head: int = 0
) -> torch.Tensor:
    return -random_uniform(positions, layer_idx, num_kv_heads, seed, first_head)


@dataclass(frozen=True)
class Window(Press):
    name = "window"
    help = "sinks + recent window"
    has_scores = False  # +-inf: nothing to rank (ratio mode) or to compare with a threshold
    sinks: int = field(default=4, metadata={"help": "the first N tokens are kept as attention sinks"})

    def input_scores(self, runtime, layer_idx, hidden_states, positions):
        return window_scores(positions, runtime.num_kv_heads, self.sinks)


@dataclass(frozen=True)
class Knorm(Press):
    name = "knorm"
    help = "largest key norms pruned"

    def key_scores(self, key):
        return knorm_scores(key)


@dataclass(frozen=True)
class Random(Press):
    name = "random"
    help = "uniform random scores"
    seed: int = field(default=0, metadata={"help": "seed of the per-(layer, position, head) draws"})

    def input_scores(self, runtime, layer_idx, hidden_states, positions):
        first = runtime.heads.first if runtime.heads is not None else 0
        return random_scores(positions, layer_idx, runtime.num_kv_heads, self.seed, first)
