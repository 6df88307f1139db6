"""Target-ratio decisions: kvpress 0.5.x ``AdaKVPress(press, alpha_safeguard=A)`` with ratio ``R``.

Pure torch, no vLLM import. The rule is applied once per (request, layer), over the request's whole
prompt of ``T`` tokens and ``H`` KV heads, after the prompt has been attended densely:

* ``n_kept = max(1, int(T * (1 - R)))``, 0 if ``R >= 1`` (kvpress: ``int(T * (1 - R))``);
* ``n_safe = max(1, int(n_kept * A))`` if ``A > 0`` and ``n_kept > 0``, else 0
  (kvpress: ``int(n_kept * A)``);
* in each KV head the ``n_safe`` highest-scoring pairs are protected, whatever the others score;
* then the ``H * (T - n_kept)`` lowest-scoring pairs of the layer, over all heads together, are
  pruned (never a protected one). So each layer keeps exactly ``H * n_kept`` pairs (``n_safe <=
  n_kept`` always) and every head at least ``n_safe`` of them.

The ``max(1, ...)`` clamps are the project's (issue 13); kvpress's own code has none, and
``min_one=False`` gives its counts exactly. The two differ only when ``T * (1 - R) < 1``, or when
``0 < n_kept * A < 1`` (short prompts: e.g. ``n_kept < 5`` at ``A = 0.2``).

Ties. kvpress selects with ``torch.topk``, whose order among equal values is unspecified (on CPU
it already changes with the tensor size). Here it is fixed: every ``topk`` of kvpress's code is read
as a *stable* selection (among equal values the lower index comes first), on the tensors kvpress
builds:

* safeguard, ``topk(scores[h, :], n_safe)``: among equal scores in a head, the earlier position is
  protected first;
* pruning, ``topk(-scores.reshape(-1), n_pruned)`` over the head-major ``[H, T]`` layout: among
  equal scores the pair with the lower ``h * T + t`` is pruned first, i.e. the lower KV head, then
  the earlier position.

kvpress marks protected pairs by overwriting their score with ``finfo(dtype).max``; here they are
taken out of the pruning candidates instead. Both agree whenever scores are below ``finfo.max``
(all finite surrogate and baseline scores); with ``+inf`` scores kvpress could prune a protected
pair, this never does. NaN scores are not supported.
"""

from __future__ import annotations

import torch

__all__ = ["adakv_counts", "adakv_keep", "adakv_num_kept"]


def adakv_num_kept(num_tokens: int, ratio: float, *, min_one: bool = True) -> int:
    """``n_kept`` of a prompt of ``num_tokens`` tokens: tokens' worth of pairs each layer keeps per
    KV head on average (a layer keeps ``H_kv * n_kept`` pairs). Plain Python, for the scheduler."""
    if num_tokens <= 0 or ratio >= 1:
        return 0
    n_kept = int(num_tokens * (1 - ratio))
    if min_one:
        n_kept = max(1, n_kept)
    return min(n_kept, num_tokens)


