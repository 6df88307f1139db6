"""KVzip+ training targets for KVzap surrogates, written to disk in resumable shards.

Data flow: prompts (``surrogate_data``) -> **(inputs, targets) per layer in shards (this module)**
-> per-layer fit and R^2 (``surrogate_fit``) -> checkpoint (``train_surrogate``).

For a context ``c`` the model reads, through its chat template (kvpress ``kvzap/data.py``)::

    user:      c + "\\n\\nRepeat the previous context exactly."
    assistant: c

and for every layer, KV head ``k`` and context token ``i`` (first copy of ``c``) the target is::

    y_ik = log max_{j in repeated copy, h in group(k)}  a^h_ji * ||W_O^h v_i|| / ||h_j||

``a^h`` is query head ``h``'s attention (eager softmax), ``v_i`` the cached value of token ``i``
for KV head ``k``, ``W_O^h`` the columns of ``o_proj`` that read head ``h``. ``h_j`` is, by
default, **the self-attention input of query token j** (``input_layernorm`` output, the tensor a
forward hook on ``self_attn`` sees as ``hidden_states``). ``query_norm="residual"`` uses the
decoder layer's input (the residual stream before ``input_layernorm``) instead. The surrogate
input stored next to the target is the self-attention input of token ``i``.

**Which definition this is.** These are the targets of kvpress's KVzap trainer (``kvzap/data.py``,
``KVzapDataCollector``: max over the repeated copy's query tokens only, full softmax over the
sequence, then ``log``), the data the published ``nvidia/KVzap-*`` checkpoints were trained on;
checked equal to it to ~1e-5 in log. They are **not** the scores of kvpress's
``KVzipPress(kvzip_plus_normalization=True)``: that press takes the max over every row of its
repeat pass (instruction and chat-template tokens included), keeps only ``n_sink`` prefix keys
besides the context in its softmax, and applies no ``log``.

Store layout (``TargetStore``): ``meta.json`` (settings + prompt fingerprint) and one
``{split}-{k:05d}.safetensors`` per group of prompts, holding ``x.{l} [n, D]`` (model dtype),
``y.{l} [n, H_kv]`` (float32), ``prompt [n]`` and ``pos [n]`` (token index inside the context).
Shards are written atomically; a rerun with the same settings skips the finished ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from training.surrogate_data import Prompt

REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."
QUERY_NORMS = ("attn_input", "residual")
META = "meta.json"
SPLITS = ("train", "test")


# --------------------------------------------------------------------------------------------------
# One prompt
# --------------------------------------------------------------------------------------------------


def repeat_prompt(
    tokenizer, text: str, repeat_format: str | None = None
) -> tuple[torch.Tensor, slice, slice]:
    """Token ids ``[1, T]`` of the repeat prompt, and the token slices of the context and its copy.

    A token belongs to a copy when its first character does (kvpress's offset rule). Models
    without a chat template get ``c + instruction + "\\n" + c`` (kvpress ``KVzipPress`` fallback).
    ``repeat_format`` (a string with ``{context}`` twice, e.g. ``"<s> {context} <repeat>
    {context}"``) replaces both, for models trained with their own repeat marker.
    """
    text = text.strip()
    if repeat_format is not None:
        check_repeat_format(repeat_format)
        full = repeat_format.replace("{context}", text)
    elif getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": text + REPEAT_INSTRUCTION},
            {"role": "assistant", "content": text},
        ]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        full = text + REPEAT_INSTRUCTION + "\n" + text
    if repeat_format is not None:  # the copies sit where the two placeholders were
        a = repeat_format.find("{context}")
        b = repeat_format.find("{context}", a + 1) - len("{context}") + len(text)
    else:
        a = full.find(text)
        b = full.find(text, a + len(text))
    if a < 0 or b < 0:
        raise ValueError("the chat template altered the context; cannot locate both copies")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = torch.tensor([s for s, _ in enc["offset_mapping"]] + [len(full)])

    def first_at(char: int) -> int:
        return int(torch.nonzero(starts >= char)[0, 0])

    ctx = slice(first_at(a), first_at(a + len(text)))
    rep = slice(first_at(b), first_at(b + len(text)))
    return torch.tensor([enc["input_ids"]]), ctx, rep


def check_repeat_format(repeat_format: str) -> None:
    if repeat_format.count("{context}") != 2:
        raise ValueError(
            f"a repeat format needs '{{context}}' exactly twice, got {repeat_format!r}"
        )


def load_model(name_or_path: str, dtype: str = "auto", device: str = "cpu"):
    """A causal LM with eager attention (its ``self_attn`` returns the attention weights)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=torch_dtype, attn_implementation="eager"
    )
    return model.to(device).eval()


def _kvzip_plus(module, attn, values, h_query, ctx: slice, rep: slice) -> torch.Tensor:
    """log KVzip+ scores ``[C, H_kv]`` of one layer (batch 1)."""
    n_q, n_kv = attn.shape[1], values.shape[1]
    a = attn[0, :, rep, ctx].float()  # [H_q, R, C]
    a = a / h_query[0, rep].float().norm(dim=-1)[None, :, None]  # / ||h_j||
    v = values[0, :, ctx].float().repeat_interleave(n_q // n_kv, dim=0)  # [H_q, C, d]
    w_o = module.o_proj.weight.float().T.reshape(n_q, v.shape[-1], -1)  # [H_q, d, D]
    wov = torch.linalg.vector_norm(torch.bmm(v, w_o), dim=-1)  # ||W_O^h v_i||, [H_q, C]
    s = a.amax(dim=1) * wov  # max over j (wov >= 0 does not depend on j)
    s = s.view(n_kv, n_q // n_kv, -1).amax(dim=1)  # max over the group
    return s.clamp_min(torch.finfo(torch.float32).tiny).log().T


@torch.no_grad()
def kvzip_plus_targets(
    model, input_ids: torch.Tensor, ctx: slice, rep: slice, query_norm: str = "attn_input"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the repeat prompt once; per layer, the context tokens' self-attention inputs
    ``[C, D]`` (model dtype) and their log KVzip+ targets ``[C, H_kv]`` (float32)."""
    if query_norm not in QUERY_NORMS:
        raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
    layers = model.model.layers
    xs: list = [None] * len(layers)
    ys: list = [None] * len(layers)
    residual: dict[int, torch.Tensor] = {}

    def pre_hook(idx):
        def hook(module, args, kwargs):
            residual[idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return hook

    def attn_hook(idx):
        def hook(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if not isinstance(output, tuple) or output[1] is None:
                raise RuntimeError(
                    "self_attn returned no attention weights: load the model with "
                    "attn_implementation='eager' (load_model does)"
                )
            values = kwargs["past_key_values"].layers[idx].values
            h_query = x if query_norm == "attn_input" else residual.pop(idx)
            ys[idx] = _kvzip_plus(module, output[1], values, h_query, ctx, rep).cpu()
            xs[idx] = x[0, ctx].detach().cpu()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        if query_norm == "residual":
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(attn_hook(i), with_kwargs=True))
    try:
        model.model(input_ids=input_ids.to(model.device), use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return xs, ys


# --------------------------------------------------------------------------------------------------
# Shards on disk
# --------------------------------------------------------------------------------------------------


class TargetStore:
    """A directory of target shards (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], meta: dict | None = None) -> None:
        self.root = Path(root)
        meta = None if meta is None else json.loads(json.dumps(meta))  # as it reads back
        path = self.root / META
        if path.is_file():
            old = json.loads(path.read_text())
            if meta is not None and old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise SystemExit(
                    f"{self.root} holds targets made with other settings ("
                    + ", ".join(f"{k}: {old.get(k)!r} vs now {meta.get(k)!r}" for k in diff)
                    + "); pass another --targets directory or delete this one"
                )
            self.meta = old
        elif meta is None:
            raise FileNotFoundError(f"{path} not found: no targets there")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(meta, indent=2) + "\n")
            self.meta = meta

    @property
    def num_layers(self) -> int:
        return self.meta["num_layers"]

    def path(self, split: str, k: int) -> Path:
        return self.root / f"{split}-{k:05d}.safetensors"

    def shards(self, split: str) -> list[Path]:
        return sorted(self.root.glob(f"{split}-*.safetensors"))

    def write(self, split, k, xs, ys, prompt_ids, positions) -> None:
        from safetensors.torch import save_file

        tensors = {"prompt": prompt_ids.long(), "pos": positions.long()}
        for l_idx, (x, y) in enumerate(zip(xs, ys, strict=True)):
            tensors[f"x.{l_idx}"] = x
            tensors[f"y.{l_idx}"] = y.float()
        tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}  # no shared storage
        final = self.path(split, k)
        tmp = final.with_suffix(".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, final)  # a crash never leaves a half shard that looks finished

    def iter_layer(self, split: str, layer: int):
        """``(x [n, D], y [n, H_kv])`` of one layer, shard by shard (reads only that layer)."""
        from safetensors import safe_open

        for path in self.shards(split):
            with safe_open(path, framework="pt") as f:
                yield f.get_tensor(f"x.{layer}"), f.get_tensor(f"y.{layer}")

    def num_rows(self, split: str) -> int:
        from safetensors import safe_open

        rows = 0
        for path in self.shards(split):
            with safe_open(path, framework="pt") as f:
                rows += f.get_slice("prompt").get_shape()[0]
        return rows

    def layer(self, split: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = list(self.iter_layer(split, layer))
        if not parts:
            raise FileNotFoundError(f"no {split} shards in {self.root}")
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def extract_targets(
    model_name: str,
    tokenizer,
    prompts: list[Prompt],
    store: TargetStore,
    tokens_per_prompt: int,
    shard_size: int,
    seed: int = 0,
    query_norm: str = "attn_input",
    dtype: str = "auto",
    device: str = "cpu",
    model=None,
    repeat_format: str | None = None,
) -> None:
    """Fill ``store`` with the shards it lacks; the model is loaded only if one is missing.

    Prompt ``p`` (index in ``prompts``) keeps ``tokens_per_prompt`` random context tokens drawn
    from a generator seeded by ``(seed, p)``, so resumed and fresh runs store the same rows.
    """
    from tqdm.auto import tqdm

    todo = []
    for split in SPLITS:
        ids = [p for p, pr in enumerate(prompts) if pr.split == split]
        for k in range(0, len(ids), shard_size):
            if not store.path(split, k // shard_size).is_file():
                todo.append((split, k // shard_size, ids[k : k + shard_size]))
    total = sum(len(group) for *_, group in todo)
    if not todo:
        print(f"targets: all shards present in {store.root}, skipping extraction")
        return
    if model is None:
        print(f"loading {model_name} (eager attention, dtype {dtype}, {device})")
        model = load_model(model_name, dtype, device)
    bar = tqdm(total=total, desc="KVzip+ targets", unit="prompt")
    for split, k, group in todo:
        xs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
        ys: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
        pids, poss = [], []
        for p in group:
            input_ids, ctx, rep = repeat_prompt(tokenizer, prompts[p].text, repeat_format)
            x, y = kvzip_plus_targets(model, input_ids, ctx, rep, query_norm)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + p)
            keep = torch.randperm(ctx.stop - ctx.start, generator=gen)[:tokens_per_prompt].sort()[0]
            for l_idx in range(len(xs)):
                xs[l_idx].append(x[l_idx][keep])
                ys[l_idx].append(y[l_idx][keep])
            pids.append(torch.full_like(keep, p))
            poss.append(keep)
            bar.update(1)
        store.write(
            split,
            k,
            [torch.cat(x) for x in xs],
            [torch.cat(y) for y in ys],
            torch.cat(pids),
            torch.cat(poss),
        )
    bar.close()
