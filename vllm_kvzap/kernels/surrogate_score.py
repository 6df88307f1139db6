"""Surrogate scoring: the math of KVzap, in Triton and in torch.

Data flow: checkpoint on disk -> ``scorers.Surrogate`` (stacked per-layer weights) -> **this module**
(scores ``[T, H_kv]`` float32) -> the attention backend, which stores each score with its pair
(judged by ``rule.keep`` once the pair has left the window, or ranked in ratio mode).

For one layer, with ``x`` the input of ``self_attn`` (``[T, D]``, the model's dtype):

    linear: scores = x @ w1.T + b1                                  w1 [H, D]
    mlp:    scores = gelu_erf(x @ w1.T + b1) @ w2.T + b2            w1 [N, D], w2 [H, N]

Three implementations of the scores, all float32 ``[T, H]``:
- ``scores_torch``: the reference, everything in float32 (the CPU path; torch.compile fuses it
  into the model's graph);
- ``scores_triton``: one fused Triton kernel, ``x @ w1.T`` on tensor cores in x's dtype;
- ``scores_cublas``: cuBLAS GEMMs in x's dtype through torch, for long prefill chunks.
On CUDA, ``surrogate_scores`` (a custom op, opaque to torch.compile) picks between the last two by
the step's token count, at run time: see ``use_triton``. Scores only: which pairs are kept is
``rule.keep``'s decision, made by the attention backend (and by the checks that need it).
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
    "TRITON_MAX_TOKENS",
    "scores_cublas",
    "scores_torch",
    "scores_triton",
    "surrogate_scores",
    "use_triton",
]

# The MLP surrogate runs on Triton up to this many tokens per step, on cuBLAS above.
TRITON_MAX_TOKENS = 1024


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


def scores_torch(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """Plain-torch twin: scores [T, H] float32, all math in float32."""
    _check_args(x, w1, b1, w2, b2)
    scores = F.linear(x.float(), w1.float(), b1.float())
    if w2 is not None:
        assert b2 is not None
        scores = F.linear(F.gelu(scores, approximate="none"), w2.float(), b2.float())
    return scores


def scores_cublas(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """Scores [T, H] float32 by torch ops in x's dtype (cuBLAS on CUDA): the GPU path for long
    prefill chunks, where the first GEMM is compute-bound.

    ``x @ w1.T + b1`` runs in x's dtype (its output rounded to it); GELU and the second
    projection run in float32. w1 and b1 are cast to x's dtype if they are not in it (the
    ``Surrogate`` keeps w1 cast; b1 is small).
    """
    _check_args(x, w1, b1, w2, b2)
    h = F.linear(x, w1.to(x.dtype), b1.to(x.dtype)).float()
    if w2 is None:
        return h
    return F.linear(F.gelu(h, approximate="none"), w2.float(), b2.float())  # type: ignore[union-attr]


if HAS_TRITON:

    @triton.jit
    def _surrogate_score_kernel(
        x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, part_ptr,
        T, D, N, H, D_PER_PROG,
        stride_xt, stride_xd,
        stride_w1n, stride_w1d,
        stride_w2h, stride_w2n,
        IS_MLP: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
    ):
        """One program: BLOCK_T tokens x one slice of the surrogate -> partial scores.

        Grid (cdiv(T, BLOCK_T), S). Program (t, s) writes ``part[s, t-tile, :H]`` (fp32):
          MLP:    s = hidden tile [s*BLOCK_N, +BLOCK_N): gelu(x @ w1[tile].T + b1[tile]) @
                  w2[:, tile].T, over all of D;
          linear: s = D slice [s*D_PER_PROG, +D_PER_PROG): x[:, slice] @ w1[:, slice].T, all H
                  heads in one BLOCK_N = BLOCK_H tile;
        plus the output bias (b2, or b1 for linear) in the programs with s = 0. The scores are
        ``part.sum(0)``. Layout: x [T, D] and w1 [N, D] in the same dtype (strides explicit), b1
        [N], w2 [H, N], b2 [H] any float dtype (read as fp32), part [S, T, H] contiguous.
        ``x @ w1.T`` is a ``tl.dot`` on x's dtype with fp32 accumulation (INPUT_PRECISION applies
        to fp32 inputs); bias, exact erf GELU and the second projection are fp32. Masked rows and
        columns load as 0 and are never stored; padded hidden units have h = 0, GELU(0) = 0 and a
        0 row of w2, so they add nothing. DOT_IN_FP32 (Triton's interpreter only, whose bf16
        ``tl.dot`` multiplies the raw bits) upcasts both operands: exact for 16-bit inputs.
        Only core builtins are used (tl.full, not the @jit helper tl.zeros), so the interpreter
        can run this kernel even if triton was imported without TRITON_INTERPRET=1.
        """
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        if IS_MLP:
            offs_n = pid_s * BLOCK_N + tl.arange(0, BLOCK_N)
            d_start = 0
        else:
            offs_n = tl.arange(0, BLOCK_N)
            d_start = pid_s * D_PER_PROG
        mask_n = offs_n < N

        acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
        for d0 in range(d_start, d_start + D_PER_PROG, BLOCK_D):  # D_PER_PROG: BLOCK_D multiple
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            xt = tl.load(
                x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                mask=mask_t[:, None] & mask_d[None, :], other=0.0,
            )
            w1t = tl.load(  # transposed tile w1[n, d] -> [BLOCK_D, BLOCK_N]
                w1_ptr + offs_n[None, :] * stride_w1n + offs_d[:, None] * stride_w1d,
                mask=mask_d[:, None] & mask_n[None, :], other=0.0,
            )
            if DOT_IN_FP32:
                xt, w1t = xt.to(tl.float32), w1t.to(tl.float32)
            acc = tl.dot(xt, w1t, acc, input_precision=INPUT_PRECISION)

        offs_h = tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        if IS_MLP:
            acc += tl.load(b1_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            # exact GELU: 0.5 * h * (1 + erf(h / sqrt(2)))
            g = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
            w2t = tl.load(  # transposed tile w2[h, n] -> [BLOCK_N, BLOCK_H]
                w2_ptr + offs_n[:, None] * stride_w2n + offs_h[None, :] * stride_w2h,
                mask=mask_n[:, None] & mask_h[None, :], other=0.0,
            ).to(tl.float32)
            out = tl.dot(g, w2t, input_precision="ieee")
            bias_ptr = b2_ptr
        else:
            out = acc  # BLOCK_N == BLOCK_H
            bias_ptr = b1_ptr
        # the output bias, once: by the programs of the first slice (the others load zeros)
        bias_mask = offs_h < tl.where(pid_s == 0, H, 0)
        out += tl.load(bias_ptr + offs_h, mask=bias_mask, other=0.0).to(tl.float32)[None, :]
        part_offs = (pid_s * T + offs_t[:, None]) * H + offs_h[None, :]
        tl.store(part_ptr + part_offs, out, mask=mask_t[:, None] & mask_h[None, :])


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@functools.cache
def _num_sms(device: torch.device) -> int | None:
    """The GPU's SM count, for the tile choice; None off CUDA (Triton's interpreter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_config(
    T: int, D: int, N: int, H: int, is_mlp: bool, elem_size: int, num_sms: int | None,
    block_t: int | None, block_d: int | None, block_n: int | None,
) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_N, BLOCK_D, S, D_PER_PROG) for a launch on grid (cdiv(T, BLOCK_T), S).

    On a GPU a decode step is latency-bound: each program streams (BLOCK_T + BLOCK_N) x D values
    of x and w1 (fewer for a linear D slice), and the busiest SM streams cdiv(programs, num_sms)
    times that. MLP: the (BLOCK_T, BLOCK_N) in {16, 32, 64}^2 that streams the fewest values on
    the busiest SM (ties: smaller tiles), e.g. on 132 SMs 16x16 up to T = 64 (32 tiles of 512
    hidden units, up to 128 programs), 32x32 at T = 256, 64x64 from T ~ 1024. Linear (N = H, 8
    in NVIDIA's checkpoints): all heads in one tile, and D split over S programs until the grid
    covers the SMs. BLOCK_D: about 32 KiB of operands per pipeline stage, in [32, 512].
    Interpreter (num_sms None): programs run one by one and numpy does the math, so the fewest,
    largest tiles (up to 256 tokens x 512 hidden units x 512 features).
    """
    cdiv = triton.cdiv
    if num_sms is None:
        bt, bn = min(256, _pow2_at_least_16(T)), min(512, _pow2_at_least_16(N))
        bd = min(512, _pow2_at_least_16(D))
    elif is_mlp:
        candidates = [(bt, bn) for bt in (16, 32, 64) for bn in (16, 32, 64)]
        bt, bn = min(
            candidates,
            key=lambda c: (cdiv(cdiv(T, c[0]) * cdiv(N, c[1]), num_sms) * (c[0] + c[1]), c[0] + c[1]),
        )
    else:
        bt = min(64, _pow2_at_least_16(T))
    bt = block_t or bt
    bn = (block_n or bn) if is_mlp else _pow2_at_least_16(H)  # linear: all heads in one tile
    for name, b in (("block_t", bt), ("block_d", block_d), ("block_n", bn)):
        if b is not None and (b < 16 or b & (b - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if num_sms is not None:
        budget = 32768 // ((bt + bn) * elem_size)  # values per (token, hidden unit) row pair
        bd = max(32, min(512, triton.next_power_of_2(D), 1 << (budget.bit_length() - 1)))
    bd = block_d or bd
    splits = 1 if is_mlp or num_sms is None else max(1, min(cdiv(D, bd), num_sms // cdiv(T, bt)))
    d_per_prog = cdiv(cdiv(D, splits), bd) * bd
    s = cdiv(N, bn) if is_mlp else cdiv(D, d_per_prog)
    return bt, bn, bd, s, d_per_prog


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


def scores_triton(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    *,
    block_t: int | None = None,
    block_d: int | None = None,
    block_n: int | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """Fused Triton scoring: scores [T, H] float32.

    One kernel (``_surrogate_score_kernel``) tiled over tokens and hidden units (MLP) or over
    tokens and D (linear), so a decode step spreads over the SMs, then a float32 sum of the
    partial scores of the S slices when S > 1 (a second small kernel; deterministic, unlike
    atomics, so a step scores the same tokens identically every time). ``x @ w1.T`` runs in x's
    dtype (bf16/fp16 on tensor cores; fp32 with ``input_precision``: "ieee" matches the float32
    twin, "tf32" is faster at ~1e-3 relative error) with float32 accumulation. w1 is cast to x's
    dtype when it is not in it, per call: the ``Surrogate`` keeps a cast copy so the GPU path never
    casts.

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (slow; for tests).
    ``block_*`` override the tile sizes (powers of two >= 16; ``block_n`` is the MLP's hidden
    tile, the linear kind takes all heads in one tile).
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use scores_torch")
    T, D, N, H = _check_args(x, w1, b1, w2, b2)
    if x.is_cuda:
        kernel = _surrogate_score_kernel
    elif _interpret_enabled():
        kernel = _interpreted_kernel()
    else:
        raise RuntimeError(
            f"scores_triton needs CUDA tensors (got {x.device}); "
            "set TRITON_INTERPRET=1 to run the kernel on CPU tensors (slow, for tests)"
        )
    if T == 0:
        return torch.empty((0, H), dtype=torch.float32, device=x.device)
    w1 = w1.to(x.dtype)  # no-op for the Surrogate's weights, kept in the model's dtype
    is_mlp = w2 is not None
    BLOCK_T, BLOCK_N, BLOCK_D, S, d_per_prog = _launch_config(
        T, D, N, H, is_mlp, x.element_size(), _num_sms(x.device), block_t, block_d, block_n
    )
    part = torch.empty((S, T, H), dtype=torch.float32, device=x.device)
    # linear: pass w1/b1 as dummies for the unused MLP pointers (never read: IS_MLP is False)
    w2_, b2_ = (w2, b2) if is_mlp else (w1, b1)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[(triton.cdiv(T, BLOCK_T), S)](
            x, w1, b1, w2_, b2_, part,
            T, D, N, H, d_per_prog,
            x.stride(0), x.stride(1),
            w1.stride(0), w1.stride(1),
            w2_.stride(0), w2_.stride(1),
            IS_MLP=is_mlp,
            BLOCK_T=BLOCK_T,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            BLOCK_H=_pow2_at_least_16(H),
            INPUT_PRECISION=input_precision,
            DOT_IN_FP32=not x.is_cuda and x.dtype == torch.bfloat16,
        )  # fmt: skip
    return part[0] if S == 1 else part.sum(0)


def use_triton(num_tokens: int, is_mlp: bool) -> bool:
    """Which GPU path scores a step of ``num_tokens`` tokens: the Triton kernel or cuBLAS.

    - Linear: always Triton. Reading x is all the work (8 heads); the kernel reads it once and
      keeps the scores in fp32, where cuBLAS in x's dtype would round them (bf16 spacing is
      0.03 at scores of -4).
    - MLP: Triton for ``num_tokens <= TRITON_MAX_TOKENS``. Every decode step (vLLM's default
      max_num_seqs on an H100 is 1024) is latency-bound: one kernel that spreads the 4 MiB of w1
      over the SMs beats two GEMMs plus three elementwise kernels. Above, a long prefill chunk
      is compute-bound, cuBLAS's home. The boundary is an estimate: ``benchmarks/
      gpu_kernel_check.py`` prints both paths' times around it.
    """
    return not is_mlp or num_tokens <= TRITON_MAX_TOKENS


@torch.library.custom_op("vllm_kvzap::surrogate_scores", mutates_args=())
def surrogate_scores(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """Scores [T, H] float32: the Triton kernel or cuBLAS, by ``use_triton``. An opaque op:
    torch.compile keeps the launches out of its trace, the choice is made here, on the step's
    real token count (vLLM compiles one graph for every T and drops guards, so a branch on T in
    the traced code would be fixed at trace time), and a captured CUDA graph replays it."""
    if HAS_TRITON and use_triton(x.shape[0], w2 is not None):
        return scores_triton(x, w1, b1, w2, b2)
    return scores_cublas(x, w1, b1, w2, b2)


@surrogate_scores.register_fake
def _surrogate_scores_fake(x, w1, b1, w2, b2):
    num_heads = w1.shape[0] if w2 is None else w2.shape[0]
    return x.new_empty((x.shape[0], num_heads), dtype=torch.float32)
