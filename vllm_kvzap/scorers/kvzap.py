"""KVzap's methods: a per-layer surrogate (surrogate.py) scores the hidden states entering
`self_attn`; kvpress's `KVzapPress` under DMS, as presses of the registry (registry.py)."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvzap.scorers.registry import Press


@dataclass(frozen=True)
class KVzapMLP(Press):
    name = "kvzap-mlp"
    help = "MLP surrogate"
    surrogate_kind = "mlp"

    def input_scores(self, runtime, layer_idx, hidden_states, positions):
        return runtime.surrogate.score(hidden_states, layer_idx)


@dataclass(frozen=True)
class KVzapLinear(KVzapMLP):
    name = "kvzap-linear"
    help = "linear surrogate"
    surrogate_kind = "linear"
