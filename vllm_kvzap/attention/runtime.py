"""Worker-side pruning state, shared by the scoring op and the attention backend.

Data flow inside one forward pass, per decoder layer `l`:
1. a forward pre-hook on `layers.{l}.self_attn` asks the method's press (`config.press`,
   `scorers/registry.py`) for the scores of the layer's input hidden states `[T, D]`
   (`input_scores`: e.g. the KVzap surrogate, the torch twin on CPU and the Triton kernel as a
   custom op on CUDA, `kernels/surrogate_score.py`), and the scoring op (`scoring_op.py`) copies
   them into `score_buffer[l, :T]` (`[L, max_num_batched_tokens, H_kv]` float32, allocated once on
   the model's device: a captured CUDA graph replays that copy into the same memory);
2. the attention backend of layer `l` takes them (`layer_scores`; a press that scores the keys,
   knorm, is asked there, `key_scores`) and stores each pair's score with it: paged mode in the
   page table (`cache/page_table.py`), which judges a pair against the threshold once it has left
   the window; mask mode as keep flags (score >= threshold) in `keep_caches[l]`, indexed like
   vLLM's paged KV cache (one row per slot).
A pair's score is fixed when it is written; when it is applied depends only on the request's
progress, so a pair is judged exactly once and never comes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_kvzap.cache.page_table import PageTable, allocate_directory
from vllm_kvzap.cache.step_plan import StepPlan, StepRows
from vllm_kvzap.config import KVPruningConfig
from vllm_kvzap.rule import keep
from vllm_kvzap.scorers import Surrogate, load_surrogate

_runtime: PruningRuntime | None = None


class PruningRuntime:
    def __init__(
        self,
        config: KVPruningConfig,
        surrogate: Surrogate | None,
        num_layers: int,
        num_kv_heads: int,
        max_num_seqs: int = 256,
        max_model_len: int = 8192,
        max_num_tokens: int = 8192,
        device: torch.device | str = "cpu",
        key_layout: str = "transposed",
        block_size: int | None = None,
        heads: TensorParallelHeads | None = None,
    ):
        self.config = config
        self.press = config.press  # the scoring method, with its options
        self.surrogate = surrogate
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads  # this rank's (all of them without tensor parallelism)
        self.heads = heads
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.key_layout = key_layout  # in-page key layout the backend's kernel reads
        self.score_buffer = torch.zeros(
            num_layers, max_num_tokens, num_kv_heads, dtype=torch.float32, device=device
        )
        self.keep_caches: dict[int, torch.Tensor] = {}  # mask mode
        self.pages: PageTable | None = None  # paged mode
        # paged mode: the per-row part of the page table's directory (chunk table and row state:
        # 4 L (S+1) H ceil(P / chunk) + 40 L (S+1) H bytes, `cache/page_table.py`), allocated
        # with the model, where vLLM's memory profile counts it, and handed to the table; its pool
        # part follows the KV cache's pages and is allocated with the table
        self.directory = None
        if config.paged and block_size is not None:
            self.directory = allocate_directory(
                num_layers, max_num_seqs, num_kv_heads, max_model_len, block_size, device
            )
        # paged mode: the rows the metadata builder described last, and the (rows, plan) of the
        # step the KV connector bound (`bind_step`)
        self.next_rows: StepRows | None = None
        self.bound: tuple[StepRows, StepPlan] | None = None

    def setup_paged(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm_kvzap.compat import extract_layer_index

        by_layer = sorted((extract_layer_index(name), t) for name, t in kv_caches.items())
        assert [i for i, _ in by_layer] == list(range(self.num_layers)), sorted(kv_caches)
        self.pages = PageTable(
            [t for _, t in by_layer],
            window=self.config.window,
            threshold=self.config.threshold,
            max_reqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            ratio=self.config.ratio if self.config.ratio_mode else None,
            alpha=self.config.alpha,
            heads=self.heads,
            prefill=self.config.prefill,
            key_layout=self.key_layout,
            directory=self.directory,
        )
        self.directory = None  # the table owns it now

    def bind_step(self, num_scheduled_tokens: int) -> None:
        """The KV connector binds a scheduled step (after vLLM built its attention metadata, before
        the forward pass): plan the rows the metadata builder described for it.

        This is how a backend tells a scheduled step from every other forward: vLLM runs the model
        on batches that are not scheduled steps (V2's memory profile and CUDA-graph memory estimate,
        JIT warm-up with fake requests, CUDA-graph capture, V1's dummy runs), always with the KV
        connector disabled or not called, so their rows are never bound and `bound_plan` gives
        them no plan: they leave the page table, request indices, free pages and statistics
        alone."""
        rows, self.next_rows = self.next_rows, None
        if not num_scheduled_tokens:  # no forward in this step (the rows, if any, are stale)
            self.bound = None
            return
        if rows is None:
            raise RuntimeError(
                f"kv_pruning: a step of {num_scheduled_tokens} tokens was bound, but the attention "
                "metadata builder described no rows for it"
            )
        self.bound = (rows, self.pages.plan(rows))

    def bound_plan(self, rows: StepRows | None) -> StepPlan | None:
        """The plan of the scheduled step whose metadata holds `rows`, or None for a forward that
        is not a scheduled step (see `bind_step`)."""
        if rows is not None and self.bound is not None and self.bound[0] is rows:
            return self.bound[1]
        return None

    def graph_scores(
        self, layer_idx: int, hidden_states: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor | None:
        """Scores [T, H_kv] of the step's tokens from the layer's input, in plain torch ops (they
        become part of the compiled model graph); None for a method that scores the keys."""
        return self.press.input_scores(self, layer_idx, hidden_states, positions)

    def save_scores(self, layer_idx: int, scores: torch.Tensor) -> None:
        """The scoring op: the step's scores, for the layer's attention right after."""
        num_tokens = scores.shape[0]
        if num_tokens > self.score_buffer.shape[1]:
            raise RuntimeError(
                f"kv_pruning: {num_tokens} tokens in one forward pass, but the score buffer holds "
                f"{self.score_buffer.shape[1]} (max_num_batched_tokens)"
            )
        self.score_buffer[layer_idx, :num_tokens].copy_(scores)

    def layer_scores(self, layer_idx: int, key: torch.Tensor) -> torch.Tensor:
        """Scores [T, H_kv] float32 of the step's tokens in this layer (key: [T, H_kv, D])."""
        scores = self.press.key_scores(key)
        return self.score_buffer[layer_idx, : key.shape[0]] if scores is None else scores

    def keep_flags(self, layer_idx: int, key: torch.Tensor) -> torch.Tensor:
        """Mask mode: keep flags [T, H_kv] (score >= threshold) of the step's tokens."""
        return keep(self.layer_scores(layer_idx, key), self.config.threshold)

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


@dataclass(frozen=True)
class TensorParallelHeads:
    """A tensor-parallel rank's KV heads: `count` heads from `first`, numbered as in the whole
    model (vLLM's `QKVParallelLinear` gives rank r heads r * count ..), and how to gather a
    tensor's last dimension over all ranks' heads (ratio mode's layer-wide rule)."""

    first: int
    count: int
    total: int

    @classmethod
    def of_this_rank(cls, total_kv_heads: int) -> TensorParallelHeads | None:
        """None without tensor parallelism."""
        from vllm_kvzap.compat import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        size = get_tensor_model_parallel_world_size()
        if size == 1:
            return None
        # refused before any worker starts (`engine_setup.finish_vllm_config`)
        assert total_kv_heads % size == 0, (total_kv_heads, size)
        count = total_kv_heads // size
        return cls(get_tensor_model_parallel_rank() * count, count, total_kv_heads)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., count]`` of every rank, as ``[..., total]`` (a collective: every rank calls
        it at the same point of the same step)."""
        from vllm_kvzap.compat import tensor_model_parallel_all_gather

        return tensor_model_parallel_all_gather(x.contiguous(), dim=-1)

    def own(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part ``[..., count]`` of ``x [..., total]``."""
        return x[..., self.first : self.first + self.count]


