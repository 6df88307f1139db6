"""Tests for kernels/head_paged_attention.py: torch twin and Triton kernel vs a dense reference.

The reference below shares no code with the module: for every (row, KV head) it walks the
stream's logical slots one by one in Python, collects the visible keys/values, and runs plain
float64 softmax attention per query. Batches mix decode rows, multi-query causal rows and empty
rows; page ids of all streams are shuffled through one pool; everything a correct kernel must not
read (unused pages, unfilled slots of used pages, page-table entries past a stream's end, slots
beyond every query's causal limit) holds NaN, so a stray read shows up as NaN in the output.

The Triton path runs on CPU tensors through Triton's interpreter (see tests/test_kernels.py):
in-process via the ``interpret`` fixture, and once in a fresh process with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.interpreter import run_in_triton_interpreter

from vllm_kvzap.kernels import head_paged_attention as hpa

NO_CAUSAL = 2**40
BS = 16

needs_triton = pytest.mark.skipif(not hpa.HAS_TRITON, reason="triton not installed")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@dataclass
class Case:
    query: torch.Tensor
    kv_pages: torch.Tensor
    page_table: torch.Tensor
    len_a: torch.Tensor
    len_b: torch.Tensor
    query_start_loc: torch.Tensor
    causal_base: torch.Tensor
    scale: float

    def args(self, out: torch.Tensor) -> tuple:
        return (self.query, self.kv_pages, self.page_table, self.len_a, self.len_b,
                self.query_start_loc, self.causal_base, self.scale, out)


# Per-head (len_a, len_b) patterns; rows cycle through them with a per-row shift.
LENGTHS = [
    (37, 21),  # both ragged
    (32, 0),  # A a multiple of BS, no B
    (0, 25),  # no A: B starts at slot 0
    (1, 0),  # almost everything pruned
    (0, 1),
    (48, 16),  # nothing pruned / full pages
    (5, 40),
    (17, 3),
]


def make_case(
    rows: list[tuple[int, str]],  # (q_len, kind): kind in {"decode", "causal", "open"}
    H_kv: int,
    G: int,
    D: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None = None,
    seed: int = 0,
    lengths: list[tuple[int, int]] | None = None,
    BS: int = BS,
) -> Case:
    """Random batch; K/V of stream slots ~ N(0, 1), everything unreadable is NaN."""
    g = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    lengths = lengths or LENGTHS
    B = len(rows)
    len_a = torch.zeros(B, H_kv, dtype=torch.int32)
    len_b = torch.zeros(B, H_kv, dtype=torch.int32)
    for b in range(B):
        for h in range(H_kv):
            len_a[b, h], len_b[b, h] = lengths[(3 * b + h) % len(lengths)]
    pages_a = (len_a + BS - 1) // BS
    pages_b = (len_b + BS - 1) // BS
    n_used = int((pages_a + pages_b).sum())
    num_pages = n_used + 7  # 7 poison pages, shuffled in with the others
    perm = torch.randperm(num_pages, generator=g)
    used, poison = perm[:n_used].tolist(), perm[n_used:].tolist()
    max_pages = int((pages_a + pages_b).max()) + 2
    page_table = torch.tensor(poison, dtype=torch.int32)[
        torch.randint(len(poison), (B, H_kv, max_pages), generator=g)
    ]
    kv = torch.full((num_pages, 2, BS, D), float("nan"))
    ends = []
    for b in range(B):
        for h in range(H_kv):
            n = int(pages_a[b, h] + pages_b[b, h])
            page_table[b, h, :n] = torch.tensor(used[:n], dtype=torch.int32)
            used = used[n:]
            la, lb, pa = int(len_a[b, h]), int(len_b[b, h]), int(pages_a[b, h])
            for j in [*range(la), *range(pa * BS, pa * BS + lb)]:
                kv[page_table[b, h, j // BS], :, j % BS] = torch.randn(2, D, generator=g)
            ends.append(pa * BS + lb)

    q_lens = [q for q, _ in rows]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    causal_base = torch.zeros(B, dtype=torch.int64)
    for b, (q_len, kind) in enumerate(rows):
        stream_end = max(ends[b * H_kv:(b + 1) * H_kv])
        if kind == "open":
            causal_base[b] = NO_CAUSAL
        elif kind == "decode":  # the new token is the stream's last slot
            causal_base[b] = stream_end - 1
        else:  # causal chunk that ends before the longest stream does
            causal_base[b] = int(torch.randint(0, max(1, stream_end - q_len), (1,), generator=g))
    # poison slots that no query of the row may see (beyond the last query's causal limit)
    for b in range(B):
        q_len = q_lens[b]
        last = int(causal_base[b]) + q_len - 1
        for h in range(H_kv):
            for j in range(last + 1, ends[b * H_kv + h]):
                kv[page_table[b, h, j // BS], :, j % BS] = float("nan")

    T = int(qsl[-1])
    query = torch.randn(T, H_kv * G, D, generator=g).to(dtype)
    return Case(query, kv.to(kv_dtype), page_table, len_a, len_b, qsl, causal_base, 1 / math.sqrt(D))


def dense_reference(c: Case) -> torch.Tensor:
    """float64 attention per (token, head) over explicitly collected visible K/V."""
    T, H_q, D = c.query.shape
    B, H_kv, _ = c.page_table.shape
    BS = c.kv_pages.shape[2]
    G = H_q // H_kv
    out = torch.zeros(T, H_q, D, dtype=torch.float64)
    for b in range(B):
        q0, q1 = int(c.query_start_loc[b]), int(c.query_start_loc[b + 1])
        for h in range(H_kv):
            la, lb = int(c.len_a[b, h]), int(c.len_b[b, h])
            b_start = -(-la // BS) * BS
            slots, keys, values = [], [], []
            for j in range(b_start + lb):
                if j < la or j >= b_start:
                    page = int(c.page_table[b, h, j // BS])
                    slots.append(j)
                    keys.append(c.kv_pages[page, 0, j % BS].double())
                    values.append(c.kv_pages[page, 1, j % BS].double())
            for i in range(q1 - q0):
                limit = int(c.causal_base[b]) + i
                idx = [n for n, j in enumerate(slots) if j <= limit]
                if not idx:
                    continue
                k = torch.stack([keys[n] for n in idx])
                v = torch.stack([values[n] for n in idx])
                for qh in range(h * G, (h + 1) * G):
                    logits = k @ c.query[q0 + i, qh].double() * c.scale
                    out[q0 + i, qh] = torch.softmax(logits, 0) @ v
    return out


def run_impl(impl: str, c: Case, **kwargs) -> torch.Tensor:
    out = torch.full_like(c.query, float("nan"))
    if impl == "torch":
        res = hpa.paged_attention_heads_torch(*c.args(out))
    else:
        res = hpa.paged_attention_heads_triton(*c.args(out), **kwargs)
    assert res is out
    return out


def tolerances(dtype: torch.dtype) -> dict:
    return {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


# decode rows, multi-query causal rows (also longer than one query block), an empty row, open rows
ROWS = [(1, "decode"), (6, "causal"), (0, "decode"), (1, "open"), (21, "causal"), (3, "open"), (1, "decode")]

CONFIGS = [
    # H_kv, G, D, dtype, kv_dtype, BS, kernel kwargs
    pytest.param(2, 1, 32, torch.float32, None, 16, {}, id="G1-D32-fp32"),
    pytest.param(2, 2, 64, torch.bfloat16, None, 16, {}, id="G2-D64-bf16"),
    pytest.param(1, 4, 32, torch.bfloat16, torch.float32, 16, {"block_m": 16, "block_n": 32},
                 id="G4-D32-bf16q-fp32kv-bm16-bn32"),
    pytest.param(2, 4, 64, torch.float32, None, 16, {"block_m": 16}, id="G4-D64-fp32-bm16"),
    pytest.param(3, 1, 32, torch.float16, None, 16, {}, id="G1-D32-fp16"),
    # pages cut into several tiles; a page size that is not a power of two
    pytest.param(2, 2, 32, torch.float32, None, 32, {"block_n": 16}, id="G2-D32-fp32-BS32-bn16"),
    pytest.param(1, 2, 32, torch.bfloat16, None, 24, {"block_n": 16}, id="G2-D32-bf16-BS24-bn16"),
]


def _check(impl: str, c: Case, dtype: torch.dtype, **kwargs) -> None:
    ref = dense_reference(c)
    out = run_impl(impl, c, **kwargs)
    assert out.dtype == dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, **tolerances(dtype))


@pytest.mark.parametrize("H_kv,G,D,dtype,kv_dtype,bs,kw", CONFIGS)
def test_torch_twin_matches_dense_reference(H_kv, G, D, dtype, kv_dtype, bs, kw) -> None:
    c = make_case(ROWS, H_kv, G, D, dtype, kv_dtype, seed=G * D + bs, BS=bs)
    _check("torch", c, dtype)


@needs_triton
@pytest.mark.parametrize("H_kv,G,D,dtype,kv_dtype,bs,kw", CONFIGS)
def test_triton_matches_dense_reference(interpret, H_kv, G, D, dtype, kv_dtype, bs, kw) -> None:
    c = make_case(ROWS, H_kv, G, D, dtype, kv_dtype, seed=G * D + bs, BS=bs)
    _check("triton", c, dtype, **kw)


@needs_triton
def test_triton_strided_query_and_out(interpret) -> None:
    """query/out as head-slices of wider buffers (as when q is a view of a fused qkv tensor)."""
    c = make_case([(4, "causal"), (1, "decode")], H_kv=2, G=2, D=32, dtype=torch.float32, seed=5)
    T, H_q, D = c.query.shape
    wide = torch.randn(T, H_q + 3, D)
    wide[:, 1:1 + H_q] = c.query
    c.query = wide[:, 1:1 + H_q]
    out_wide = torch.full((T, H_q + 2, D), 7.0)
    out = out_wide[:, 2:]
    hpa.paged_attention_heads_triton(*c.args(out))
    torch.testing.assert_close(out.double(), dense_reference(c), **tolerances(torch.float32))
    assert (out_wide[:, :2] == 7.0).all()


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_no_visible_key_gives_zeros(interpret, impl: str) -> None:
    """Empty stream, or a causal limit before the stream's first slot: output is exactly 0."""
    lengths = [(0, 0), (20, 5)]  # (row, KV head) -> lengths[(3 * row + head) % 2]
    c = make_case([(2, "open"), (1, "decode"), (4, "causal")], H_kv=2, G=2, D=32,
                  dtype=torch.float32, lengths=lengths, seed=3)
    c.causal_base[1] = -1  # row 1 (token 2) sees nothing in any head
    c.causal_base[2] = -2  # row 2 (tokens 3..6): queries 0 and 1 see nothing, 2 and 3 see slots 0..i-2
    out = run_impl(impl, c)
    ref = dense_reference(c)
    torch.testing.assert_close(out.double(), ref, **tolerances(torch.float32))
    assert (out[:2, :2] == 0).all()  # row 0, KV head 0: empty stream
    assert (out[2] == 0).all()
    assert (out[3:7, :2] == 0).all() and (out[3:5, 2:] == 0).all()  # row 2: empty stream / too early
    assert (out[:2, 2:] != 0).all(-1).any() and (out[5:7, 2:] != 0).any(-1).all()


