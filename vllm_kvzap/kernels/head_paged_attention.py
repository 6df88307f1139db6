"""Paged attention over per-(layer, KV head) page tables, in Triton and in torch (no vLLM import).

Each (request, KV head) "stream" owns its pages, so after pruning every head of a request can hold
a different number of KV pairs. This module computes attention for one layer over such streams.

Layouts (``BS`` = page size in slots, ``G`` = H_q // H_kv query heads per KV head):

    query            [T, H_q, D]              fp32 / bf16 / fp16; query head q reads KV head q // G
    out              [T, H_q, D]              same shape (and normally dtype) as query; returned
    kv_pages         [num_pages, 2, BS, D]    keys at [:, 0], values at [:, 1]; query's dtype or fp32
    page_table       [B, H_kv, max_pages]     int32 global page ids of stream (b, h)
    len_a, len_b     [B, H_kv]                int32 lengths (in slots) of the two segments
    query_start_loc  [B + 1]                  int32; row b owns tokens qsl[b] .. qsl[b+1]-1 (may be 0)
    causal_base      [B]                      int64; see below

Logical slot ``j`` of stream (b, h) lives in page ``page_table[b, h, j // BS]`` at offset
``j % BS``. The stream has two segments:

    A: slots 0 .. len_a - 1                    (pages 0 .. P_a - 1, the last maybe partly filled)
    B: slots P_a*BS .. P_a*BS + len_b - 1      with P_a = ceil(len_a / BS)

Query ``i`` (0-based within row b) of head q sees slot ``j`` of stream (b, q // G) iff ``j`` is in
A or B **and** ``j <= causal_base[b] + i`` (pass a huge value, e.g. ``2**40``, to disable the causal
limit). Scores are ``scale * q.k``, the softmax is done in fp32 and the result is cast to
``out.dtype``. A query that sees no key at all gets an all-zero output (valid inputs never do that).
Page-table entries past a stream's last page, and the unfilled slots of its pages, are never
dereferenced (they may hold garbage).

``paged_attention_heads_torch`` is the reference twin; ``paged_attention_heads_triton`` is a
flash-decoding style kernel (one program per (query block, row, KV head), online softmax over
tiles of logical slots); ``paged_attention_heads`` picks Triton for CUDA tensors.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from vllm_kvzap.kernels.surrogate_score import HAS_TRITON, _interpret_enabled

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "paged_attention_heads",
    "paged_attention_heads_torch",
    "paged_attention_heads_triton",
]


def _check_args(
    query: torch.Tensor,
    kv_pages: torch.Tensor,
    page_table: torch.Tensor,
    len_a: torch.Tensor,
    len_b: torch.Tensor,
    query_start_loc: torch.Tensor,
    causal_base: torch.Tensor,
    out: torch.Tensor,
) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; return (T, H_q, D, B, H_kv, BS)."""
    if query.dim() != 3:
        raise ValueError(f"query must be [T, H_q, D], got shape {tuple(query.shape)}")
    T, H_q, D = query.shape
    if tuple(out.shape) != (T, H_q, D):
        raise ValueError(f"out must have query's shape {(T, H_q, D)}, got {tuple(out.shape)}")
    if kv_pages.dim() != 4 or kv_pages.shape[1] != 2 or kv_pages.shape[3] != D:
        raise ValueError(f"kv_pages must be [num_pages, 2, BS, D={D}], got {tuple(kv_pages.shape)}")
    if kv_pages.dtype not in (query.dtype, torch.float32):
        raise ValueError(f"kv_pages must be {query.dtype} or float32, got {kv_pages.dtype}")
    if page_table.dim() != 3:
        raise ValueError(f"page_table must be [B, H_kv, max_pages], got {tuple(page_table.shape)}")
    B, H_kv = page_table.shape[:2]
    if H_kv == 0 or H_q % H_kv:
        raise ValueError(f"H_q={H_q} must be a positive multiple of H_kv={H_kv}")
    for name, t in (("len_a", len_a), ("len_b", len_b)):
        if tuple(t.shape) != (B, H_kv):
            raise ValueError(f"{name} must be [B={B}, H_kv={H_kv}], got {tuple(t.shape)}")
    if tuple(query_start_loc.shape) != (B + 1,):
        raise ValueError(f"query_start_loc must be [B+1={B + 1}], got {tuple(query_start_loc.shape)}")
    if tuple(causal_base.shape) != (B,):
        raise ValueError(f"causal_base must be [B={B}], got {tuple(causal_base.shape)}")
    return T, H_q, D, B, H_kv, kv_pages.shape[2]


