"""Worker-side pruning state, shared by the scoring hooks and the attention backend.

Data flow inside one forward pass, per decoder layer `l`:
1. a forward pre-hook on `layers.{l}.self_attn` scores its input hidden states `[T, D]` with the
   surrogate (or a baseline, `scorers/baselines.py`; knorm is scored from the keys in step 2) and
   stores keep flags `[T, H_kv]` (score >= threshold) in `pending_keep[l]`;
2. the attention backend of layer `l` scatters those flags into `keep_caches[l]`, indexed like the
   paged KV cache (one row per slot), then attends with them once a token has left the window.
A slot's flag is fixed when its KV pair is written; whether it is applied depends only on the
request's progress (see `judged_upto` in the backend), so a pair is judged exactly once and never
comes back. The KV connector reads `keep_caches` to count a finished request's pruned pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_kvzap.attention.paged import PagedKV
from vllm_kvzap.config import KVPruningConfig
from vllm_kvzap.scorers import Surrogate, load_surrogate
from vllm_kvzap.scorers.baselines import knorm_scores, random_scores, window_scores

_runtime: PruningRuntime | None = None


class PruningRuntime:
    def __init__(
        self, config: KVPruningConfig, surrogate: Surrogate | None, num_layers: int, num_kv_heads: int
    ):
        self.config = config
        self.surrogate = surrogate
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.pending_keep: dict[int, torch.Tensor] = {}
        self.keep_caches: dict[int, torch.Tensor] = {}  # mask mode
        self.paged: PagedKV | None = None  # paged mode

    def setup_paged(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        by_layer = sorted((extract_layer_index(name), t) for name, t in kv_caches.items())
        assert [i for i, _ in by_layer] == list(range(self.num_layers)), sorted(kv_caches)
        self.paged = PagedKV([t for _, t in by_layer], self.num_layers, self.config.window)

    def score(self, layer_idx: int, hidden_states: torch.Tensor, positions: torch.Tensor) -> None:
        """Scoring hook, before a layer's attention: keep flags for the step's tokens."""
        method, threshold = self.config.method, self.config.threshold
        if self.surrogate is not None:
            _, keep = self.surrogate.score_and_decide(hidden_states, layer_idx, threshold)
        elif method == "window":
            keep = window_scores(positions, self.num_kv_heads, self.config.sinks) >= threshold
        elif method == "random":
            scores = random_scores(positions, layer_idx, self.num_kv_heads, self.config.seed)
            keep = scores >= threshold
        else:
            return  # knorm: scored from the keys, in `keep_flags`
        self.pending_keep[layer_idx] = keep

    def keep_flags(self, layer_idx: int, key: torch.Tensor) -> torch.Tensor:
        """Keep flags [T, H_kv] of the step's tokens in this layer (key: [T, H_kv, D])."""
        if self.config.method == "knorm":
            return knorm_scores(key) >= self.config.threshold
        return self.pending_keep.pop(layer_idx)

    def keep_cache(self, layer_idx: int, num_slots: int, num_kv_heads: int, device) -> torch.Tensor:
        cache = self.keep_caches.get(layer_idx)
        if cache is None or cache.shape[0] != num_slots:
            cache = torch.ones(num_slots, num_kv_heads, dtype=torch.bool, device=device)
            self.keep_caches[layer_idx] = cache
        return cache

    def count_pruned(self, block_ids: list[int], num_kv_tokens: int, block_size: int) -> list[int]:
        """Pruned pairs per layer of a request whose KV covers `num_kv_tokens` positions."""
        num_judged = max(0, num_kv_tokens - self.config.window)
        if num_judged == 0 or not self.keep_caches:
            return [0] * self.num_layers
        blocks = torch.tensor(block_ids, dtype=torch.long)
        positions = torch.arange(num_judged)
        slots = blocks[positions // block_size] * block_size + positions % block_size
        counts = []
        for layer_idx in range(self.num_layers):
            cache = self.keep_caches.get(layer_idx)
            if cache is None:
                counts.append(0)
                continue
            counts.append(int((~cache[slots.to(cache.device)]).sum()))
        return counts


def get_runtime() -> PruningRuntime | None:
    return _runtime


def find_attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """`layers.{i}.self_attn` modules that wrap a vLLM `Attention` layer, by layer index."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index

    found = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn") and isinstance(getattr(module, "attn", None), Attention):
            found[extract_layer_index(name)] = module
    return found


def install_runtime(model: nn.Module, vllm_config, config: KVPruningConfig) -> PruningRuntime:
    """Load the surrogate and hook every self-attention module of the freshly loaded model."""
    global _runtime
    modules = find_attention_modules(model)
    if not modules:
        raise RuntimeError(
            f"kv_pruning: found no `self_attn` modules with a vLLM Attention layer in "
            f"{type(model).__name__}; this model architecture is not supported"
        )
    device = next(model.parameters()).device
    surrogate = load_surrogate(config.surrogate).to(device) if config.uses_surrogate else None
    num_kv_heads = vllm_config.model_config.get_total_num_kv_heads()
    runtime = PruningRuntime(config, surrogate, len(modules), num_kv_heads)

    for layer_idx, module in modules.items():

        def hook(module, args, kwargs, layer_idx=layer_idx):
            positions = kwargs["positions"] if "positions" in kwargs else args[0]
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
            runtime.score(layer_idx, hidden_states, positions[: hidden_states.shape[0]])

        module.register_forward_pre_hook(hook, with_kwargs=True)
    _runtime = runtime
    return runtime