def test_dispatch_on_cpu_uses_torch_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("Triton path taken for CPU tensors")

    monkeypatch.setattr(hpa, "paged_attention_heads_triton", boom)
    c = make_case([(2, "causal"), (1, "decode")], H_kv=1, G=2, D=32, dtype=torch.float32, seed=1)
    out = torch.empty_like(c.query)
    assert hpa.paged_attention_heads(*c.args(out)) is out
    torch.testing.assert_close(out.double(), dense_reference(c), **tolerances(torch.float32))


@needs_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    c = make_case([(1, "decode")], H_kv=1, G=1, D=32, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        hpa.paged_attention_heads_triton(*c.args(torch.empty_like(c.query)))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_shape_errors(interpret, impl: str) -> None:
    c = make_case([(1, "decode")], H_kv=2, G=2, D=32, dtype=torch.float32)
    fn = hpa.paged_attention_heads_torch if impl == "torch" else hpa.paged_attention_heads_triton
    with pytest.raises(ValueError, match="multiple of H_kv"):
        fn(c.query[:, :3], *c.args(torch.empty_like(c.query[:, :3]))[1:])
    with pytest.raises(ValueError, match="kv_pages must be"):
        fn(c.query, c.kv_pages.double(), *c.args(torch.empty_like(c.query))[2:])
    with pytest.raises(ValueError, match="len_a must be"):
        fn(*c.args(torch.empty_like(c.query))[:3], c.len_a[:, :1], *c.args(torch.empty_like(c.query))[4:])


@needs_triton
def test_triton_interpreter_in_fresh_process() -> None:
    """TRITON_INTERPRET=1 set before triton is imported: the standard interpreter path."""
    code = textwrap.dedent(
        """
        import torch
        from triton.runtime.interpreter import InterpretedFunction
        from vllm_kvzap.kernels import head_paged_attention as hpa
        from tests.test_head_paged_attention import make_case, dense_reference

        assert isinstance(hpa._head_paged_attention_kernel, InterpretedFunction)
        c = make_case([(1, "decode"), (5, "causal")], H_kv=2, G=2, D=32, dtype=torch.float32, seed=9)
        out = torch.empty_like(c.query)
        hpa.paged_attention_heads_triton(*c.args(out))
        torch.testing.assert_close(out.double(), dense_reference(c), atol=2e-5, rtol=1e-4)
        print("OK")
        """
    )
    run_in_triton_interpreter(code)


def _offline_nvidia_compiler() -> str | None:
    """Why Triton cannot build NVIDIA binaries here without a GPU, or None if it can."""
    if not hpa.HAS_TRITON:
        return "triton not installed"
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(hpa._head_paged_attention_kernel, InterpretedFunction):
        return "triton was imported with TRITON_INTERPRET=1"
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        return "triton's NVIDIA backend (ptxas) is not available"
    return None


@pytest.mark.skipif(_offline_nvidia_compiler() is not None, reason=str(_offline_nvidia_compiler()))
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize(
    "dtype,kv_dtype,D,G,max_query_len,arch",
    [
        pytest.param(torch.bfloat16, torch.bfloat16, 128, 4, 1, 90, id="bf16-decode-sm90"),
        pytest.param(torch.bfloat16, torch.bfloat16, 128, 4, 256, 80, id="bf16-prefill-sm80"),
        pytest.param(torch.bfloat16, torch.float32, 64, 2, 256, 90, id="fp32kv-ieee-prefill-sm90"),
    ],
)
def test_triton_kernel_compiles_for_nvidia_gpus(dtype, kv_dtype, D, G, max_query_len, arch) -> None:
    """Full build (TTIR -> PTX -> cubin with ptxas) for sm_80 / sm_90 without a GPU.

    Catches constructs only the interpreter accepts; the interpreter tests cover the numerics.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = hpa._head_paged_attention_kernel
    ty = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    cfg = hpa._launch_config(D, G, BS, max_query_len, kv_dtype)
    num_warps = cfg.pop("num_warps")
    constexprs = {"G": G, "BS": BS, "UPCAST_DOTS": False, **cfg}
    pointers = {"q_ptr": ty[dtype], "kv_ptr": ty[kv_dtype], "pt_ptr": "i32", "len_a_ptr": "i32",
                "len_b_ptr": "i32", "qsl_ptr": "i32", "cbase_ptr": "i64", "out_ptr": ty[dtype]}
    signature = {
        name: "*" + pointers[name] if name in pointers
        else "constexpr" if name in constexprs
        else "fp32" if name == "scale"
        else "i32"
        for name in kernel.arg_names
    }
    src = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    assert len(compiled.asm["cubin"]) > 0
