"""Independent reference of the target-ratio rule (kvpress 0.5.x ``AdaKVPress``), test oracle.

Written from kvpress's ``kvpress/presses/adakv_press.py`` (identical in v0.4.3 .. v0.5.4), one
(request, layer) at a time, and shares no code with ``vllm_kvzap``. kvpress's ``compress`` reads::

    n_kept = int(k_len * (1 - self.compression_ratio))  # ScorerPress definition
    n_safe = int(n_kept * self.alpha_safeguard)
    top_indices = torch.topk(scores, n_safe, dim=-1).indices
    scores.scatter_(-1, top_indices, torch.finfo(scores.dtype).max)
    n_pruned = num_key_value_heads * (k_len - n_kept)
    indices = torch.topk(-scores.reshape(bsz, -1), n_pruned, dim=1).indices.flatten()
    head_indices = indices // k_len
    seq_indices = indices % k_len

with ``scores`` of shape ``[bsz, H_kv, k_len]``. Two things are pinned down here:

* counts: issue 13 clamps them, ``n_kept = max(1, int(T * (1 - R)))`` (0 if R >= 1) and
  ``n_safe = max(1, int(n_kept * A))`` if ``A > 0 and n_kept > 0`` else 0; ``min_one=False`` gives
  kvpress's own unclamped counts;
* ties: ``torch.topk`` does not define the order of equal values; ``stable_topk`` below replaces it,
  taking among equal values the lower index first (what a stable sort gives).

``kvpress_compress_indices`` is kvpress's code verbatim (``torch.topk``), for tie-free scores.
"""

from __future__ import annotations

import torch


def counts(T: int, ratio: float, alpha: float, min_one: bool = True) -> tuple[int, int]:
    if T <= 0:
        return 0, 0
    if min_one:
        n_kept = 0 if ratio >= 1 else max(1, int(T * (1 - ratio)))
        n_safe = max(1, int(n_kept * alpha)) if alpha > 0 and n_kept > 0 else 0
    else:
        n_kept = max(0, int(T * (1 - ratio)))
        n_safe = int(n_kept * alpha)
    return n_kept, n_safe


def stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values of the last dim; among equal values the lower index first."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def layer_pruned_mask(scores: torch.Tensor, ratio: float, alpha: float, min_one: bool = True) -> torch.Tensor:
    """One (request, layer): scores ``[T, H_kv]`` -> bool ``[T, H_kv]``, True = pruned.

    kvpress's ``AdaKVPress.compress`` step by step (bsz = 1), with ``stable_topk`` for ``torch.topk``.
    """
    scores = scores.t().unsqueeze(0).clone()  # [bsz=1, H_kv, k_len], kvpress's layout
    bsz, num_key_value_heads, k_len = scores.shape
    pruned = torch.zeros(num_key_value_heads, k_len, dtype=torch.bool)
    if ratio == 0:  # `if self.compression_ratio == 0: return keys, values`
        return pruned.t()
    n_kept, n_safe = counts(k_len, ratio, alpha, min_one)
    top_indices = stable_topk(scores, n_safe)
    scores.scatter_(-1, top_indices, torch.finfo(scores.dtype).max)
    n_pruned = num_key_value_heads * (k_len - n_kept)
    indices = stable_topk(-scores.reshape(bsz, -1), n_pruned).flatten()
    for i in indices.tolist():
        head, seq = i // k_len, i % k_len
        pruned[head, seq] = True
    return pruned.t()


def reference_keep(scores, lengths, ratio, alpha, min_one: bool = True) -> torch.Tensor:
    """Same contract as ``vllm_kvzap.scorers.adakv.adakv_keep``, one request and layer at a time.

    scores ``[B, L, T_max, H]``; lengths ``[B]``; ratio a float or a sequence of B floats.
    """
    B, L, T_max, H = scores.shape
    if isinstance(ratio, (int, float)):
        ratios = [float(ratio)] * B
    else:
        ratios = [float(r) for r in (ratio.tolist() if torch.is_tensor(ratio) else ratio)]
    keep = torch.zeros(B, L, T_max, H, dtype=torch.bool)
    for b in range(B):
        T = int(lengths[b])
        for layer in range(L):
            keep[b, layer, :T] = ~layer_pruned_mask(scores[b, layer, :T], ratios[b], alpha, min_one)
    return keep


def kvpress_compress_indices(scores: torch.Tensor, compression_ratio: float, alpha_safeguard: float):
    """kvpress 0.5.x ``AdaKVPress.compress`` verbatim: scores ``[bsz, H_kv, k_len]`` ->
    ``(batch_indices, head_indices, seq_indices)`` of the masked pairs. Its tie order is torch's."""
    scores = scores.clone()
    if compression_ratio == 0:
        return None
    bsz, num_key_value_heads, k_len = scores.shape
    n_kept = int(k_len * (1 - compression_ratio))  # ScorerPress definition
    n_safe = int(n_kept * alpha_safeguard)
    top_indices = torch.topk(scores, n_safe, dim=-1).indices
    scores.scatter_(-1, top_indices, torch.finfo(scores.dtype).max)
    n_pruned = num_key_value_heads * (k_len - n_kept)
    indices = torch.topk(-scores.reshape(bsz, -1), n_pruned, dim=1).indices.flatten()
    batch_indices = torch.arange(bsz).repeat_interleave(n_pruned)
    head_indices = indices // k_len
    seq_indices = indices % k_len
    return batch_indices, head_indices, seq_indices
