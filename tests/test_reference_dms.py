"""Checks of the independent DMS reference (tests/reference_dms.py) against transformers.

Everything here runs on CPU in float32 with a tiny random Qwen3ForCausalLM and random KVzap surrogates
(linear and MLP) written in the published checkpoint format by this file itself.

What is verified independently of the reference's own code:
* the dense forward and greedy generation against transformers' Qwen3ForCausalLM;
* prompt-only judgement against scores computed from a dense transformers forward;
* the full pruning history (prefill + decode) as a fixed point: transformers is run over the whole
  generated sequence with a per-layer, per-query-head additive mask derived from the rules and the
  reference's final mask; its logits must equal the reference's step logits, and the surrogate scores of
  its hidden states, thresholded by the rules, must give back exactly the reference's mask. By causality
  this fixed point is unique, so it pins the mask down completely;
* that masks act per KV head (with transformers' own GQA grouping, ``repeat_kv``), with a negative
  control showing the check notices a wrong head mapping.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402

try:
    from tests import reference_dms as ref
except ImportError:  # tests/ itself on sys.path (pytest rootdir-less layouts)
    import reference_dms as ref  # type: ignore[no-redef]

N_LAYERS, HIDDEN, N_HEADS, N_KV, HEAD_DIM, VOCAB = 3, 96, 4, 2, 32, 211


# --------------------------------------------------------------------------------------------------------
# Fixtures: tiny model + surrogates in the published format
# --------------------------------------------------------------------------------------------------------


def _make_model(out_dir, seed: int, n_layers: int = N_LAYERS, hidden: int = HIDDEN, tie: bool = False):
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        head_dim=HEAD_DIM,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        max_position_embeddings=512,
    )
    model = Qwen3ForCausalLM(cfg).float()
    # Larger-than-default random weights so that attention is peaked and logits are well separated
    # (greedy argmax is then robust to float noise, and pruning visibly changes the outputs).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif p.ndim == 2:
                p.normal_(0.0, 1.5 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out_dir)
    return out_dir


def _make_surrogate(out_dir, kind: str, seed: int, input_dim: int = HIDDEN, n_modules: int = N_LAYERS):
    g = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    hidden_dim = None if kind == "linear" else 24
    sd = {}
    for i in range(n_modules):
        if kind == "linear":
            sd[f"layers.{i}.weight"] = torch.randn(N_KV, input_dim, generator=g) / math.sqrt(input_dim)
            sd[f"layers.{i}.bias"] = -2.0 + 0.5 * torch.randn(N_KV, generator=g)
        else:
            sd[f"layers.{i}.0.weight"] = torch.randn(hidden_dim, input_dim, generator=g) / math.sqrt(input_dim)
            sd[f"layers.{i}.0.bias"] = 0.3 * torch.randn(hidden_dim, generator=g)
            sd[f"layers.{i}.2.weight"] = 2.0 * torch.randn(N_KV, hidden_dim, generator=g) / math.sqrt(hidden_dim)
            sd[f"layers.{i}.2.bias"] = -2.0 + 0.5 * torch.randn(N_KV, generator=g)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / "model.safetensors"))
    cfg = {
        "architectures": ["KVzapModel"],
        "model_type": "kvzap",
        "input_dim": input_dim,
        "output_dim": N_KV,
        "n_modules": n_modules,
        "hidden_dim": hidden_dim,
        "dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dms_ref")
    return {
        "model": _make_model(root / "model", seed=0),
        "tied": _make_model(root / "tied", seed=1, n_layers=2, hidden=64, tie=True),
        "linear": _make_surrogate(root / "KVzap-linear-tiny", "linear", seed=2),
        "mlp": _make_surrogate(root / "KVzap-mlp-tiny", "mlp", seed=3),
    }


_HF_CACHE: dict = {}


def _hf(path, attn="eager"):
    key = (str(path), attn)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    return _HF_CACHE[key]


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


class _TorchSurrogate(torch.nn.Module):
    """Test-side surrogate built from nn modules (independent of the reference's scoring code)."""

    def __init__(self, path):
        super().__init__()
        cfg = json.loads((path / "config.json").read_text())
        sd = load_file(str(path / "model.safetensors"))
        if cfg["hidden_dim"] is None:
            mods = [torch.nn.Linear(cfg["input_dim"], cfg["output_dim"]) for _ in range(cfg["n_modules"])]
        else:
            mods = [
                torch.nn.Sequential(
                    torch.nn.Linear(cfg["input_dim"], cfg["hidden_dim"]),
                    torch.nn.GELU(),  # exact erf GELU
                    torch.nn.Linear(cfg["hidden_dim"], cfg["output_dim"]),
                )
                for _ in range(cfg["n_modules"])
            ]
        self.layers = torch.nn.ModuleList(mods)
        self.load_state_dict(sd)

    @torch.no_grad()
    def forward(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        return self.layers[layer_idx](x.float())


# --------------------------------------------------------------------------------------------------------
# transformers forward with per-layer, per-KV-head masks
# --------------------------------------------------------------------------------------------------------

_MASKED: dict = {"allowed": None, "head_map": None}


def _masked_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention function for transformers: ignores its mask, uses _MASKED["allowed"][layer] instead.

    allowed[layer] is bool [H_kv, T, S]; it is expanded to query heads with head_map (query head ->
    KV head), then transformers' own eager attention (repeat_kv GQA) is applied.
    """
    allowed_kv = _MASKED["allowed"][module.layer_idx]  # [H_kv, T, S]
    allowed_q = allowed_kv[_MASKED["head_map"]]  # [H, T, S]
    add = torch.zeros(allowed_q.shape, dtype=query.dtype).masked_fill(~allowed_q, torch.finfo(query.dtype).min)
    return modeling_qwen3.eager_attention_forward(module, query, key, value, add[None], scaling, dropout=0.0)


AttentionInterface.register("dms_ref_masked", _masked_attention)
try:  # the mask builder needs a mask function for the custom implementation name
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    ALL_MASK_ATTENTION_FUNCTIONS.register("dms_ref_masked", eager_mask)
except Exception:  # pragma: no cover - depends on the transformers version
    pass


def _rule_allowed(masks, prompt_len: int, window: int, n: int, chunks=None):
    """Per layer bool [H_kv, n, n]: may query t see key p, given the final pruned masks.

    Key p is judged after the attention of the first step that ends past p + window (steps: the
    prompt at once, or its `chunks`, then one per generated token); its newest token is c(p)
    (dense prompt: max(P - 1, p + window)). If pruned, p is masked for every query t > c(p).
    """
    ends, total = [], 0
    for size in chunks or [prompt_len]:
        total += size
        ends.append(total)
    ends = torch.tensor(ends + list(range(prompt_len + 1, n + 1)))
    p = torch.arange(n)
    later = [ends[ends > q + window] for q in p.tolist()]  # steps ending past the window
    newest = torch.tensor([int(e.min()) - 1 if e.numel() else n for e in later])
    t = torch.arange(n)[:, None]
    causal = p[None, :] <= t
    judged_before = t > newest[None, :]  # [n, n]
    return [causal[None] & ~(mk[:, None, :] & judged_before[None]) for mk in masks]


@torch.no_grad()
def _hf_masked_run(model_dir, seq, allowed, head_map):
    """Teacher-forced transformers forward over seq with per-layer masks; returns logits and attn inputs."""
    model = _hf(model_dir, attn="dms_ref_masked")
    _MASKED["allowed"], _MASKED["head_map"] = allowed, head_map
    captured = {}
    hooks = [
        layer.input_layernorm.register_forward_hook(
            lambda mod, inp, out, i=i: captured.__setitem__(i, out[0].detach().clone())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        logits = model(torch.tensor([seq]), use_cache=False).logits[0]
    finally:
        for hk in hooks:
            hk.remove()
        _MASKED["allowed"] = None
    return logits, [captured[i] for i in range(len(model.model.layers))]


def _group_head_map():
    return torch.arange(N_HEADS) // (N_HEADS // N_KV)  # transformers' repeat_kv convention


# --------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["model", "tied"])
def test_dense_forward_matches_transformers(tiny, which):
    ids = _prompt(23, seed=10)
    got = ref.forward_dense_logits(tiny[which], ids)
    with torch.no_grad():
        want = _hf(tiny[which])(torch.tensor([ids])).logits[0]
    assert got.dtype == torch.float32 and got.shape == (23, VOCAB)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,window", [("linear", 4), ("mlp", 0), ("mlp", 6)])
def test_no_pruning_matches_transformers_generate(tiny, kind, window):
    ids = _prompt(12, seed=11)
    res = ref.dms_generate(tiny["model"], tiny[kind], ids, max_new_tokens=10, threshold=float("-inf"), window=window)
    with torch.no_grad():
        out = _hf(tiny["model"]).generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert res["output_ids"] == out.sequences[0, len(ids) :].tolist()
    assert len(res["logits"]) == 10
    for got, want in zip(res["logits"], out.logits):
        assert got.dtype == torch.float32 and got.shape == (VOCAB,)
        torch.testing.assert_close(got, want[0], atol=1e-4, rtol=1e-4)
    assert res["num_kv_tokens"] == len(ids) + 9
    assert res["pruned_fraction"] == 0.0
    assert res["pruned_fraction_per_layer"] == [0.0] * N_LAYERS
    assert all(mk.shape == (N_KV, len(ids) + 9) and not mk.any() for mk in res["pruned_mask"])


def _median_threshold(values: torch.Tensor) -> float:
    v = values.flatten().sort().values
    mid = v.numel() // 2
    return float((v[mid - 1] + v[mid]) / 2)  # midway between two scores: no ties with the threshold


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("window", [0, 3, 8])
def test_prompt_judgement_matches_dense_transformers_scores(tiny, kind, window):
    ids = _prompt(16, seed=12)
    P = len(ids)
    sur = _TorchSurrogate(tiny[kind])
    hf = _hf(tiny["model"])
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        scores = [
            sur(li, hf.model.layers[li].input_layernorm(out.hidden_states[li])[0]) for li in range(N_LAYERS)
        ]  # [P, H_kv] per layer
    thr = _median_threshold(torch.stack(scores))
    res = ref.dms_generate(tiny["model"], tiny[kind], ids, max_new_tokens=1, threshold=thr, window=window)
    assert res["num_kv_tokens"] == P
    torch.testing.assert_close(res["logits"][0], out.logits[0, -1], atol=1e-4, rtol=1e-4)
    judged = torch.arange(P) < P - window
    for li in range(N_LAYERS):
        torch.testing.assert_close(res["scores"][li], scores[li], atol=1e-4, rtol=1e-4)
        want = judged[None, :] & (scores[li].t() < thr)
        assert torch.equal(res["pruned_mask"][li], want), (li, res["pruned_mask"][li], want)
        assert res["pruned_fraction_per_layer"][li] == pytest.approx(want.sum().item() / (N_KV * P))
    assert res["pruned_fraction"] == pytest.approx(sum(res["pruned_fraction_per_layer"]) / N_LAYERS)
    assert any(mk.any() for mk in res["pruned_mask"]) or window >= P


@pytest.mark.parametrize(
    "kind,window,quantile",
    [("linear", 0, 0.5), ("linear", 2, 0.6), ("mlp", 3, 0.5), ("mlp", 5, 0.7), ("mlp", 0, None)],
)
def test_pruned_history_is_fixed_point_of_transformers_masked_forward(tiny, kind, window, quantile):
    ids = _prompt(10, seed=13)
    P, new = len(ids), 12
    sur = _TorchSurrogate(tiny[kind])
    if quantile is None:
        thr = float("inf")  # prunes every judged token: with window 0, each query sees only itself
    else:
        with torch.no_grad():
            hf = _hf(tiny["model"])
            hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
            dense = torch.stack(
                [sur(li, hf.model.layers[li].input_layernorm(hs[li])[0]) for li in range(N_LAYERS)]
            ).flatten()
        thr = float(dense.quantile(quantile)) + 1e-3
    res = ref.dms_generate(tiny["model"], tiny[kind], ids, max_new_tokens=new, threshold=thr, window=window)
    out = res["output_ids"]
    assert len(out) == new
    seq = ids + out[:-1]
    N = len(seq)
    assert res["num_kv_tokens"] == N
    masks = res["pruned_mask"]
    allowed = _rule_allowed(masks, P, window, N)
    logits, attn_in = _hf_masked_run(tiny["model"], seq, allowed, _group_head_map())

    # Logits of every generated token (prefill + each decode step) match the masked transformers run.
    want_logits = logits[P - 1 :]
    for i, got in enumerate(res["logits"]):
        torch.testing.assert_close(got, want_logits[i], atol=1e-4, rtol=1e-4)
    assert out == want_logits.argmax(-1).tolist()

    # The rules applied to transformers' scores give back exactly the reference's mask.
    judged = torch.arange(N) < N - window
    for li in range(N_LAYERS):
        s = sur(li, attn_in[li])  # [N, H_kv]
        torch.testing.assert_close(res["scores"][li], s, atol=1e-4, rtol=1e-4)
        near = (s - thr).abs() < 1e-5
        assert not near.any(), "a score lies on the threshold; change the seed"
        want = judged[None, :] & (s.t() < thr)
        assert torch.equal(masks[li], want), (li, masks[li].int(), want.int())
        assert res["pruned_fraction_per_layer"][li] == pytest.approx(want.sum().item() / (N_KV * N))

    # The case is not trivial: decode tokens got pruned, heads disagree, and the outputs changed.
    assert any(mk[:, P:].any() for mk in masks)
    if quantile is not None:
        assert any((mk[0] != mk[1]).any() for mk in masks)
    dense_logits = ref.forward_dense_logits(tiny["model"], seq)[P - 1 :]
    assert (torch.stack(res["logits"]) - dense_logits).abs().max() > 1e-2

    # Negative control: mapping query heads to the wrong KV head (h % H_kv instead of h // group)
    # changes the transformers logits, so the check above does see per-KV-head masking.
    if quantile is not None:
        wrong, _ = _hf_masked_run(tiny["model"], seq, allowed, torch.arange(N_HEADS) % N_KV)
        assert (wrong[P - 1 :] - want_logits).abs().max() > 1e-3


def test_masked_attention_is_per_kv_head(tiny):
    """Direct check on one layer: pruning a key for KV head 0 only changes exactly query heads 0..G-1."""
    m = ref.load_model(tiny["model"])
    torch.manual_seed(0)
    T = 7
    q = torch.randn(T, N_HEADS, HEAD_DIM)
    k = torch.randn(T, N_KV, HEAD_DIM)
    v = torch.randn(T, N_KV, HEAD_DIM)
    pos = torch.arange(T)
    pruned = torch.zeros(N_KV, T, dtype=torch.bool)
    base = m.attend(q, k, v, pos, pos, pruned).view(T, N_HEADS, HEAD_DIM)
    pruned[0, 2] = True
    got = m.attend(q, k, v, pos, pos, pruned).view(T, N_HEADS, HEAD_DIM)
    G = N_HEADS // N_KV
    # Rows < 2 never see key 2; heads of KV group 1 are untouched.
    torch.testing.assert_close(got[:2], base[:2])
    torch.testing.assert_close(got[:, G:], base[:, G:])
    assert (got[2:, :G] - base[2:, :G]).abs().amax(dim=-1).min() > 1e-6
    # Brute force for query head 0: softmax over its visible keys only.
    for t in range(T):
        keys = [p for p in range(t + 1) if p != 2]
        w = torch.softmax(torch.stack([q[t, 0] @ k[p, 0] for p in keys]) / math.sqrt(HEAD_DIM), dim=0)
        want = sum(wi * v[p, 0] for wi, p in zip(w, keys))
        torch.testing.assert_close(got[t, 0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_window_boundaries(tiny, kind):
    ids = _prompt(9, seed=14)
    P, new = len(ids), 7
    N = P + new - 1
    hf_out = _hf(tiny["model"]).generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, P, dtype=torch.long), max_new_tokens=new, do_sample=False
    )[0, P:].tolist()
    inf = float("inf")
    # A window holding the whole sequence protects everything, even with a threshold that prunes all.
    for window in (N, N + 5, 1000):
        res = ref.dms_generate(tiny["model"], tiny[kind], ids, max_new_tokens=new, threshold=inf, window=window)
        assert res["pruned_fraction"] == 0.0
        assert res["output_ids"] == hf_out
    # One token short: only token 0 leaves the window, at the last step (after its attention).
    res = ref.dms_generate(tiny["model"], tiny[kind], ids, max_new_tokens=new, threshold=inf, window=N - 1)
    assert res["output_ids"] == hf_out  # the last step still saw token 0
    for mk in res["pruned_mask"]:
        assert mk[:, 0].all() and not mk[:, 1:].any()
    assert res["pruned_fraction"] == pytest.approx(1.0 / N)
    # window = 0 with +inf: every token is judged after its own step, so everything is pruned.
    res = ref.dms_generate(tiny["model"], tiny[kind], ids, max_new_tokens=new, threshold=inf, window=0)
    assert all(mk.all() for mk in res["pruned_mask"])
    assert res["pruned_fraction"] == 1.0
    # The prefill is still dense, so the first token is the dense one.
    assert res["output_ids"][0] == hf_out[0]
    torch.testing.assert_close(res["logits"][0], ref.forward_dense_logits(tiny["model"], ids)[-1])


@pytest.mark.parametrize("window", [0, 4])
def test_prefix_consistency_step_by_step(tiny, window):
    """A shorter generation is the prefix of a longer one; its mask is the longer one restricted to the
    tokens judged by then (tokens are judged once and never change)."""
    ids = _prompt(11, seed=15)
    P = len(ids)
    long = ref.dms_generate(tiny["model"], tiny["mlp"], ids, max_new_tokens=10, threshold=-2.0, window=window)
    assert any(mk.any() for mk in long["pruned_mask"])
    for k in (1, 3, 6):
        short = ref.dms_generate(tiny["model"], tiny["mlp"], ids, max_new_tokens=k, threshold=-2.0, window=window)
        n = P + k - 1
        assert short["output_ids"] == long["output_ids"][:k]
        for a, b in zip(short["logits"], long["logits"][:k]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        judged = torch.arange(n) < n - window
        for ms, ml in zip(short["pruned_mask"], long["pruned_mask"]):
            assert torch.equal(ms, ml[:, :n] & judged[None])


def test_eos_stops_generation(tiny):
    ids = _prompt(8, seed=16)
    full = ref.dms_generate(tiny["model"], tiny["linear"], ids, max_new_tokens=8, threshold=-2.0, window=2)
    k = 3
    eos = full["output_ids"][k]
    first = full["output_ids"].index(eos)
    res = ref.dms_generate(
        tiny["model"], tiny["linear"], ids, max_new_tokens=8, threshold=-2.0, window=2, eos_token_id=eos
    )
    assert res["output_ids"] == full["output_ids"][: first + 1]
    assert len(res["logits"]) == first + 1
    assert res["num_kv_tokens"] == len(ids) + first
    res2 = ref.dms_generate(
        tiny["model"], tiny["linear"], ids, max_new_tokens=8, threshold=-2.0, window=2, eos_token_id=[VOCAB + 5, eos]
    )
    assert res2["output_ids"] == res["output_ids"]


def test_surrogate_shape_mismatch_is_rejected(tiny, tmp_path):
    bad = _make_surrogate(tmp_path / "bad", "linear", seed=4, input_dim=HIDDEN + 1)
    with pytest.raises(ValueError, match="does not fit"):
        ref.dms_generate(tiny["model"], bad, [1, 2, 3], max_new_tokens=2, threshold=-3.0, window=1)


def test_threshold_is_strict(tiny):
    """A score exactly equal to the threshold is kept (pruned iff score < threshold)."""
    ids = _prompt(9, seed=17)
    base = ref.dms_generate(tiny["model"], tiny["mlp"], ids, max_new_tokens=1, threshold=float("-inf"), window=0)
    s = base["scores"][1]  # layer 1, [P, H_kv]; prefill is dense so scores do not depend on the threshold
    thr = float(s[4, 1])  # exactly representable: float32 -> Python float is exact
    res = ref.dms_generate(tiny["model"], tiny["mlp"], ids, max_new_tokens=1, threshold=thr, window=0)
    assert torch.equal(res["scores"][1], s)
    assert not res["pruned_mask"][1][1, 4]
    assert torch.equal(res["pruned_mask"][1], (s < thr).t())


# --------------------------------------------------------------------------------------------------------
# Ratio mode (AdaKVPress): the prompt judged once at its end by tests/reference_adakv.py
# --------------------------------------------------------------------------------------------------------

try:
    from tests import reference_adakv as ref_adakv
except ImportError:  # tests/ itself on sys.path
    import reference_adakv as ref_adakv  # type: ignore[no-redef]


@pytest.mark.parametrize("kind,ratio,alpha", [("mlp", 0.5, 0.2), ("linear", 0.75, 0.0), ("mlp", 0.6, 1.0)])
def test_ratio_mode_masks_the_adakv_pairs_of_the_prompt(tiny, kind, ratio, alpha):
    ids = _prompt(14, seed=21)
    P, new = len(ids), 8
    res = ref.dms_generate(tiny["model"], tiny[kind], ids, max_new_tokens=new, ratio=ratio, alpha=alpha)
    N = res["num_kv_tokens"]
    assert N == P + new - 1
    masks = res["pruned_mask"]
    n_kept, _ = ref_adakv.counts(P, ratio, alpha)
    sur = _TorchSurrogate(tiny[kind])
    with torch.no_grad():
        hf = _hf(tiny["model"])
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    for li in range(N_LAYERS):
        # scores of the dense prompt (transformers), and the AdaKV rule's pairs on them
        dense = sur(li, hf.model.layers[li].input_layernorm(out.hidden_states[li])[0])
        torch.testing.assert_close(res["scores"][li][:P], dense, atol=1e-4, rtol=1e-4)
        want = ref_adakv.layer_pruned_mask(res["scores"][li][:P], ratio, alpha).t()
        assert torch.equal(masks[li][:, :P], want)
        assert not masks[li][:, P:].any()  # generated tokens are never pruned
        assert int(masks[li].sum()) == N_KV * (P - n_kept)
        assert res["prompt_pruned_fraction_per_layer"][li] == pytest.approx((P - n_kept) / P)
        assert res["pruned_fraction_per_layer"][li] == pytest.approx(N_KV * (P - n_kept) / (N_KV * N))
    if alpha == 1.0:
        assert all((~mk[:, :P]).sum(1).eq(n_kept).all() for mk in masks)
    # The prefill is dense; every later step sees the prompt minus the pruned pairs: a transformers run
    # masking exactly these pairs from the first generated token on gives the same logits and tokens.
    torch.testing.assert_close(res["logits"][0], out.logits[0, -1], atol=1e-4, rtol=1e-4)
    seq = ids + res["output_ids"][:-1]
    logits, _ = _hf_masked_run(tiny["model"], seq, _rule_allowed(masks, P, 0, N), _group_head_map())
    for i, got in enumerate(res["logits"]):
        torch.testing.assert_close(got, logits[P - 1 + i], atol=1e-4, rtol=1e-4)
    assert res["output_ids"] == logits[P - 1 :].argmax(-1).tolist()
    dense_logits = ref.forward_dense_logits(tiny["model"], seq)[P - 1 :]
    assert (torch.stack(res["logits"]) - dense_logits).abs().max() > 1e-3  # the pruning is visible


def test_ratio_mode_zero_baselines_and_errors(tiny):
    ids = _prompt(9, seed=22)
    dense = ref.dms_generate(tiny["model"], tiny["mlp"], ids, max_new_tokens=4, threshold=float("-inf"), window=0)
    zero = ref.dms_generate(tiny["model"], tiny["mlp"], ids, max_new_tokens=4, ratio=0.0)
    assert zero["output_ids"] == dense["output_ids"] and zero["pruned_fraction"] == 0.0
    # knorm in ratio mode: the rule over -||k|| of the prompt's keys
    kn = ref.dms_generate(tiny["model"], None, ids, max_new_tokens=3, method="knorm", ratio=0.5, alpha=0.2)
    for li, mk in enumerate(kn["pruned_mask"]):
        assert torch.equal(mk[:, : len(ids)], ref_adakv.layer_pruned_mask(kn["scores"][li][: len(ids)], 0.5, 0.2).t())
        assert not mk[:, len(ids) :].any()
    with pytest.raises(ValueError, match="excludes threshold"):
        ref.dms_generate(tiny["model"], tiny["mlp"], ids, max_new_tokens=2, threshold=-4.0, ratio=0.5)
    with pytest.raises(ValueError, match="not with method 'window'"):
        ref.dms_generate(tiny["model"], None, ids, max_new_tokens=2, method="window", ratio=0.5)
    with pytest.raises(ValueError, match="required"):
        ref.dms_generate(tiny["model"], tiny["mlp"], ids, max_new_tokens=2)


def test_ratio_mode_on_the_plugin_tiny_model(tiny_model_dir):
    """The same rule on the model the engine tests serve (tools/make_tiny_model.py)."""
    ids = list(range(3, 40))
    res = ref.dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], ids, max_new_tokens=3, ratio=0.7)
    P = len(ids)
    n_kept, _ = ref_adakv.counts(P, 0.7, 0.2)
    for li, mk in enumerate(res["pruned_mask"]):
        assert torch.equal(mk[:, :P], ref_adakv.layer_pruned_mask(res["scores"][li][:P], 0.7, 0.2).t())
        assert not mk[:, P:].any() and int(mk.sum()) == mk.shape[0] * (P - n_kept)


@pytest.mark.parametrize(
    "kind,window,chunks", [("mlp", 3, [7, 7, 10]), ("linear", 0, [5, 19]), ("mlp", 6, [8, 8, 8])]
)
def test_chunked_prefill_is_fixed_point_of_transformers_masked_forward(tiny, kind, window, chunks):
    """`prefill_chunks`: after each chunk, the prompt tokens older than the window are judged; the
    later chunks' queries do not see the pruned ones. Teacher-forced transformers with exactly
    those masks gives the same logits, and its scores give back the same pruned pairs."""
    ids = _prompt(sum(chunks), seed=17)
    P, new = len(ids), 6
    sur = _TorchSurrogate(tiny[kind])
    with torch.no_grad():
        hf = _hf(tiny["model"])
        hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
        dense = torch.stack(
            [sur(li, hf.model.layers[li].input_layernorm(hs[li])[0]) for li in range(N_LAYERS)]
        ).flatten()
    thr = float(dense.quantile(0.6)) + 1e-3
    res = ref.dms_generate(tiny["model"], tiny[kind], ids, max_new_tokens=new, threshold=thr,
                           window=window, prefill_chunks=chunks)  # fmt: skip
    seq = ids + res["output_ids"][:-1]
    N = len(seq)
    masks = res["pruned_mask"]
    allowed = _rule_allowed(masks, P, window, N, chunks)
    logits, attn_in = _hf_masked_run(tiny["model"], seq, allowed, _group_head_map())
    for i, got in enumerate(res["logits"]):
        torch.testing.assert_close(got, logits[P - 1 + i], atol=1e-4, rtol=1e-4)
    judged = torch.arange(N) < N - window
    for li in range(N_LAYERS):
        s = sur(li, attn_in[li])
        assert not ((s - thr).abs() < 1e-5).any(), "a score lies on the threshold; change the seed"
        assert torch.equal(masks[li], judged[None, :] & (s.t() < thr))
    # not trivial: a later chunk missed pairs pruned after an earlier one, which the dense rule
    # would have shown it, and the logits differ from those of a dense prompt
    dense_rule = _rule_allowed(masks, P, window, N)
    assert any((a[:, :P] != b[:, :P]).any() for a, b in zip(allowed, dense_rule))
    dense_prompt = ref.dms_generate(tiny["model"], tiny[kind], ids, max_new_tokens=1,
                                    threshold=thr, window=window)  # fmt: skip
    assert (dense_prompt["logits"][0] - res["logits"][0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="prefill_chunks"):
        ref.dms_generate(tiny["model"], tiny[kind], ids, 1, thr, window, prefill_chunks=[P - 1])