def adakv_counts(
    lengths: torch.Tensor,
    ratio: float | torch.Tensor,
    alpha: float | torch.Tensor,
    *,
    min_one: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_kept, n_safe)``, int64 ``[B]`` each, for prompt lengths ``[B]``.

    Computed in float64, so ``int(T * (1 - R))`` is bit for bit what Python computes for a Python
    float ``R`` (pass ratios as Python floats or a float64 tensor: a float32 tensor holds a
    different number than the ratio the user wrote, e.g. 0.3).
    """
    lengths = torch.as_tensor(lengths).to(torch.int64).flatten()
    B = lengths.numel()
    r = torch.as_tensor(ratio, dtype=torch.float64).to(lengths.device).flatten().expand(B)
    a = torch.as_tensor(alpha, dtype=torch.float64).to(lengths.device).flatten().expand(B)
    T = lengths.to(torch.float64)
    n_kept = torch.floor(T * (1 - r)).clamp(min=0).to(torch.int64)
    if min_one:
        n_kept = n_kept.clamp(min=1)
    n_kept = torch.where(r >= 1, torch.zeros_like(n_kept), n_kept)
    n_kept = torch.minimum(n_kept, lengths.clamp(min=0))
    n_safe = torch.floor(n_kept.to(torch.float64) * a).clamp(min=0).to(torch.int64)
    if min_one:
        n_safe = n_safe.clamp(min=1)
    n_safe = torch.where((a > 0) & (n_kept > 0), n_safe, torch.zeros_like(n_safe))
    return n_kept, torch.minimum(n_safe, n_kept)


def _rank_among(order: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """1-based rank of each element among the `member` ones, in the order given by the sort
    permutation `order` (last dim); 0 for non-members."""
    member_sorted = member.gather(-1, order)
    rank_sorted = torch.cumsum(member_sorted.to(torch.int64), dim=-1) * member_sorted
    return torch.zeros_like(rank_sorted).scatter_(-1, order, rank_sorted)


def adakv_keep(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    ratio: float | torch.Tensor,
    alpha: float | torch.Tensor = 0.2,
    *,
    min_one: bool = True,
) -> torch.Tensor:
    """Keep flags of the AdaKV rule (module docstring), for a batch of prompts.

    scores: ``[B, L, T_max, H]`` (B requests, L layers, prompts padded to T_max, H KV heads); higher
    means more important. Values past a request's length are ignored.
    lengths: int ``[B]``, prompt length ``T_b <= T_max`` of each request.
    ratio: compression ratio, a float or one per request (``[B]``). alpha: the safeguard share, a
    float (or ``[B]``), in ``[0, 1]``.
    Returns bool ``[B, L, T_max, H]``: True = kept; False = pruned, and False in the padding.
    No Python loop over requests, layers or heads: two stable sorts per call.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be [B, L, T_max, H], got shape {tuple(scores.shape)}")
    B, L, T_max, H = scores.shape
    lengths = torch.as_tensor(lengths, device=scores.device).to(torch.int64).flatten()
    if lengths.numel() != B:
        raise ValueError(f"lengths has {lengths.numel()} entries for {B} requests")
    if B and (int(lengths.max()) > T_max or int(lengths.min()) < 0):
        raise ValueError(f"lengths must lie in [0, {T_max}], got {lengths.tolist()}")
    n_kept, n_safe = adakv_counts(lengths, ratio, alpha, min_one=min_one)
    n_kept, n_safe = n_kept.to(scores.device), n_safe.to(scores.device)
    n_pruned = H * (lengths - n_kept)  # [B]

    # Head-major layout [B, L, H, T_max], as kvpress's [bsz, H, k_len].
    s = scores.permute(0, 1, 3, 2)
    valid = (torch.arange(T_max, device=scores.device)[None, :] < lengths[:, None])  # [B, T_max]
    valid = valid[:, None, None, :].expand(B, L, H, T_max)
    s = s.masked_fill(~valid, 0.0)  # padding values never change the order among valid pairs

    # Safeguard: per head, the n_safe best (stable: among equal scores, the earlier position).
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    head_rank = _rank_among(order, valid)
    safe = valid & (head_rank <= n_safe[:, None, None, None])

    # Pruning: the n_pruned lowest unprotected pairs of the layer over all heads, stable over the
    # flattened head-major index h * T + t (padding interleaved does not change the order of
    # valid pairs: it is removed from the candidates and from the ranks).
    flat = s.reshape(B, L, H * T_max)
    candidate = (valid & ~safe).reshape(B, L, H * T_max)
    order = torch.sort(flat, dim=-1, stable=True).indices
    rank = _rank_among(order, candidate)
    pruned = candidate & (rank <= n_pruned[:, None, None])
    keep = valid & ~pruned.reshape(B, L, H, T_max)
    return keep.permute(0, 1, 3, 2).contiguous()
