"""Independent plain-torch reference of KVzap + DMS pruning semantics (test oracle).

This module re-implements, from scratch and without importing ``vllm`` or ``vllm_kvzap``, greedy
generation of a Hugging Face ``Qwen3ForCausalLM`` checkpoint (float32) under the semantics of kvpress's

    DMSPress(KVzapPress(...), threshold, sliding_window_size=window, decoding=True)

It is the ground truth the plugin is compared against in end-to-end tests. Weights are read with
``safetensors`` and ``json`` directly; the model forward (RMSNorm, q/k norms, RoPE, GQA attention, SwiGLU
MLP) is written out explicitly so that it shares no code with either vLLM or the plugin.

Semantics implemented (see /work/shared/DESIGN.md section 1 and kvpress ``dms_press.py``):

* Surrogate: the KVzap checkpoint (``config.json`` + ``model.safetensors``) is applied to each layer's
  self-attention input (the ``input_layernorm`` output), giving float32 scores ``[T, H_kv]``.
  Linear: ``layers.{i}.weight/bias``; MLP: ``layers.{i}.0.*`` -> exact (erf) GELU -> ``layers.{i}.2.*``.
* Prefill is dense: every prompt token attends causally to the whole prompt. With ``prefill_chunks`` the
  prompt is fed in chunks instead, each a step under the rule below (the plugin's chunked prefill).
* After a layer's attention for the current step, every token older than the newest ``window`` tokens
  (the token just written included) that was not judged yet is judged once: pruned iff
  ``score < threshold`` (strict). A pruned (layer, KV head, token) is masked from the NEXT step on and
  never comes back; the query of the step in which a token is judged still sees it.
* Decoding adds one token per step; the token leaving the window is judged after that step's attention.
  ``window = 0``: every token is judged right after its own step. ``threshold = -inf`` prunes nothing.
* Statistics like kvpress: per layer, pruned pairs / (H_kv x tokens whose KV was computed), i.e. prompt
  plus generated tokens except the last generated one (whose KV is never computed); the request's value is
  the mean over layers.

Ratio mode (``ratio=R``, ``alpha=A``; ``threshold`` and ``window`` then not given): kvpress's
``AdaKVPress(KVzapPress(...), alpha_safeguard=A)`` with ``compression_ratio=R`` instead. The prompt is
attended densely; right after a layer's attention of the prompt step, that layer's pruned pairs are chosen
over the whole prompt's scores ``[P, H_kv]`` by ``tests/reference_adakv.py`` (``layer_pruned_mask``) and
masked from the next step on; generated tokens are never judged. Statistics as above, plus
``prompt_pruned_fraction_per_layer`` / ``prompt_pruned_fraction`` (pruned pairs / (H_kv x P)).

Public API:

* ``dms_generate(model_dir, surrogate_dir, prompt_ids, max_new_tokens, threshold, window,
  eos_token_id=None, ..., ratio=None, alpha=0.2) -> dict`` with ``output_ids``, ``logits`` (one float32
  ``[vocab]`` per generated token), ``pruned_mask`` (per layer bool ``[H_kv, num_kv_tokens]``), ``pruned_fraction_per_layer``,
  ``pruned_fraction`` and, as extras, ``scores`` (per layer float32 ``[num_kv_tokens, H_kv]``, each token
  scored at the step it was written) and ``num_kv_tokens``.
* ``forward_dense_logits(model_dir, ids) -> [T, vocab]`` float32: plain causal forward, no pruning.
* ``surrogate_scores(surrogate_dir, layer_idx, x) -> [T, H_kv]``: the surrogate alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

try:
    from tests import reference_adakv as _adakv
except ImportError:  # tests/ itself on sys.path
    import reference_adakv as _adakv  # type: ignore[no-redef]

__all__ = [
    "ReferenceQwen3",
    "ReferenceSurrogate",
    "dms_generate",
    "forward_dense_logits",
    "load_model",
    "load_surrogate",
    "surrogate_scores",
]

_DTYPE = torch.float32


# --------------------------------------------------------------------------------------------------------
# Loading (cached by path + modification times, so a rewritten directory is reloaded)
# --------------------------------------------------------------------------------------------------------

_CACHE: dict[tuple, object] = {}
_CACHE_MAX = 8


def _dir_key(kind: str, path) -> tuple:
    p = Path(path).resolve()
    stamps = []
    for f in sorted(p.iterdir()):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            stamps.append((f.name, st.st_mtime_ns, st.st_size))
    return (kind, str(p), tuple(stamps))


def _cached(kind: str, path, loader):
    key = _dir_key(kind, path)
    obj = _CACHE.get(key)
    if obj is None:
        obj = loader(Path(path))
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = obj
    return obj


def _read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(path / name), device="cpu"))
    return {k: v.to(_DTYPE) for k, v in tensors.items()}


# --------------------------------------------------------------------------------------------------------
# Qwen3 model, written out from the state dict
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    in_norm: torch.Tensor
    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_w: torch.Tensor
    up_w: torch.Tensor
    down_w: torch.Tensor


class ReferenceQwen3:
    """Qwen3ForCausalLM weights plus the explicit math of its forward pass; also reads
    LlamaForCausalLM (the same layer without the per-head q/k RMS norms), e.g. SmolLM2."""

    def __init__(self, path: Path):
        cfg = json.loads((path / "config.json").read_text())
        self.config = cfg
        arch = cfg.get("architectures") or ["Qwen3ForCausalLM"]
        supported = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
        if supported.get(cfg.get("model_type") or "qwen3") not in arch:
            raise ValueError(f"reference supports {sorted(supported.values())} only, got {arch} / {cfg.get('model_type')}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')}")
        layer_types = cfg.get("layer_types") or []
        if cfg.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise ValueError("reference supports full attention layers only")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"reference supports default RoPE only, got {rope_type}")
        self.rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))

        self.hidden = int(cfg["hidden_size"])
        self.n_layers = int(cfg["num_hidden_layers"])
        self.n_heads = int(cfg["num_attention_heads"])
        self.n_kv = int(cfg.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.n_heads)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.vocab = int(cfg["vocab_size"])
        if self.n_heads % self.n_kv:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.group = self.n_heads // self.n_kv

        sd = _read_safetensors_dir(path)
        self.embed = sd["model.embed_tokens.weight"]
        self.final_norm = sd["model.norm.weight"]
        if "lm_head.weight" in sd:
            self.lm_head = sd["lm_head.weight"]
        elif cfg.get("tie_word_embeddings", False):
            self.lm_head = self.embed
        else:
            raise ValueError("lm_head.weight missing and tie_word_embeddings is false")
        self.layers: list[_Layer] = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(
                _Layer(
                    in_norm=sd[p + "input_layernorm.weight"],
                    q_w=sd[a + "q_proj.weight"],
                    q_b=sd.get(a + "q_proj.bias"),
                    k_w=sd[a + "k_proj.weight"],
                    k_b=sd.get(a + "k_proj.bias"),
                    v_w=sd[a + "v_proj.weight"],
                    v_b=sd.get(a + "v_proj.bias"),
                    o_w=sd[a + "o_proj.weight"],
                    o_b=sd.get(a + "o_proj.bias"),
                    q_norm=sd.get(a + "q_norm.weight"),
                    k_norm=sd.get(a + "k_norm.weight"),
                    post_norm=sd[p + "post_attention_layernorm.weight"],
                    gate_w=sd[p + "mlp.gate_proj.weight"],
                    up_w=sd[p + "mlp.up_proj.weight"],
                    down_w=sd[p + "mlp.down_proj.weight"],
                )
            )
        self.inv_freq = 1.0 / (
            self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(_DTYPE) / self.head_dim)
        )

    # --- building blocks -------------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.eps))

    @staticmethod
    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = x @ w.t()
        return y if b is None else y + b

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; standard rotate_half RoPE at absolute positions."""
        freqs = positions.to(_DTYPE)[:, None] * self.inv_freq[None, :]  # [T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, d]
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def qkv(self, layer: _Layer, x: torch.Tensor, positions: torch.Tensor):
        """x: normed hidden [T, D] -> q [T, H, d], k/v [T, H_kv, d] (RoPE applied to q and k)."""
        T = x.shape[0]
        q = self.linear(x, layer.q_w, layer.q_b).view(T, self.n_heads, self.head_dim)
        k = self.linear(x, layer.k_w, layer.k_b).view(T, self.n_kv, self.head_dim)
        v = self.linear(x, layer.v_w, layer.v_b).view(T, self.n_kv, self.head_dim)
        if layer.q_norm is not None:  # Qwen3; Llama has none
            q = self.rms_norm(q, layer.q_norm)
            k = self.rms_norm(k, layer.k_norm)
        return self.rope(q, positions), self.rope(k, positions), v

    def attend(self, q, k, v, q_pos, k_pos, pruned_kv: torch.Tensor | None) -> torch.Tensor:
        """q [T, H, d], k/v [S, H_kv, d]; pruned_kv bool [H_kv, S] (True = masked for this KV head).

        Query head h uses KV head h // group (grouped-query attention).
        Returns [T, H * d].
        """
        T, S = q.shape[0], k.shape[0]
        allowed = (k_pos[None, :] <= q_pos[:, None])[None].expand(self.n_kv, T, S)  # [H_kv, T, S]
        if pruned_kv is not None:
            allowed = allowed & ~pruned_kv[:, None, :]
        out = torch.empty(T, self.n_heads, self.head_dim, dtype=_DTYPE)
        scale = 1.0 / math.sqrt(self.head_dim)
        for h in range(self.n_heads):
            g = h // self.group
            logits = (q[:, h, :] @ k[:, g, :].t()) * scale  # [T, S]
            logits = logits.masked_fill(~allowed[g], float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            out[:, h, :] = probs @ v[:, g, :]
        return out.reshape(T, self.n_heads * self.head_dim)

    def mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate = x @ layer.gate_w.t()
        up = x @ layer.up_w.t()
        return (torch.nn.functional.silu(gate) * up) @ layer.down_w.t()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(h, self.final_norm) @ self.lm_head.t()


class ReferenceSurrogate:
    """KVzap surrogate read from the published format (config.json + model.safetensors)."""

    def __init__(self, path: Path):
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") != "kvzap":
            raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} is not 'kvzap'")
        self.config = cfg
        self.input_dim = int(cfg["input_dim"])
        self.output_dim = int(cfg["output_dim"])
        self.n_modules = int(cfg["n_modules"])
        self.hidden_dim = cfg.get("hidden_dim")
        self.kind = "linear" if self.hidden_dim is None else "mlp"
        sd = {k: v.to(_DTYPE) for k, v in load_file(str(path / "model.safetensors"), device="cpu").items()}
        if not any(k.startswith("layers.") for k in sd):  # kvpress' in-memory attribute name
            sd = {k.replace("module_list.", "layers.", 1): v for k, v in sd.items()}
        self.mods: list[tuple] = []
        for i in range(self.n_modules):
            if self.kind == "linear":
                self.mods.append((sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]))
            else:
                names = (f"layers.{i}.0.weight", f"layers.{i}.0.bias", f"layers.{i}.2.weight", f"layers.{i}.2.bias")
                self.mods.append(tuple(sd[k] for k in names))

    def score(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, D] self-attention input of the layer -> [T, H_kv] float32 scores."""
        x = x.to(_DTYPE)
        m = self.mods[layer_idx]
        if self.kind == "linear":
            return x @ m[0].t() + m[1]
        hid = x @ m[0].t() + m[1]
        hid = 0.5 * hid * (1.0 + torch.erf(hid / math.sqrt(2.0)))  # exact GELU
        return hid @ m[2].t() + m[3]


def load_model(model_dir) -> ReferenceQwen3:
    return _cached("model", model_dir, ReferenceQwen3)


def load_surrogate(surrogate_dir) -> ReferenceSurrogate:
    return _cached("surrogate", surrogate_dir, ReferenceSurrogate)


def surrogate_scores(surrogate_dir, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
    return load_surrogate(surrogate_dir).score(layer_idx, x)


# --------------------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def forward_dense_logits(model_dir, ids) -> torch.Tensor:
    """Plain causal forward over ``ids`` (no pruning); returns float32 logits ``[T, vocab]``."""
    m = load_model(model_dir)
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    pos = torch.arange(ids_t.numel())
    h = m.embed[ids_t]
    for layer in m.layers:
        x = m.rms_norm(h, layer.in_norm)
        q, k, v = m.qkv(layer, x, pos)
        h = h + m.linear(m.attend(q, k, v, pos, pos, None), layer.o_w, layer.o_b)
        h = h + m.mlp(layer, m.rms_norm(h, layer.post_norm))
    return m.logits(h)


@torch.no_grad()
def _random_uniform(seed: int, layer: int, position: int, head: int) -> float:
    """The random baseline's draw, written out with Python integers (32-bit arithmetic)."""
    m32 = 0xFFFFFFFF
    x = (position * 1_000_003 + head * 10_007 + layer * 101 + seed) & m32
    x = (x * 2654435761) & m32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & m32
    x ^= x >> 16
    return x / 2**32


