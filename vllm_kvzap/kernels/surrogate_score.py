"""Surrogate scoring + threshold decision: the math of KVzap, in Triton and in torch.

Data flow: checkpoint on disk -> ``scorers.Surrogate`` (stacked per-layer weights) -> **this module**
(scores ``[T, H_kv]`` and keep flags) -> keep flags consumed by the attention backend.

For one layer, with ``x`` the input of ``self_attn`` (``[T, D]``, any float dtype, read as float32):

    linear: scores = x @ w1.T + b1                                  w1 [H, D]
    mlp:    scores = gelu_erf(x @ w1.T + b1) @ w2.T + b2            w1 [N, D], w2 [H, N]
    keep   = scores >= threshold     (pruned iff strictly below; threshold may be -inf)

``score_and_decide_torch`` is the reference; ``score_and_decide_triton`` fuses both matmuls, the
GELU and the compare in one kernel; ``score_and_decide`` picks Triton for CUDA tensors.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch twin works without Triton
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "score_and_decide",
    "score_and_decide_torch",
    "score_and_decide_triton",
]


def _check_args(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
) -> tuple[int, int, int, int]:
    """Validate shapes and devices; return (T, D, N, H) with N = hidden (MLP) or H (linear)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    T, D = x.shape
    if w1.dim() != 2 or w1.shape[1] != D:
        raise ValueError(f"w1 must be [N, D={D}], got shape {tuple(w1.shape)}")
    N = w1.shape[0]
    if tuple(b1.shape) != (N,):
        raise ValueError(f"b1 must be [{N}], got shape {tuple(b1.shape)}")
    if (w2 is None) != (b2 is None):
        raise ValueError("w2 and b2 must both be given (MLP) or both be None (linear)")
    H = N
    if w2 is not None:
        assert b2 is not None
        if w2.dim() != 2 or w2.shape[1] != N:
            raise ValueError(f"w2 must be [H, N={N}], got shape {tuple(w2.shape)}")
        H = w2.shape[0]
        if tuple(b2.shape) != (H,):
            raise ValueError(f"b2 must be [{H}], got shape {tuple(b2.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return T, D, N, H


def score_and_decide_torch(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin: returns (scores [T, H] float32, keep [T, H] bool)."""
    _check_args(x, w1, b1, w2, b2)
    scores = F.linear(x.float(), w1.float(), b1.float())
    if w2 is not None:
        assert b2 is not None
        scores = F.linear(F.gelu(scores, approximate="none"), w2.float(), b2.float())
    return scores, scores >= threshold


if HAS_TRITON:

    @triton.jit
    def _surrogate_score_kernel(
        x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, scores_ptr, keep_ptr,
        T, D, N, H,
        stride_xt, stride_xd,
        stride_w1n, stride_w1d,
        stride_w2h, stride_w2n,
        stride_ot, stride_oh,
        threshold,
        IS_MLP: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """One program scores BLOCK_T tokens for all H heads of one layer.

        Layout (row-major, strides passed explicitly):
          x      [T, D]   any float dtype, converted to fp32 on load
          w1     [N, D]   N = hidden (MLP) or H (linear);  b1 [N]
          w2     [H, N]   MLP only;                         b2 [H]
          scores [T, H]   fp32;  keep [T, H] uint8 (1 = keep), same strides as scores
        Grid: (cdiv(T, BLOCK_T),). Loops: hidden tiles of BLOCK_N (MLP) x D tiles of BLOCK_D.
        All accumulation is fp32; out-of-range rows/columns are masked to 0 and never stored
        (GELU(0) = 0 and w2's padded rows are 0, so padding adds nothing).
        Only core builtins are used (tl.full, not the @jit helper tl.zeros), so the interpreter
        can run this kernel even if triton was imported without TRITON_INTERPRET=1.
        """
        pid = tl.program_id(0)
        offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        offs_h = tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_d0 = tl.arange(0, BLOCK_D)

        acc = tl.full((BLOCK_T, BLOCK_H), 0.0, tl.float32)
        if IS_MLP:
            offs_n0 = tl.arange(0, BLOCK_N)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + offs_n0
                mask_n = offs_n < N
                # first layer: h = x @ w1[n-tile].T + b1[n-tile]          [BLOCK_T, BLOCK_N]
                h = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + offs_d0
                    mask_d = offs_d < D
                    xt = tl.load(
                        x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                        mask=mask_t[:, None] & mask_d[None, :], other=0.0,
                    ).to(tl.float32)
                    w1t = tl.load(  # transposed tile w1[n, d] -> [BLOCK_D, BLOCK_N]
                        w1_ptr + offs_n[None, :] * stride_w1n + offs_d[:, None] * stride_w1d,
                        mask=mask_d[:, None] & mask_n[None, :], other=0.0,
                    ).to(tl.float32)
                    h = tl.dot(xt, w1t, h, input_precision=INPUT_PRECISION)
                h += tl.load(b1_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                # exact GELU: 0.5 * h * (1 + erf(h / sqrt(2)))
                h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
                # second layer, accumulated over hidden tiles: acc += h @ w2[:, n-tile].T
                w2t = tl.load(  # transposed tile w2[h, n] -> [BLOCK_N, BLOCK_H]
                    w2_ptr + offs_n[:, None] * stride_w2n + offs_h[None, :] * stride_w2h,
                    mask=mask_n[:, None] & mask_h[None, :], other=0.0,
                ).to(tl.float32)
                acc = tl.dot(h, w2t, acc, input_precision=INPUT_PRECISION)
            acc += tl.load(b2_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        else:
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                mask_d = offs_d < D
                xt = tl.load(
                    x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0,
                ).to(tl.float32)
                w1t = tl.load(  # transposed tile w1[h, d] -> [BLOCK_D, BLOCK_H]
                    w1_ptr + offs_h[None, :] * stride_w1n + offs_d[:, None] * stride_w1d,
                    mask=mask_d[:, None] & mask_h[None, :], other=0.0,
                ).to(tl.float32)
                acc = tl.dot(xt, w1t, acc, input_precision=INPUT_PRECISION)
            acc += tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]

        out_offs = offs_t[:, None] * stride_ot + offs_h[None, :] * stride_oh
        out_mask = mask_t[:, None] & mask_h[None, :]
        tl.store(scores_ptr + out_offs, acc, mask=out_mask)
        tl.store(keep_ptr + out_offs, (acc >= threshold).to(tl.uint8), mask=out_mask)


def _block(n: int, cap: int) -> int:
    """Power-of-two tile size in [16, cap] covering n if possible (tl.dot needs >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(n)))


@functools.cache
def _interpreted_kernel():
    """The same kernel run by Triton's interpreter (for CPU tensors).

    ``triton.jit`` decides between compiler and interpreter when the module is imported, so a test
    that sets ``TRITON_INTERPRET=1`` after something imported this module would still get the
    compiled variant; wrapping the Python function here makes the CPU path independent of
    import order.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(_surrogate_score_kernel, InterpretedFunction):
        return _surrogate_score_kernel
    return InterpretedFunction(_surrogate_score_kernel.fn)


def _interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def score_and_decide_triton(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    threshold: float,
    *,
    block_t: int | None = None,
    block_d: int | None = None,
    block_n: int | None = None,
    input_precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton scoring: returns (scores [T, H] float32, keep [T, H] bool).

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (slow; for tests).
    ``block_*`` override the tile sizes (powers of two >= 16). ``input_precision`` is passed
    to ``tl.dot``: "ieee" (default) matches the fp32 torch twin; "tf32" is faster on
    Ampere+ at ~1e-3 relative error.
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use score_and_decide_torch")
    T, D, N, H = _check_args(x, w1, b1, w2, b2)
    if x.is_cuda:
        kernel = _surrogate_score_kernel
    elif _interpret_enabled():
        kernel = _interpreted_kernel()
    else:
        raise RuntimeError(
            f"score_and_decide_triton needs CUDA tensors (got {x.device}); "
            "set TRITON_INTERPRET=1 to run the kernel on CPU tensors (slow, for tests)"
        )
    scores = torch.empty((T, H), dtype=torch.float32, device=x.device)
    keep = torch.empty((T, H), dtype=torch.uint8, device=x.device)
    if T == 0:
        return scores, keep.view(torch.bool)

    w1, b1 = w1.contiguous(), b1.contiguous()
    is_mlp = w2 is not None
    # linear: pass w1/b1 as dummies for the unused MLP pointers (never read: IS_MLP is False)
    w2_, b2_ = (w2.contiguous(), b2.contiguous()) if is_mlp else (w1, b1)  # type: ignore[union-attr]
    BLOCK_T = block_t or _block(T, 64)
    BLOCK_D = block_d or _block(D, 64)
    BLOCK_N = block_n or _block(N, 64)
    for name, b in (("block_t", BLOCK_T), ("block_d", BLOCK_D), ("block_n", BLOCK_N)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    BLOCK_H = _block(H, 1 << 30)
    grid = (triton.cdiv(T, BLOCK_T),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[grid](
            x, w1, b1, w2_, b2_, scores, keep,
            T, D, N, H,
            x.stride(0), x.stride(1),
            w1.stride(0), w1.stride(1),
            w2_.stride(0), w2_.stride(1),
            scores.stride(0), scores.stride(1),
            float(threshold),
            IS_MLP=is_mlp,
            BLOCK_T=BLOCK_T,
            BLOCK_D=BLOCK_D,
            BLOCK_N=BLOCK_N,
            BLOCK_H=BLOCK_H,
            INPUT_PRECISION=input_precision,
        )
    return scores, keep.view(torch.bool)


def score_and_decide(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the Triton kernel for CUDA tensors, the torch twin otherwise."""
    if x.is_cuda and HAS_TRITON:
        return score_and_decide_triton(x, w1, b1, w2, b2, threshold)
    return score_and_decide_torch(x, w1, b1, w2, b2, threshold)


@torch.library.custom_op("vllm_kvzap::surrogate_scores", mutates_args=())
def surrogate_scores(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """Scores [T, H] float32 by the Triton kernel, as an opaque op: torch.compile keeps the launch
    out of its trace, and a captured CUDA graph replays it (no host work but the launch)."""
    return score_and_decide_triton(x, w1, b1, w2, b2, float("-inf"))[0]


@surrogate_scores.register_fake
def _surrogate_scores_fake(x, w1, b1, w2, b2):
    num_heads = w1.shape[0] if w2 is None else w2.shape[0]
    return x.new_empty((x.shape[0], num_heads), dtype=torch.float32)