def find_attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """`layers.{i}.self_attn` modules that wrap a vLLM `Attention` layer, by layer index."""
    from vllm_kvzap.compat import Attention, extract_layer_index

    found = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn") and isinstance(getattr(module, "attn", None), Attention):
            found[extract_layer_index(name)] = module
    return found


def page_key_layout(modules) -> str:
    """The in-page key layout of the layers' attention backend (`page_key_layout` of the
    plugin's backends: "transposed" for vLLM's CPU kernel, "plain" for its Triton kernel)."""
    layouts = {getattr(m.attn.attn_backend, "page_key_layout", None) for m in modules}
    if len(layouts) != 1 or None in layouts:
        names = sorted({m.attn.attn_backend.get_name() for m in modules})
        raise RuntimeError(
            f"kv_pruning: the model's attention layers run on {names}, not on one of the "
            "plugin's pruning backends"
        )
    return layouts.pop()


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
    heads = TensorParallelHeads.of_this_rank(vllm_config.model_config.get_total_num_kv_heads())
    num_kv_heads = heads.count if heads is not None else (
        vllm_config.model_config.get_total_num_kv_heads()
    )
    surrogate = None
    if config.uses_surrogate:
        # on CUDA the Triton kernel multiplies in the model's dtype: cast w1 once, before compile
        dtype = vllm_config.model_config.dtype if device.type == "cuda" else None
        surrogate = load_surrogate(config.surrogate)
        if heads is not None:
            surrogate = surrogate.select_heads(heads.first, heads.count)
        surrogate = surrogate.to(device, dtype)
    scheduler_config = vllm_config.scheduler_config
    runtime = PruningRuntime(
        config,
        surrogate,
        len(modules),
        num_kv_heads,
        max_num_seqs=scheduler_config.max_num_seqs,
        max_model_len=vllm_config.model_config.max_model_len,
        max_num_tokens=scheduler_config.max_num_batched_tokens,
        device=device,
        key_layout=page_key_layout(modules.values()),
        block_size=vllm_config.cache_config.block_size,
        heads=heads,
    )

    from vllm_kvzap.attention.scoring_op import save_scores

    for layer_idx, module in modules.items():

        def hook(module, args, kwargs, layer_idx=layer_idx):
            # Scores in torch ops (compiled with the model), handed over by a custom op that runs
            # inside the graph, before this layer's attention (see `scoring_op.py`).
            positions = kwargs["positions"] if "positions" in kwargs else args[0]
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
            positions = positions[: hidden_states.shape[0]]
            scores = runtime.graph_scores(layer_idx, hidden_states, positions)
            if scores is not None:
                save_scores(hidden_states, scores, layer_idx)

        module.register_forward_pre_hook(hook, with_kwargs=True)
    _runtime = runtime
    return runtime
