"""Target-ratio decisions (`vllm_kvzap/scorers/adakv.py`) against the plain reference of kvpress's
AdaKVPress (`tests/reference_adakv.py`) and against kvpress's own code verbatim."""

from __future__ import annotations

import pytest
import torch

from vllm_kvzap.scorers.adakv import adakv_counts, adakv_keep, adakv_num_kept

try:
    from tests import reference_adakv as ref
except ImportError:  # tests/ itself on sys.path
    import reference_adakv as ref  # type: ignore[no-redef]


def _batch(lengths, L, H, seed, integer=False, T_max=None):
    g = torch.Generator().manual_seed(seed)
    T_max = T_max or max(lengths)
    if integer:  # few distinct values: many ties, within and across heads
        scores = torch.randint(-3, 1, (len(lengths), L, T_max, H), generator=g).float()
    else:
        scores = torch.randn(len(lengths), L, T_max, H, generator=g) * 2 - 4
    return scores, torch.tensor(lengths)


CASES = [
    # lengths, L, H
    ([17], 1, 1),
    ([1, 2, 3], 2, 2),
    ([40, 7, 1, 23], 3, 4),
    ([128, 5], 2, 8),
    ([64], 4, 3),
]


@pytest.mark.parametrize("lengths, L, H", CASES)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.72, 0.9, 0.99])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("integer", [False, True])
def test_matches_reference(lengths, L, H, ratio, alpha, integer):
    scores, lens = _batch(lengths, L, H, seed=len(lengths) * 31 + L * 7 + H, integer=integer)
    got = adakv_keep(scores, lens, ratio, alpha)
    want = ref.reference_keep(scores, lens, ratio, alpha)
    assert got.dtype == torch.bool and got.shape == scores.shape
    assert torch.equal(got, want)
    got_kvpress = adakv_keep(scores, lens, ratio, alpha, min_one=False)
    assert torch.equal(got_kvpress, ref.reference_keep(scores, lens, ratio, alpha, min_one=False))


@pytest.mark.parametrize("integer", [False, True])
def test_ratio_per_request(integer):
    lengths = [30, 1, 2, 57, 9]
    ratios = [0.0, 0.5, 0.9, 0.3, 0.75]
    scores, lens = _batch(lengths, 3, 4, seed=5, integer=integer, T_max=64)
    for r in (ratios, torch.tensor(ratios, dtype=torch.float64)):
        got = adakv_keep(scores, lens, torch.as_tensor(r, dtype=torch.float64), 0.2)
        assert torch.equal(got, ref.reference_keep(scores, lens, ratios, 0.2))
    # each request alone gives the same decisions as inside the batch
    for b, (T, r) in enumerate(zip(lengths, ratios)):
        alone = adakv_keep(scores[b : b + 1, :, :T], lens[b : b + 1], r, 0.2)
        assert torch.equal(alone, got[b : b + 1, :, :T])


def test_padding_is_never_kept_and_never_matters():
    scores, lens = _batch([5, 12], 2, 3, seed=7, T_max=16)
    poisoned = scores.clone()
    poisoned[0, :, 5:] = float("nan")
    poisoned[1, :, 12:] = float("inf")
    keep = adakv_keep(scores, lens, 0.5, 0.2)
    assert not keep[0, :, 5:].any() and not keep[1, :, 12:].any()
    assert torch.equal(adakv_keep(poisoned, lens, 0.5, 0.2), keep)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 7, 10, 33, 100, 1000])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_kept_count_rule(T, ratio, alpha):
    """Per layer exactly H * n_kept pairs are kept (n_safe <= n_kept always, so the safeguard never
    forces more); every head keeps at least n_safe, and its n_safe best pairs among them."""
    H, L = 4, 2
    scores, lens = _batch([T], L, H, seed=T)
    keep = adakv_keep(scores, lens, ratio, alpha)
    n_kept = 0 if ratio >= 1 else max(1, int(T * (1 - ratio)))
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 and n_kept > 0 else 0
    assert adakv_num_kept(T, ratio) == n_kept
    k, s = adakv_counts(lens, ratio, alpha)
    assert (int(k), int(s)) == (n_kept, n_safe)
    for layer in range(L):
        assert int(keep[0, layer].sum()) == H * n_kept
        per_head = keep[0, layer].sum(0)
        assert (per_head >= n_safe).all()
        best = scores[0, layer].topk(n_safe, dim=0).indices  # tie-free scores
        assert keep[0, layer].gather(0, best).all()
        if alpha == 1.0:  # every head keeps its own n_kept best: ScorerPress per head
            assert (per_head == n_kept).all()
            own = scores[0, layer].topk(n_kept, dim=0).indices
            assert keep[0, layer].gather(0, own).all()
        if alpha == 0.0:  # pure global bottom-k over the layer
            flat = scores[0, layer].flatten()
            cut = flat.sort().values[H * (T - n_kept) - 1] if T > n_kept else -float("inf")
            assert torch.equal(keep[0, layer], scores[0, layer] > cut)


