"""Tests for kernels/surrogate_score.py: Triton (interpreter on CPU) vs torch twin vs nn modules.

The Triton path runs on CPU tensors through Triton's interpreter: in-process (the module reads
TRITON_INTERPRET at call time and wraps the kernel in the interpreter itself, so the result does
not depend on which test imported triton first) and, once, in a fresh subprocess with
TRITON_INTERPRET=1 set before anything is imported (the standard way). The interpreter runs the
GPU's launch configurations too (the tiles and D splits chosen for an H100's 132 SMs).
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from tests.interpreter import run_in_triton_interpreter
from torch import nn

from vllm_kvzap.kernels import surrogate_score as ss
from vllm_kvzap.rule import keep as rule_keep

BF16, FP32 = torch.bfloat16, torch.float32
# Triton vs the float32 twin on the same (bf16-rounded) inputs: bf16 x bf16 products are exact in
# float32 and both sides accumulate in float32, so only the summation order differs (~1e-6 seen at
# D = 4096, scores ~10). Any bf16 rounding of an intermediate (the hidden layer or the scores)
# would be off by ~2^-9 relative, >= 1e-2 at scores ~-4; a lost or doubled tile by far more.
BF16_ATOL, BF16_RTOL = 1e-4, 1e-5

needs_triton = pytest.mark.skipif(not ss.HAS_TRITON, reason="triton not installed")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_weights(
    D: int, H: int, N: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    if N is None:
        return torch.randn(H, D, generator=g) / math.sqrt(D), torch.randn(H, generator=g) - 4, None, None
    w1 = torch.randn(N, D, generator=g) / math.sqrt(D)
    b1 = torch.randn(N, generator=g)
    w2 = torch.randn(H, N, generator=g) / math.sqrt(N)
    b2 = torch.randn(H, generator=g) - 4
    return w1, b1, w2, b2


def nn_reference(x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """kvpress-style module (nn.Linear or Linear -> GELU -> Linear) in float64."""
    D, N = w1.shape[1], w1.shape[0]
    if w2 is None:
        module: nn.Module = nn.Linear(D, N)
        sd = {"weight": w1, "bias": b1}
    else:
        module = nn.Sequential(nn.Linear(D, N), nn.GELU(), nn.Linear(N, w2.shape[0]))
        sd = {"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2}
    module.load_state_dict(sd)
    with torch.no_grad():
        return module.double()(x.double())


def assert_decisions_match(scores_ref: torch.Tensor, keep: torch.Tensor, threshold: float) -> None:
    """keep must equal scores_ref >= threshold wherever the reference is not within fp noise."""
    clear = (scores_ref - threshold).abs() > 1e-4
    assert torch.equal(keep[clear], (scores_ref >= threshold)[clear])


# ---------------------------------------------------------------- torch twin vs nn modules


@pytest.mark.parametrize("N", [None, 24])
@pytest.mark.parametrize("H", [1, 3, 8])
def test_torch_twin_matches_nn_modules(N: int | None, H: int) -> None:
    T, D = 29, 40
    w1, b1, w2, b2 = make_weights(D, H, N, seed=H)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(H))
    scores = ss.scores_torch(x, w1, b1, w2, b2)
    keep = rule_keep(scores, -4.0)
    ref = nn_reference(x, w1, b1, w2, b2)
    assert scores.dtype == torch.float32 and keep.dtype == torch.bool
    assert scores.shape == keep.shape == (T, H)
    torch.testing.assert_close(scores.double(), ref, atol=1e-5, rtol=1e-5)
    assert_decisions_match(ref, keep, -4.0)
    assert 0 < keep.sum() < keep.numel()  # the threshold really splits the tokens


def test_torch_twin_gelu_is_exact_erf() -> None:
    # A single hidden unit h; score = gelu(h). tanh-approx GELU differs by ~1e-4 around |h| ~ 2.
    h = torch.tensor([[-3.0], [-2.0], [-0.5], [0.0], [0.7], [2.0]], dtype=torch.float64)
    w1, b1 = torch.ones(1, 1), torch.zeros(1)
    w2, b2 = torch.ones(1, 1), torch.zeros(1)
    scores = ss.scores_torch(h.float(), w1, b1, w2, b2)
    exact = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    torch.testing.assert_close(scores.double(), exact, atol=1e-6, rtol=0)


def test_surrogate_on_cpu_uses_torch_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_kvzap.scorers.checkpoint import SurrogateConfig
    from vllm_kvzap.scorers.surrogate import Surrogate

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w1, b1, w2, b2 = make_weights(16, 2, 16)
    sur = Surrogate(SurrogateConfig(16, 2, 1, 16), w1[None], b1[None], w2[None], b2[None])
    x = torch.randn(5, 16)
    assert torch.equal(sur.score(x, 0), ss.scores_torch(x, w1, b1, w2, b2))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(4, 8, 2), torch.randn(2, 8), torch.randn(2), None, None), "x must be"),
        ((torch.randn(4, 8), torch.randn(2, 9), torch.randn(2), None, None), "w1 must be"),
        ((torch.randn(4, 8), torch.randn(2, 8), torch.randn(3), None, None), "b1 must be"),
        ((torch.randn(4, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 6), None), "both"),
        ((torch.randn(4, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 5), torch.randn(2)), "w2 must be"),
        ((torch.randn(4, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 6), torch.randn(3)), "b2 must be"),
    ],
)
def test_shape_errors(args, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ss.scores_torch(*args)


# ---------------------------------------------------------------- Triton (interpreter) vs twin


# (T, D, N, H): T (mostly) not a multiple of the tile, D / hidden not powers of two, H_kv 1..8.
RAGGED = [
    (1, 16, None, 1),
    (37, 70, None, 3),
    (17, 33, 45, 8),
    (40, 50, 24, 2),
    (5, 96, 100, 5),
    (33, 20, 17, 1),
    (16, 64, 64, 4),
    (21, 48, 16, 7),
    (48, 40, 24, 6),  # T an exact multiple of the 16-token tile
    (32, 24, None, 8),
]


@needs_triton
@pytest.mark.parametrize("T, D, N, H", RAGGED)
def test_triton_matches_torch_twin(interpret, T: int, D: int, N: int | None, H: int) -> None:
    w1, b1, w2, b2 = make_weights(D, H, N, seed=T * 131 + D)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
    # 16-wide tiles: several T, D and hidden tiles with ragged edges
    s = ss.scores_triton(x, w1, b1, w2, b2, block_t=16, block_d=16, block_n=16)
    s_ref = ss.scores_torch(x, w1, b1, w2, b2)
    assert s.dtype == torch.float32 and s.shape == (T, H)
    torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s.double(), nn_reference(x, w1, b1, w2, b2), atol=2e-5, rtol=1e-5)


# (kind, T, D, x dtype, w1 passed in x's dtype, launch): ragged T from 1 to 4096, D of SmolLM2-135M
# (576) and Qwen3-8B (4096), H_kv 8, MLP hidden 512. "h100": the GPU's tiles and D splits;
# "interp": the interpreter's large tiles (the only way T = 4096 at D = 4096 stays quick).
QWEN_SHAPES = [
    ("mlp", 1, 4096, BF16, True, "h100"),
    ("mlp", 3, 576, FP32, True, "h100"),
    ("mlp", 17, 576, BF16, False, "h100"),
    ("mlp", 63, 576, FP32, True, "h100"),
    ("mlp", 64, 4096, BF16, True, "h100"),
    ("mlp", 65, 576, BF16, True, "h100"),
    ("mlp", 130, 576, FP32, True, "h100"),
    ("mlp", 130, 4096, FP32, True, "h100"),
    ("mlp", 1000, 576, BF16, True, "h100"),
    ("mlp", 1000, 4096, BF16, True, "h100"),
    ("mlp", 4096, 4096, BF16, True, "interp"),
    ("linear", 1, 4096, BF16, True, "h100"),
    ("linear", 3, 4096, FP32, True, "h100"),
    ("linear", 17, 576, FP32, True, "h100"),
    ("linear", 63, 4096, BF16, True, "h100"),
    ("linear", 64, 576, BF16, False, "h100"),
    ("linear", 65, 4096, BF16, True, "h100"),
    ("linear", 130, 576, FP32, True, "h100"),
    ("linear", 1000, 4096, BF16, True, "h100"),
    ("linear", 4096, 576, FP32, True, "interp"),
]


@needs_triton
@pytest.mark.parametrize(
    "kind, T, D, dtype, w1_cast, launch",
    QWEN_SHAPES,
    ids=["-".join(str(v).removeprefix("torch.") for v in case) for case in QWEN_SHAPES],
)
def test_triton_at_model_shapes(interpret, monkeypatch, kind, T, D, dtype, w1_cast, launch) -> None:
    if launch == "h100":  # the tiles and D splits of an H100's 132 SMs
        monkeypatch.setattr(ss, "_num_sms", lambda device: 132)
    w1, b1, w2, b2 = make_weights(D, 8, 512 if kind == "mlp" else None, seed=T + D)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(dtype)
    w1_lp = w1.to(dtype)  # as the Surrogate keeps it; else the kernel casts it per call
    s = ss.scores_triton(x, w1_lp if w1_cast else w1, b1, w2, b2)
    s_ref = ss.scores_torch(x, w1_lp, b1, w2, b2)
    assert s.dtype == torch.float32 and s.shape == (T, 8)
    atol, rtol = (BF16_ATOL, BF16_RTOL) if dtype == BF16 else (2e-5, 1e-5)
    torch.testing.assert_close(s, s_ref, atol=atol, rtol=rtol)


@needs_triton
def test_launch_config_on_an_h100() -> None:
    """The GPU tiles spread a decode step over the SMs (Qwen3-8B: D 4096, hidden 512, H_kv 8)."""
    def cfg(T: int, mlp: bool) -> tuple[int, int, int, int, int]:
        return ss._launch_config(T, 4096, 512 if mlp else 8, 8, mlp, 2, 132, None, None, None)

    assert cfg(1, True)[:2] == (16, 16) and cfg(1, True)[3] == 32  # 32 hidden tiles
    assert cfg(64, True)[:2] == (16, 16)  # 4 x 32 = 128 programs
    assert cfg(256, True)[:2] == (32, 32)
    assert cfg(1024, True)[:2] == (64, 64)
    bt, bn, bd, splits, per_prog = cfg(1, False)
    assert (bt, bn) == (16, 16) and splits > 1 and splits * per_prog >= 4096 > (splits - 1) * per_prog


@needs_triton
def test_triton_gelu_is_exact_erf(interpret) -> None:
    # One hidden unit h per token; score = gelu(h). tanh-approx GELU differs by ~1e-4 at |h| ~ 2.
    h = torch.tensor([[-3.0], [-2.0], [-0.5], [0.0], [0.7], [2.0]])
    one, zero = torch.ones(1, 1), torch.zeros(1)
    s = ss.scores_triton(h, one, zero, one, zero)
    exact = 0.5 * h.double() * (1 + torch.erf(h.double() / math.sqrt(2)))
    torch.testing.assert_close(s.double(), exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("D", [576, 4096])
def test_cublas_path_matches_torch_twin(D: int) -> None:
    """The torch path for long chunks: x @ w1.T + b1 in bf16 (cuBLAS on a GPU), the rest fp32.
    The hidden layer is rounded to bf16 (2^-9 relative) before GELU: ~1e-2 seen on scores ~-4."""
    w1, b1, w2, b2 = make_weights(D, 8, 512, seed=D)
    x = torch.randn(1100, D, generator=torch.Generator().manual_seed(D)).to(BF16)
    s = ss.scores_cublas(x, w1.to(BF16), b1, w2, b2)
    s_ref = ss.scores_torch(x, w1.to(BF16), b1, w2, b2)
    assert s.dtype == torch.float32 and s.shape == (1100, 8)
    torch.testing.assert_close(s, s_ref, atol=5e-2, rtol=0)


@needs_triton
@pytest.mark.parametrize("N", [None, 32])
def test_op_dispatch_rule(interpret, N: int | None) -> None:
    """surrogate_scores: the Triton kernel for linear and for MLP steps of <= TRITON_MAX_TOKENS
    tokens, cuBLAS above (decided at run time, on the real T)."""
    w1, b1, w2, b2 = make_weights(32, 4, N, seed=5)
    w1 = w1.to(BF16)
    for T in (ss.TRITON_MAX_TOKENS, ss.TRITON_MAX_TOKENS + 1):
        x = torch.randn(T, 32, generator=torch.Generator().manual_seed(T)).to(BF16)
        got = ss.surrogate_scores(x, w1, b1, w2, b2)
        triton_path = N is None or T <= ss.TRITON_MAX_TOKENS
        assert ss.use_triton(T, N is not None) == triton_path
        want = ss.scores_triton(x, w1, b1, w2, b2) if triton_path else ss.scores_cublas(x, w1, b1, w2, b2)
        assert torch.equal(got, want)
        s_ref = ss.scores_torch(x, w1, b1, w2, b2)
        torch.testing.assert_close(got, s_ref, atol=BF16_ATOL if triton_path else 5e-2, rtol=0)


def test_surrogate_casts_w1_once_per_dtype() -> None:
    from vllm_kvzap.scorers.checkpoint import SurrogateConfig
    from vllm_kvzap.scorers.surrogate import Surrogate

    config = SurrogateConfig(input_dim=24, output_dim=2, n_modules=3, hidden_dim=16)
    w = [torch.randn(*shape) for shape in ((3, 16, 24), (3, 16), (3, 2, 16), (3, 2))]
    sur = Surrogate(config, *w)
    w1_bf16 = sur.w1_as(BF16)
    assert w1_bf16.dtype == BF16 and torch.equal(w1_bf16, sur.w1.to(BF16))
    assert sur.w1_as(BF16) is w1_bf16  # cached, not cast per call
    assert sur.w1_as(FP32) is sur.w1
    sur.to("cpu", torch.float16)  # a move drops the cast copies; with a dtype, prepares that one
    assert sur._w1_by_dtype.keys() == {torch.float16}


@needs_triton
@pytest.mark.parametrize("N", [None, 40])
def test_triton_default_blocks_and_strided_bf16_input(interpret, N: int | None) -> None:
    T, D, H = 70, 72, 4
    w1, b1, w2, b2 = make_weights(D, H, N, seed=3)
    x = torch.randn(T, 2 * D).to(torch.bfloat16)[:, ::2]  # non-contiguous, bf16
    assert not x.is_contiguous()
    s = ss.scores_triton(x, w1, b1, w2, b2)  # w1 cast to bf16 per call
    s_ref = ss.scores_torch(x, w1.bfloat16(), b1, w2, b2)
    torch.testing.assert_close(s, s_ref, atol=BF16_ATOL, rtol=BF16_RTOL)


@needs_triton
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("N", [None, 20])
def test_ties_at_threshold_are_kept(interpret, impl: str, N: int | None) -> None:
    # Zero input weights: every token's score is exactly the output bias, so ties are exact.
    T, D, H = 19, 35, 5
    bias = torch.tensor([-4.0, -3.5, -4.5, -4.0, 0.0])
    if N is None:
        w1, b1, w2, b2 = torch.zeros(H, D), bias, None, None
    else:
        w1, b1, w2, b2 = torch.randn(N, D), torch.randn(N), torch.zeros(H, N), bias
    fn = ss.scores_torch if impl == "torch" else ss.scores_triton
    s = fn(torch.randn(T, D), w1, b1, w2, b2)
    assert torch.equal(s, bias.expand(T, H))
    k = rule_keep(s, -4.0)
    assert torch.equal(k, torch.tensor([True, True, False, True, True]).expand(T, H))


@needs_triton
def test_ties_on_computed_scores(interpret) -> None:
    # threshold = an actual (fp32) score: that entry and all at least as large are kept.
    T, D, N, H = 23, 30, 18, 3
    w1, b1, w2, b2 = make_weights(D, H, N, seed=7)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    s = ss.scores_triton(x, w1, b1, w2, b2, block_t=16, block_d=16, block_n=16)
    mid = int(s.flatten().argsort()[s.numel() // 2])  # the median score: some kept, some not
    t, h = divmod(mid, H)
    thr = float(s[t, h])
    s2 = ss.scores_triton(x, w1, b1, w2, b2, block_t=16, block_d=16, block_n=16)
    assert torch.equal(s2, s)  # deterministic: the same tokens score identically
    k2 = rule_keep(s2, thr)
    assert bool(k2[t, h])
    assert torch.equal(k2, s >= thr)
    assert 0 < k2.sum() < k2.numel()


@needs_triton
def test_triton_empty_input(interpret) -> None:
    w1, b1, w2, b2 = make_weights(24, 2, 16)
    s = ss.scores_triton(torch.empty(0, 24), w1, b1, w2, b2)
    assert s.shape == (0, 2) and s.dtype == torch.float32


@needs_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w1, b1, _, _ = make_weights(16, 2, None)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ss.scores_triton(torch.randn(3, 16), w1, b1, None, None)


@needs_triton
def test_triton_interpreter_in_fresh_process() -> None:
    """TRITON_INTERPRET=1 set before triton is imported: the standard interpreter path."""
    code = textwrap.dedent(
        """
        import torch
        from triton.runtime.interpreter import InterpretedFunction
        from vllm_kvzap.kernels import surrogate_score as ss

        assert isinstance(ss._surrogate_score_kernel, InterpretedFunction)
        g = torch.Generator().manual_seed(0)
        for T, D, N, H in [(37, 45, 30, 8), (20, 33, None, 2)]:
            x = torch.randn(T, D, generator=g)
            w1 = torch.randn(N or H, D, generator=g) / D**0.5
            b1 = torch.randn(N or H, generator=g)
            w2 = torch.randn(H, N, generator=g) / N**0.5 if N else None
            b2 = torch.randn(H, generator=g) if N else None
            s = ss.scores_triton(x, w1, b1, w2, b2, block_t=16, block_d=16, block_n=16)
            s_ref = ss.scores_torch(x, w1, b1, w2, b2)
            torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-5)
        print("OK")
        """
    )
    run_in_triton_interpreter(code)


@needs_triton
def test_triton_rejects_bad_block_sizes(interpret) -> None:
    w1, b1, _, _ = make_weights(16, 2, None)
    with pytest.raises(ValueError, match="block_d must be a power of two"):
        ss.scores_triton(torch.randn(3, 16), w1, b1, None, None, block_d=24)