def dms_generate(
    model_dir,
    surrogate_dir,
    prompt_ids: list[int],
    max_new_tokens: int,
    threshold: float | None = None,
    window: int | None = None,
    eos_token_id=None,
    method: str = "kvzap",
    sinks: int = 4,
    seed: int = 0,
    forced_tokens: list[int] | None = None,
    ratio: float | None = None,
    alpha: float = 0.2,
    prefill_chunks: list[int] | None = None,
) -> dict:
    """Greedy generation under DMSPress(KVzapPress, threshold, sliding_window_size=window, decoding=True).

    ``method`` other than "kvzap" scores with a baseline instead of the surrogate (``surrogate_dir`` is
    then ignored): "window" (+inf for the first ``sinks`` positions, -inf after: StreamingLLM),
    "knorm" (-||k|| of the cached key, as kvpress's KnormPress), "random" (-u, u a hash of
    (seed, layer, position, head) in [0, 1), see ``_random_uniform``).

    ``eos_token_id`` may be an int or a collection of ints; generation stops after emitting one (the eos
    token is included in ``output_ids``, as in transformers' ``generate``).

    ``forced_tokens[i]``, when given and not -1, replaces the greedy choice of output token ``i``
    (questions asked during decoding; the -1 steps are the model's own answers).

    ``ratio`` (with ``threshold`` and ``window`` left out): ratio mode, see the module docstring.

    ``prefill_chunks`` (sizes summing to the prompt's length; threshold mode): the prompt is fed in
    these chunks, one step each, instead of at once, and the rule above applies after every step:
    after a chunk's attention, the prompt tokens older than the newest ``window`` are judged and the
    pruned ones are masked from the next chunk on (the plugin's ``prefill: chunked``).
    """
    m = load_model(model_dir)
    if method not in ("kvzap", "window", "knorm", "random"):
        raise ValueError(f"unknown method {method!r}")
    sur = load_surrogate(surrogate_dir) if method == "kvzap" else None
    if sur is not None and (sur.input_dim, sur.output_dim, sur.n_modules) != (m.hidden, m.n_kv, m.n_layers):
        raise ValueError(
            f"surrogate (input_dim={sur.input_dim}, output_dim={sur.output_dim}, n_modules={sur.n_modules}) "
            f"does not fit the model (hidden_size={m.hidden}, num_kv_heads={m.n_kv}, num_layers={m.n_layers})"
        )
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ValueError("empty prompt")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if ratio is None:
        if threshold is None or window is None:
            raise ValueError("threshold and window are required (or give a ratio)")
    else:
        if threshold is not None or window is not None:
            raise ValueError("a ratio excludes threshold and window")
        if method == "window":
            raise ValueError("ratio mode needs scores: not with method 'window'")
        if not 0 <= ratio < 1 or not 0 <= alpha <= 1:
            raise ValueError(f"need 0 <= ratio < 1 and 0 <= alpha <= 1, got {ratio}, {alpha}")
        threshold, window = float("-inf"), 0  # unused below: no threshold judgement
    if window < 0:
        raise ValueError("window must be >= 0")
    if eos_token_id is None:
        eos = set()
    elif isinstance(eos_token_id, int):
        eos = {eos_token_id}
    else:
        eos = {int(e) for e in eos_token_id}
    threshold = float(threshold)
    chunks = [len(prompt_ids)] if prefill_chunks is None else [int(c) for c in prefill_chunks]
    if sum(chunks) != len(prompt_ids) or min(chunks) < 1:
        raise ValueError(f"prefill_chunks {chunks} do not split a prompt of {len(prompt_ids)}")
    if len(chunks) > 1 and ratio is not None:
        raise ValueError("ratio mode judges the whole prompt at once: no prefill_chunks")

    L, H_kv, d = m.n_layers, m.n_kv, m.head_dim
    cap = len(prompt_ids) + max_new_tokens
    k_cache = torch.zeros(L, cap, H_kv, d, dtype=_DTYPE)
    v_cache = torch.zeros(L, cap, H_kv, d, dtype=_DTYPE)
    scores = torch.zeros(L, cap, H_kv, dtype=_DTYPE)
    pruned = torch.zeros(L, H_kv, cap, dtype=torch.bool)
    n_judged = [0] * L  # tokens [0, n_judged) of each layer were judged
    n = 0  # tokens whose KV is in the cache

    output_ids: list[int] = []
    step_logits: list[torch.Tensor] = []
    new_ids, later_chunks = prompt_ids[: chunks[0]], iter(chunks[1:])
    while True:
        T = len(new_ids)
        pos = torch.arange(n, n + T)
        h = m.embed[torch.tensor(new_ids, dtype=torch.long)]
        end = n + T
        kpos = torch.arange(end)
        for li, layer in enumerate(m.layers):
            x = m.rms_norm(h, layer.in_norm)
            q, k, v = m.qkv(layer, x, pos)
            if method == "kvzap":
                scores[li, n:end] = sur.score(li, x)
            elif method == "knorm":
                scores[li, n:end] = -k.norm(dim=-1)
            elif method == "window":
                big = torch.full((T, H_kv), float("inf"), dtype=_DTYPE)
                scores[li, n:end] = torch.where((pos < sinks)[:, None], big, -big)
            else:
                scores[li, n:end] = torch.tensor(
                    [[-_random_uniform(seed, li, int(p), hh) for hh in range(H_kv)] for p in pos],
                    dtype=_DTYPE,
                )
            k_cache[li, n:end], v_cache[li, n:end] = k, v
            # Masks from previous steps only: decisions of this step are taken after attention.
            att = m.attend(q, k_cache[li, :end], v_cache[li, :end], pos, kpos, pruned[li, :, :end])
            h = h + m.linear(att, layer.o_w, layer.o_b)
            if ratio is not None:
                # Ratio mode: the whole prompt judged once, at the end of the prompt step.
                if n == 0:
                    pruned[li, :, :end] = _adakv.layer_pruned_mask(scores[li, :end], ratio, alpha).t()
                    n_judged[li] = end
            # Judge every not-yet-judged token that is older than the newest `window` tokens.
            limit = max(end - window, 0)
            if ratio is None and limit > n_judged[li]:
                j0 = n_judged[li]
                pruned[li, :, j0:limit] = (scores[li, j0:limit] < threshold).t()
                n_judged[li] = limit
            h = h + m.mlp(layer, m.rms_norm(h, layer.post_norm))
        n = end
        if n < len(prompt_ids):  # the prompt's next chunk
            new_ids = prompt_ids[n : n + next(later_chunks)]
            continue
        last = m.logits(h[-1:])[0].clone()
        step_logits.append(last)
        i = len(output_ids)
        if forced_tokens is not None and i < len(forced_tokens) and forced_tokens[i] != -1:
            tok = int(forced_tokens[i])
        else:
            tok = int(torch.argmax(last).item())
        output_ids.append(tok)
        if tok in eos or len(output_ids) >= max_new_tokens:
            break
        new_ids = [tok]

    mask = [pruned[li, :, :n].clone() for li in range(L)]
    per_layer = [float(mk.sum().item()) / (H_kv * n) for mk in mask]
    result = {
        "output_ids": output_ids,
        "logits": step_logits,
        "pruned_mask": mask,
        "pruned_fraction_per_layer": per_layer,
        "pruned_fraction": sum(per_layer) / L,
        "scores": [scores[li, :n].clone() for li in range(L)],
        "num_kv_tokens": n,
    }
    if ratio is not None:
        P = len(prompt_ids)
        prompt_per_layer = [float(mk.sum().item()) / (H_kv * P) for mk in mask]
        result["prompt_pruned_fraction_per_layer"] = prompt_per_layer
        result["prompt_pruned_fraction"] = sum(prompt_per_layer) / L
    return result


def assert_output_equals(output, ref: dict, context=None, tol: float = 1e-3) -> None:
    """A vLLM completion (`CompletionOutput` with `logprobs=1`) against a `dms_generate` result:
    the same tokens, each one's log-probability within `tol`."""
    assert list(output.token_ids) == ref["output_ids"], context
    for tok, lp, logits in zip(output.token_ids, output.logprobs, ref["logits"]):
        want = float(torch.log_softmax(logits.double(), dim=-1)[tok])
        assert abs(lp[tok].logprob - want) < tol, context