def paged_attention_heads_torch(
    query: torch.Tensor,
    kv_pages: torch.Tensor,
    page_table: torch.Tensor,
    len_a: torch.Tensor,
    len_b: torch.Tensor,
    query_start_loc: torch.Tensor,
    causal_base: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Plain-torch twin (see the module docstring for layouts); writes and returns ``out``.

    Loops over rows; per row, gathers the pages of all KV heads at once and materialises the
    [H_kv, G, q_len, slots] scores (fine for tests and the CPU path, not for long prefills).
    Tokens outside every row are left untouched.
    """
    T, H_q, D, B, H_kv, BS = _check_args(
        query, kv_pages, page_table, len_a, len_b, query_start_loc, causal_base, out
    )
    G = H_q // H_kv
    dev = kv_pages.device
    qsl = query_start_loc.tolist()
    bases = causal_base.tolist()
    la_all = len_a.to(device=dev, dtype=torch.long)
    lb_all = len_b.to(device=dev, dtype=torch.long)
    decode_rows = [b for b in range(B) if qsl[b + 1] - qsl[b] == 1]
    if len(decode_rows) > 1:
        _decode_rows_torch(query, kv_pages, page_table, la_all, lb_all, qsl, causal_base,
                           scale, out, decode_rows)  # fmt: skip
        decode_rows = set(decode_rows)
    else:
        decode_rows = set()
    for b in range(B):
        q0, q1 = qsl[b], qsl[b + 1]
        q_len = q1 - q0
        if q_len <= 0 or b in decode_rows:
            continue
        la, lb = la_all[b], lb_all[b]  # [H_kv]
        b_start = (la + BS - 1) // BS * BS  # first slot of segment B
        end = b_start + lb
        n_slots = -(-int(torch.maximum(la, end).max()) // BS) * BS
        if n_slots == 0:
            out[q0:q1] = 0
            continue
        j = torch.arange(n_slots, device=dev)
        in_stream = (j < la[:, None]) | ((j >= b_start[:, None]) & (j < end[:, None]))  # [H_kv, N]
        q_pos = bases[b] + torch.arange(q_len, device=dev)
        causal = j[None, :] <= q_pos[:, None]  # [q, N]
        visible = in_stream[:, None, None, :] & causal[None, None]  # [H_kv, 1, q, N]
        # keys no query of this row may see are zeroed (their pages may be garbage / NaN)
        any_visible = in_stream & (j <= q_pos[-1])  # [H_kv, N]
        n_pages = n_slots // BS
        page_used = any_visible.view(H_kv, n_pages, BS).any(-1)
        pages = torch.where(page_used, page_table[b, :, :n_pages].to(dev).long(), 0)
        kv = kv_pages[pages].float()  # [H_kv, n_pages, 2, BS, D]
        k = kv[:, :, 0].reshape(H_kv, n_slots, D)
        v = kv[:, :, 1].reshape(H_kv, n_slots, D)
        k = torch.where(any_visible[..., None], k, 0.0)
        v = torch.where(any_visible[..., None], v, 0.0)

        q = query[q0:q1].to(dev).float().view(q_len, H_kv, G, D).permute(1, 2, 0, 3)  # [H_kv, G, q, D]
        logits = torch.matmul(q, k[:, None].transpose(-1, -2)) * scale  # [H_kv, G, q, N]
        logits = logits.masked_fill(~visible, float("-inf"))
        m = logits.amax(-1, keepdim=True)
        m = torch.where(torch.isneginf(m), 0.0, m)  # rows with no visible key: all p = 0
        p = torch.exp(logits - m)
        den = p.sum(-1, keepdim=True)
        o = torch.matmul(p, v[:, None]) / torch.where(den > 0, den, 1.0)  # [H_kv, G, q, D]
        out[q0:q1] = o.permute(2, 0, 1, 3).reshape(q_len, H_q, D).to(device=out.device, dtype=out.dtype)
    return out


def _decode_rows_torch(query, kv_pages, page_table, la_all, lb_all, qsl, causal_base, scale, out,
                       rows):
    """All one-query rows at once: the same math as the row loop, batched over rows."""
    dev = kv_pages.device
    H_q, D = query.shape[1], query.shape[2]
    H_kv, BS = page_table.shape[1], kv_pages.shape[2]
    G = H_q // H_kv
    idx = torch.tensor(rows, device=dev)
    tokens = torch.tensor([qsl[b] for b in rows], device=query.device)
    la, lb = la_all[idx], lb_all[idx]  # [R, H_kv]
    b_start = (la + BS - 1) // BS * BS
    end = b_start + lb
    n_slots = -(-int(torch.maximum(la, end).max()) // BS) * BS
    if n_slots == 0:
        out[tokens] = 0
        return
    j = torch.arange(n_slots, device=dev)
    in_stream = (j < la[..., None]) | ((j >= b_start[..., None]) & (j < end[..., None]))
    base = causal_base.to(dev)[idx]
    visible = in_stream & (j[None, None, :] <= base[:, None, None])  # [R, H_kv, N]
    n_pages = n_slots // BS
    page_used = visible.view(len(rows), H_kv, n_pages, BS).any(-1)
    pages = torch.where(page_used, page_table.to(dev)[idx, :, :n_pages].long(), 0)
    kv = kv_pages[pages].float()  # [R, H_kv, n_pages, 2, BS, D]
    k = torch.where(visible[..., None], kv[:, :, :, 0].reshape(len(rows), H_kv, n_slots, D), 0.0)
    v = torch.where(visible[..., None], kv[:, :, :, 1].reshape(len(rows), H_kv, n_slots, D), 0.0)
    q = query[tokens].to(dev).float().view(len(rows), H_kv, G, D)
    logits = torch.einsum("rhgd,rhnd->rhgn", q, k) * scale
    logits = logits.masked_fill(~visible[:, :, None, :], float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)
    p = torch.exp(logits - m)
    den = p.sum(-1, keepdim=True)
    o = torch.einsum("rhgn,rhnd->rhgd", p, v) / torch.where(den > 0, den, 1.0)
    out[tokens] = o.reshape(len(rows), H_q, D).to(device=out.device, dtype=out.dtype)


if HAS_TRITON:

    @triton.jit
    def _head_paged_attention_kernel(
        q_ptr, kv_ptr, pt_ptr, len_a_ptr, len_b_ptr, qsl_ptr, cbase_ptr, out_ptr,
        scale, D,
        stride_qt, stride_qh, stride_qd,
        stride_kvp, stride_kvkv, stride_kvs, stride_kvd,
        stride_ptb, stride_pth, stride_ptp,
        stride_lab, stride_lah,
        stride_lbb, stride_lbh,
        stride_ot, stride_oh, stride_od,
        G: tl.constexpr,
        BS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST_DOTS: tl.constexpr,
    ):
        """Attention of one (query block, row b, KV head h) over stream (b, h).

        Grid: (cdiv(max_query_len, BLOCK_M // G), B, H_kv); B and H_kv must be <= 65535 (CUDA).
        The BLOCK_M score rows of a program are QPB = BLOCK_M // G queries x the G query heads
        sharing KV head h: row r is query ``first_q + r // G`` of head ``h * G + r % G``, so each
        K/V tile is loaded once per group.
        Loop: tiles of BLOCK_N slots inside one page (ceil(BS / BLOCK_N) tiles per page, so BS
        need not be a power of two), over the stream's pages up to ``hi`` = min(stream end, causal
        limit of the block's last query); one page-table read per tile, only for pages below
        ceil(hi / BS), which all belong to the stream. K/V loads are masked to in-stream slots
        below ``hi`` (other=0), so unfilled slots, later pages and keys no query of the block may
        see are never read. Online softmax in fp32 (running max m_i, denominator l_i, acc).
        Reductions go through tl.reduce with Triton's own combine functions (what tl.max / tl.sum
        use), so that the interpreter also runs this kernel when triton was imported without
        TRITON_INTERPRET=1; likewise tl.full, not tl.zeros.
        UPCAST_DOTS (interpreter + bf16 K/V only) feeds the dots fp32 copies of the same bf16
        values, because the interpreter's bf16 tl.dot multiplies the raw uint16 bit patterns.
        """
        qb = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        QPB: tl.constexpr = BLOCK_M // G

        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        first_q = qb * QPB
        if first_q >= q_len:
            return

        offs_m = tl.arange(0, BLOCK_M)
        q_idx = first_q + offs_m // G  # query index within the row
        head = h * G + offs_m % G  # query head
        row_ok = (offs_m < QPB * G) & (q_idx < q_len)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D

        tok = (q_start + q_idx).to(tl.int64)
        q = tl.load(
            q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(kv_ptr.dtype.element_ty)  # dots run in the K/V dtype (fp32 accumulation)

        la = tl.load(len_a_ptr + b * stride_lab + h * stride_lah)
        lb = tl.load(len_b_ptr + b * stride_lbb + h * stride_lbh)
        b_start = (la + BS - 1) // BS * BS  # first slot of segment B
        end = b_start + lb  # one past the last slot of the stream
        base = tl.load(cbase_ptr + b).to(tl.int64)
        q_pos = base + q_idx.to(tl.int64)  # query i sees slots j <= q_pos[i]
        last_q = tl.minimum(first_q + QPB, q_len) - 1
        # one past the last slot any query of this block may see
        hi = tl.maximum(tl.minimum(base + last_q + 1, end.to(tl.int64)), 0).to(tl.int32)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
        acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
        pt_row = pt_ptr + b.to(tl.int64) * stride_ptb + h * stride_pth
        offs_n = tl.arange(0, BLOCK_N)
        # tiles never straddle pages: page p holds tiles p*TPP .. p*TPP + TPP - 1
        TPP: tl.constexpr = (BS + BLOCK_N - 1) // BLOCK_N  # tiles per page
        n_tiles = (hi + BS - 1) // BS * TPP
        for t in range(0, n_tiles):
            p_idx = t // TPP  # page index within the stream (< its page count: hi <= end)
            in_page = (t % TPP) * BLOCK_N + offs_n  # slot offsets inside the page
            j = p_idx * BS + in_page  # logical slots
            col_ok = (in_page < BS) & ((j < la) | ((j >= b_start) & (j < end))) & (j < hi)
            page = tl.load(pt_row + p_idx * stride_ptp).to(tl.int64)
            page_ptr = kv_ptr + page * stride_kvp
            k_t = tl.load(  # keys, transposed: [BLOCK_D, BLOCK_N]
                page_ptr + in_page[None, :] * stride_kvs + offs_d[:, None] * stride_kvd,
                mask=d_ok[:, None] & col_ok[None, :], other=0.0,
            )
            v = tl.load(  # values: [BLOCK_N, BLOCK_D]
                page_ptr + stride_kvkv + in_page[:, None] * stride_kvs + offs_d[None, :] * stride_kvd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0,
            )
            if UPCAST_DOTS:
                s = tl.dot(q.to(tl.float32), k_t.to(tl.float32), input_precision=INPUT_PRECISION)
            else:
                s = tl.dot(q, k_t, input_precision=INPUT_PRECISION)
            s = s * scale
            visible = row_ok[:, None] & col_ok[None, :] & (j[None, :].to(tl.int64) <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked rows: p = alpha = 0
            alpha = tl.exp(m_i - m_ref)
            p = tl.exp(s - m_ref[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
            p_lo = p.to(v.dtype)  # probabilities rounded to the K/V dtype, as in flash attention
            acc = acc * alpha[:, None]
            if UPCAST_DOTS:
                acc = tl.dot(p_lo.to(tl.float32), v.to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(p_lo, v, acc, input_precision=INPUT_PRECISION)
            m_i = m_new

        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # no visible key -> zeros
        tl.store(
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@functools.cache
def _interpreted_kernel():
    """The kernel run by Triton's interpreter, whatever TRITON_INTERPRET was at import time.

    Same mechanism as ``surrogate_score._interpreted_kernel`` (see there).
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(_head_paged_attention_kernel, InterpretedFunction):
        return _head_paged_attention_kernel
    return InterpretedFunction(_head_paged_attention_kernel.fn)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _launch_config(
    D: int,
    G: int,
    BS: int,
    max_query_len: int,
    kv_dtype: torch.dtype,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    input_precision: str = "ieee",
) -> dict:
    """Tile sizes, warps and dot precision of one launch (kernel keyword arguments).

    Defaults were chosen so that sm_80 / sm_90 builds do not spill registers (checked by
    compiling offline for D = 64..256, G = 1..8, decode and prefill; not benchmarked).
    """
    BLOCK_D = max(16, _pow2(D))
    m_cap = 64 if BLOCK_D <= 128 and kv_dtype != torch.float32 else 32
    BLOCK_M = block_m or max(16, _pow2(G), min(m_cap, _pow2(max_query_len * G)))
    BLOCK_N = block_n or max(16, min(64, _pow2(BS)))  # one page per tile when BS <= 64
    for name, blk in (("block_m", BLOCK_M), ("block_n", BLOCK_N)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    if BLOCK_M < G:
        raise ValueError(f"block_m={BLOCK_M} must be >= G={G}")
    return {
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": BLOCK_D,
        # 16-bit dots: Triton's default (their precision setting only matters for fp32)
        "INPUT_PRECISION": input_precision if kv_dtype == torch.float32 else None,
        "num_warps": num_warps or (4 if BLOCK_M * BLOCK_D < 16 * 128 else 8),
    }


def paged_attention_heads_triton(
    query: torch.Tensor,
    kv_pages: torch.Tensor,
    page_table: torch.Tensor,
    len_a: torch.Tensor,
    len_b: torch.Tensor,
    query_start_loc: torch.Tensor,
    causal_base: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    max_query_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """Triton kernel (see the module docstring for layouts); writes and returns ``out``.

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (slow; for tests). All
    tensors must be on query's device. ``max_query_len`` (the largest row length) sizes the grid;
    when omitted it is computed from ``query_start_loc`` (a device sync if that is on the GPU).
    ``block_m`` (score rows per program = queries x G heads) and ``block_n`` (slots per tile; a
    page is cut into ceil(BS / block_n) tiles, so block_n > BS wastes lanes) are powers of two
    >= 16; ``block_m`` must be >= G. ``num_warps`` defaults to 4 for small tiles, else 8.
    ``input_precision`` applies to fp32 K/V dots ("ieee" matches the torch twin; "tf32" is faster
    on Ampere+); 16-bit dots use Triton's default.
    Tokens outside every row are left untouched.
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use paged_attention_heads_torch")
    T, H_q, D, B, H_kv, BS = _check_args(
        query, kv_pages, page_table, len_a, len_b, query_start_loc, causal_base, out
    )
    G = H_q // H_kv
    if query.is_cuda:
        kernel = _head_paged_attention_kernel
    elif _interpret_enabled():
        kernel = _interpreted_kernel()
    else:
        raise RuntimeError(
            f"paged_attention_heads_triton needs CUDA tensors (got {query.device}); "
            "set TRITON_INTERPRET=1 to run the kernel on CPU tensors (slow, for tests)"
        )
    for name, t in (("kv_pages", kv_pages), ("page_table", page_table), ("len_a", len_a),
                    ("len_b", len_b), ("query_start_loc", query_start_loc),
                    ("causal_base", causal_base), ("out", out)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if T == 0 or B == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len <= 0:
        return out

    cfg = _launch_config(D, G, BS, max_query_len, kv_pages.dtype, block_m, block_n, num_warps,
                         input_precision)
    qpb = cfg["BLOCK_M"] // G
    # int32 / int64 as documented; cast (a no-op when they already are) rather than trust callers
    page_table = page_table.to(torch.int32)
    len_a, len_b = len_a.to(torch.int32), len_b.to(torch.int32)
    query_start_loc = query_start_loc.to(torch.int32)
    causal_base = causal_base.to(torch.int64)

    grid = (triton.cdiv(max_query_len, qpb), B, H_kv)
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        kernel[grid](
            query, kv_pages, page_table, len_a, len_b, query_start_loc, causal_base, out,
            float(scale), D,
            *query.stride(), *kv_pages.stride(), *page_table.stride(),
            *len_a.stride(), *len_b.stride(), *out.stride(),
            G=G,
            BS=BS,
            UPCAST_DOTS=not query.is_cuda and kv_pages.dtype == torch.bfloat16,
            **cfg,
        )
    return out


def paged_attention_heads(
    query: torch.Tensor,
    kv_pages: torch.Tensor,
    page_table: torch.Tensor,
    len_a: torch.Tensor,
    len_b: torch.Tensor,
    query_start_loc: torch.Tensor,
    causal_base: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA tensors, the torch twin otherwise."""
    args = (query, kv_pages, page_table, len_a, len_b, query_start_loc, causal_base, scale, out)
    if query.is_cuda and HAS_TRITON:
        return paged_attention_heads_triton(*args)
    return paged_attention_heads_torch(*args)