def test_short_prompts():
    """T * (1 - R) < 1 still keeps one token's worth per layer (H pairs), and one pair per head
    when alpha > 0 (kvpress itself would keep nothing and protect nothing)."""
    H = 3
    scores = torch.tensor([[[[-1.0, -9.0, -5.0], [-2.0, -8.0, -7.0]]]])  # B=1, L=1, T=2, H=3
    keep = adakv_keep(scores, torch.tensor([2]), 0.9, 0.2)
    assert keep[0, 0].tolist() == [[True, False, True], [False, True, False]]  # each head's best
    keep0 = adakv_keep(scores, torch.tensor([2]), 0.9, 0.0)
    assert keep0[0, 0].tolist() == [[True, False, True], [True, False, False]]  # 3 best overall
    kvpress = adakv_keep(scores, torch.tensor([2]), 0.9, 0.2, min_one=False)
    assert not kvpress.any()  # int(2 * 0.1) = 0 kept
    one = adakv_keep(scores[:, :, :1], torch.tensor([1]), 0.5, 0.2)
    assert one.all()  # T = 1: the only token is kept in every head
    assert adakv_num_kept(1, 0.5) == 1 and adakv_num_kept(1, 0.5, min_one=False) == 0
    assert adakv_num_kept(10, 1.0) == 0 and adakv_num_kept(0, 0.5) == 0
    full = adakv_keep(scores, torch.tensor([2]), 1.0, 0.2)
    assert not full.any()  # R >= 1 prunes everything (the options refuse it)
    assert H == scores.shape[-1]


def test_ratio_zero_keeps_everything():
    scores, lens = _batch([9, 30], 2, 4, seed=3, integer=True)
    keep = adakv_keep(scores, lens, 0.0, 0.2)
    valid = torch.arange(30)[None, :] < lens[:, None]
    assert torch.equal(keep, valid[:, None, :, None].expand_as(keep))


def test_tie_rule():
    """Equal scores: the safeguard protects the earlier position of a head first; pruning takes
    the lower KV head first, then the earlier position (stable topk on kvpress's [H, T] layout)."""
    T, H = 4, 2
    scores = torch.zeros(1, 1, T, H)  # all equal
    # R = 0.5: n_kept = 2, prune 4 of 8. alpha = 0.5: n_safe = 1 per head (position 0 of each).
    keep = adakv_keep(scores, torch.tensor([T]), 0.5, 0.5)[0, 0]
    # candidates in head-major order: h0 t1, h0 t2, h0 t3, h1 t1, h1 t2, h1 t3 -> first 4 pruned
    assert keep.t().tolist() == [[True, False, False, False], [True, False, True, True]]
    # alpha = 0: no safeguard, head 0 pruned entirely first
    keep = adakv_keep(scores, torch.tensor([T]), 0.5, 0.0)[0, 0]
    assert keep.t().tolist() == [[False, False, False, False], [True, True, True, True]]
    # a lower score always goes before a tie: head 1 position 3 is the unique minimum
    scores[0, 0, 3, 1] = -1.0
    keep = adakv_keep(scores, torch.tensor([T]), 0.25, 0.0)[0, 0]  # n_kept = 3: prune 2
    assert keep.t().tolist() == [[False, True, True, True], [True, True, True, False]]


def test_safeguarded_pairs_survive_infinite_scores():
    """Safeguarded pairs are never pruned, even when other pairs score +inf (kvpress marks them with
    finfo.max, which +inf outranks; here they leave the candidates)."""
    scores = torch.full((1, 1, 10, 2), float("inf"))  # head 1: all +inf
    scores[0, 0, :, 0] = -float("inf")
    scores[0, 0, 7, 0] = 5.0  # head 0: one finite pair, its safeguarded best
    keep = adakv_keep(scores, torch.tensor([10]), 0.5, 0.2)[0, 0]  # n_kept 5, n_safe 1: prune 10
    assert keep[7, 0] and int(keep.sum()) == 10
    # kvpress's literal finfo.max marking would prune it: 5 -> finfo.max < +inf
    assert not ref.reference_keep(scores, torch.tensor([10]), 0.5, 0.2)[0, 0, 7, 0]


@pytest.mark.parametrize("seed", range(6))
def test_verbatim_kvpress_on_tie_free_scores(seed):
    """kvpress's compress, torch.topk and all, picks the same pairs when no scores tie and its
    counts equal the clamped ones (T * (1 - R) >= 1 and n_kept * A >= 1)."""
    g = torch.Generator().manual_seed(seed)
    T, H = [50, 200, 13, 1000, 77, 8][seed], [1, 2, 4, 8, 3, 2][seed]
    ratio, alpha = [0.5, 0.8, 0.3, 0.9, 0.6, 0.25][seed], [0.2, 0.2, 0.5, 0.1, 1.0, 0.0][seed]
    scores = torch.randn(1, H, T, generator=g)  # kvpress layout [bsz, H, k_len]
    masked = torch.zeros(H, T, dtype=torch.bool)
    _, heads, seqs = ref.kvpress_compress_indices(scores, ratio, alpha)
    masked[heads, seqs] = True
    keep = adakv_keep(scores.transpose(1, 2).unsqueeze(0), torch.tensor([T]), ratio, alpha)
    assert torch.equal(keep[0, 0].t(), ~masked)
    assert torch.equal(
        keep, adakv_keep(scores.transpose(1, 2).unsqueeze(0), torch.tensor([T]), ratio, alpha, min_one=False)
    )


def test_counts_use_python_float_arithmetic():
    lens = torch.tensor([10, 100, 1000, 7, 3])
    for r in (0.1, 0.3, 0.7, 0.9, 1 / 3, 0.123456789):
        k, s = adakv_counts(lens, r, 0.2)
        want = [ref.counts(int(T), r, 0.2) for T in lens]
        assert list(zip(k.tolist(), s.tolist())) == want


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="B, L, T_max, H"):
        adakv_keep(torch.zeros(3, 4), torch.tensor([3]), 0.5)
    with pytest.raises(ValueError, match="lengths"):
        adakv_keep(torch.zeros(1, 1, 4, 2), torch.tensor([5]), 0.5)
    with pytest.raises(ValueError, match="entries"):
        adakv_keep(torch.zeros(2, 1, 4, 2), torch.tensor([4]), 0.5)
