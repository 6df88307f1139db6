"""Tests for the offline surrogate trainer (training/train_surrogate.py and the modules it drives).

- prompts: text is cut into prompts of the requested token lengths, test prompts first;
- targets: KVzip+ targets equal a slow recomputation from a separate transformers forward pass
  (``output_attentions=True``, values from ``v_proj``, ``W_O`` slices of ``o_proj``), in both
  normalisations;
- fitting: ridge and MLP recover planted relations; the MLP beats ridge on a non-linear one;
- CLI: a tiny run writes the published format, R^2 table/JSON/plot, resumes from its shards,
  refuses mismatched shards; ``load_surrogate`` scores equal the trainer's predictions; vLLM
  serves the tiny model with the trained surrogate and reports pruning (one eager engine, ~25 s).
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import json
import math
import random
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools.make_tiny_model import sample_text
from training import train_surrogate
from training.kvzip_targets import TargetStore, kvzip_plus_targets, load_model, repeat_prompt
from training.surrogate_data import cut_document, load_prompts, parse_hf_spec
from training.surrogate_fit import (
    FitConfig,
    fit_mlp,
    fit_ridge,
    fit_surrogate,
    predict,
    r2_per_head,
)
from vllm_kvzap.scorers import SurrogateConfig, load_surrogate

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# --------------------------------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir["model"])


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("texts")
    for k in range(2):
        (d / f"doc{k}.txt").write_text(sample_text(500 + k, 120))  # ~1.7k tokens each
    (d / "short.txt").write_text("Too short to make a prompt.")
    return d


def test_cut_document_spans():
    rng = random.Random(0)
    assert cut_document(10, 20, 30, rng) == []
    assert cut_document(25, 20, 30, rng) == [(0, 25)]
    spans = cut_document(1000, 20, 30, rng)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert all(20 <= e - s <= 30 for s, e in spans) and 1000 - spans[-1][1] < 20


def test_load_prompts_lengths_and_splits(tokenizer, text_dir):
    prompts = load_prompts([str(text_dir)], tokenizer, 60, 90, per_subset=6, test_per_subset=2)
    assert [p.split for p in prompts] == ["test"] * 2 + ["train"] * 6
    for p in prompts:
        assert 55 <= len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= 95
    glob_prompts = load_prompts([str(text_dir / "doc*.txt")], tokenizer, 60, 90, 6, 2)
    assert [p.text for p in prompts] == [p.text for p in glob_prompts]  # same files, same cuts
    assert prompts != load_prompts([str(text_dir)], tokenizer, 60, 90, 6, 2, seed=1)


def test_parse_hf_spec():
    assert parse_hf_spec("hf:org/ds") == ("org/ds", None, "train", "text")
    assert parse_hf_spec("hf:org/ds:cfg:validation:body") == ("org/ds", "cfg", "validation", "body")
    assert parse_hf_spec("hf:wikitext::test") == ("wikitext", None, "test", "text")
    with pytest.raises(ValueError):
        parse_hf_spec("hf:")


def test_hf_dataset_source_streams_rows(tokenizer, monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"body": sample_text(600 + k, 40), "id": k} for k in range(5)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    prompts = load_prompts(["hf:org/ds:cfg::body"], tokenizer, 60, 90, 3, 1)
    assert calls == [("org/ds", "cfg", "train", True)]
    assert [p.split for p in prompts] == ["test", "train", "train", "train"]
    assert all(p.subset == "hf:org/ds:cfg::body" for p in prompts)
    with pytest.raises(SystemExit, match="no column 'text'"):
        load_prompts(["hf:org/ds"], tokenizer, 60, 90, 3, 1)


# --------------------------------------------------------------------------------------- targets


def test_repeat_prompt_locates_both_copies(tokenizer):
    text = sample_text(3, 6)
    ids, ctx, rep = repeat_prompt(tokenizer, text)
    ids = ids[0].tolist()
    assert ids[ctx] == ids[rep] and ctx.stop <= rep.start
    assert tokenizer.decode(ids[ctx]) == text
    between = tokenizer.decode(ids[ctx.stop : rep.start])
    assert "Repeat the previous context exactly." in between and "assistant" in between


def slow_targets(model, input_ids, ctx, rep, layer, heads, tokens, query_norm):
    """log max_{j, h in group} a^h_ji ||W_O^h v_i|| / ||h_j||, one scalar at a time."""
    with torch.no_grad():
        out = model(input_ids=input_ids, output_attentions=True, output_hidden_states=True)
    cfg = model.config
    d = cfg.head_dim
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    blk = model.model.layers[layer]
    resid = out.hidden_states[layer][0]  # input of decoder layer `layer`
    x = blk.input_layernorm(resid)  # self-attention input
    v = blk.self_attn.v_proj(x).view(len(x), cfg.num_key_value_heads, d)  # Qwen3: no v norm
    h = x if query_norm == "attn_input" else resid
    attn = out.attentions[layer][0]
    result = {}
    for k in heads:
        for i in tokens:
            best = 0.0
            for g in range(group):
                qh = k * group + g
                w_o = blk.self_attn.o_proj.weight[:, qh * d : (qh + 1) * d]
                wov = torch.linalg.vector_norm(w_o @ v[i, k]).item()
                for j in range(rep.start, rep.stop):
                    best = max(best, attn[qh, j, i].item() * wov / h[j].norm().item())
            result[(k, i)] = math.log(best)
    return result, x


@pytest.mark.parametrize("query_norm", ["attn_input", "residual"])
def test_targets_equal_slow_recomputation(tiny_model_dir, tokenizer, query_norm):
    from transformers import AutoModelForCausalLM

    fast_model = load_model(str(tiny_model_dir["model"]))
    ref_model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir["model"], attn_implementation="eager"
    ).eval()
    input_ids, ctx, rep = repeat_prompt(tokenizer, sample_text(11, 5))
    xs, ys = kvzip_plus_targets(fast_model, input_ids, ctx, rep, query_norm)
    assert len(xs) == len(ys) == 4
    n_ctx = ctx.stop - ctx.start
    assert ys[0].shape == (n_ctx, 2) and xs[0].shape == (n_ctx, 128)
    tokens = [ctx.start, ctx.start + 7, ctx.stop - 1]
    for layer in (0, 3):
        ref, x_ref = slow_targets(ref_model, input_ids, ctx, rep, layer, (0, 1), tokens, query_norm)
        for (k, i), value in ref.items():
            assert ys[layer][i - ctx.start, k].item() == pytest.approx(value, abs=1e-4)
        torch.testing.assert_close(xs[layer], x_ref[ctx])
    if query_norm == "residual":  # the two normalisations really differ
        other = kvzip_plus_targets(fast_model, input_ids, ctx, rep, "attn_input")[1]
        assert not torch.allclose(other[1], ys[1], atol=1e-2)


# --------------------------------------------------------------------------------------- fitting


def planted_store(root: Path, fn, d=12, h=3, n_layers=2, shards=3, rows=1500, seed=0):
    """A TargetStore whose targets are ``fn(x, layer)``; test rows in one extra shard."""
    gen = torch.Generator().manual_seed(seed)
    store = TargetStore(root, {"num_layers": n_layers, "hidden_size": d, "num_kv_heads": h})
    for split, n_shards in (("train", shards), ("test", 1)):
        for k in range(n_shards):
            x = torch.randn(rows, d, generator=gen)
            xs = [x + 0.1 * layer for layer in range(n_layers)]
            ys = [fn(xl, layer) for layer, xl in enumerate(xs)]
            idx = torch.arange(rows)
            store.write(split, k, xs, ys, idx, idx)
    return store


def test_ridge_recovers_planted_linear_map(tmp_path):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 3, 12, generator=gen)
    b = torch.tensor([[-4.0, -6.0, -2.0], [-3.0, -5.0, -1.0]])
    noise = torch.Generator().manual_seed(2)

    def fn(x, layer):
        return x @ w[layer].T + b[layer] + 0.01 * torch.randn(len(x), 3, generator=noise)

    store = planted_store(tmp_path, fn)
    fit = fit_surrogate(store, "linear", FitConfig(alpha=1.0))
    assert fit["config"] == SurrogateConfig(12, 3, 2, None)
    assert fit["r2"].min() > 0.999
    for layer in range(2):
        torch.testing.assert_close(
            fit["state_dict"][f"layers.{layer}.weight"], w[layer], atol=5e-3, rtol=0
        )
        torch.testing.assert_close(
            fit["state_dict"][f"layers.{layer}.bias"], b[layer], atol=5e-3, rtol=0
        )
    # Ridge penalty as sklearn's Ridge: closed form on centred data, intercept unpenalised.
    x, y = store.layer("train", 0)
    x64, y64 = x.double(), y.double()
    xc, yc = x64 - x64.mean(0), y64 - y64.mean(0)
    alpha = 1e4
    w_ref = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(12, dtype=torch.float64), xc.T @ yc)
    heavy = fit_ridge(store.iter_layer("train", 0), alpha)
    torch.testing.assert_close(heavy.weight.double(), w_ref.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        heavy.bias.double(), y64.mean(0) - x64.mean(0) @ w_ref, atol=1e-5, rtol=1e-5
    )


def test_mlp_beats_linear_on_planted_nonlinear_relation(tmp_path):
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(2, 12, generator=gen) / 12**0.5

    def fn(x, layer):
        z = x @ u.T
        return torch.stack([z[:, 0] ** 2 - 5.0, z[:, 1].abs() - 3.0, (z[:, 0] * z[:, 1])], dim=1)

    store = planted_store(tmp_path, fn, n_layers=1, rows=2000)
    cfg = FitConfig(hidden_dim=64, epochs=15, batch_size=256)
    mlp = fit_surrogate(store, "mlp", cfg)
    linear = fit_surrogate(store, "linear", cfg)
    assert linear["r2"].max() < 0.1
    assert mlp["r2"].min() > 0.8, mlp["r2"]
    assert mlp["config"].hidden_dim == 64
    assert set(mlp["state_dict"]) == set(mlp["config"].expected_shapes())


def test_mlp_fits_planted_linear_map():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4000, 8, generator=gen)
    y = x @ torch.randn(8, 2, generator=gen) - 4.0
    net = fit_mlp(x[:3000], y[:3000], FitConfig(hidden_dim=64, epochs=20, batch_size=256))
    assert r2_per_head(y[3000:], predict(net, x[3000:])).min() > 0.99


# --------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def trained(tiny_model_dir, text_dir, tmp_path_factory):
    """One tiny MLP run and one linear run sharing the same target shards."""
    root = tmp_path_factory.mktemp("train")
    common = [
        "--model", str(tiny_model_dir["model"]), "--data", str(text_dir),
        "--targets", str(root / "targets"), "--min-tokens", "150", "--max-tokens", "220",
        "--tokens-per-prompt", "80", "--prompts-per-subset", "14", "--test-per-subset", "2",
        "--shard-size", "4", "--device", "cpu",
    ]  # fmt: skip
    mlp = ["--kind", "mlp", "--out", str(root / "mlp"), "--hidden-dim", "64", "--epochs", "4",
           "--batch-size", "128"]  # fmt: skip
    assert train_surrogate.main(common + mlp) == 0
    assert train_surrogate.main(common + ["--kind", "linear", "--out", str(root / "linear")]) == 0
    return {"root": root, "common": common, "mlp_args": mlp}


def test_cli_writes_published_format(trained):
    for kind, hidden in (("mlp", 64), ("linear", None)):
        out = trained["root"] / kind
        cfg = json.loads((out / "config.json").read_text())
        assert cfg == {
            "architectures": ["KVzapModel"], "model_type": "kvzap", "input_dim": 128,
            "output_dim": 2, "n_modules": 4, "hidden_dim": hidden, "dtype": "float32",
        }  # fmt: skip
        tensors = load_file(str(out / "model.safetensors"))
        expected = SurrogateConfig(128, 2, 4, hidden).expected_shapes()
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
        report = json.loads((out / "r2.json").read_text())
        assert report["kind"] == kind and len(report["r2_per_layer"]) == 4
        assert report["train_rows"] == 14 * 80 and report["test_rows"] == 2 * 80
        assert report["r2_mean"] == pytest.approx(sum(report["r2_per_layer"]) / 4)
        assert all(math.isfinite(v) and v <= 1 for v in report["r2_per_layer"])
        assert (out / "r2.png").is_file() == HAVE_MATPLOTLIB  # else skipped with a message


def test_cli_prints_r2_table(trained, capsys):
    # A rerun finds every shard and skips extraction (no model load), then fits again.
    store = TargetStore(trained["root"] / "targets")
    stamps = {p: p.stat().st_mtime_ns for p in store.shards("train") + store.shards("test")}
    assert len(stamps) == 4 + 1
    train_surrogate.main(
        trained["common"] + ["--kind", "linear", "--out", str(trained["root"] / "again")]
    )
    text = capsys.readouterr().out
    assert "all shards present" in text and "loading" not in text
    assert "layer     R^2" in text and " mean " in text
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    again = json.loads((trained["root"] / "again" / "r2.json").read_text())
    first = json.loads((trained["root"] / "linear" / "r2.json").read_text())
    assert again["r2_per_layer_head"] == first["r2_per_layer_head"]


def test_cli_resumes_missing_shard_identically(trained):
    store = TargetStore(trained["root"] / "targets")
    victim = store.shards("train")[1]
    before = victim.read_bytes()
    victim.unlink()
    train_surrogate.main(
        trained["common"] + ["--kind", "linear", "--out", str(trained["root"] / "resumed")]
    )
    assert victim.read_bytes() == before  # same prompts, same sampled tokens, same targets


def test_cli_refuses_shards_made_with_other_settings(trained):
    args = [a if a != "80" else "40" for a in trained["common"]]  # --tokens-per-prompt 40
    with pytest.raises(SystemExit, match="tokens_per_prompt: 80 vs now 40"):
        train_surrogate.main(args + ["--kind", "linear", "--out", str(trained["root"] / "x")])


def test_loaded_checkpoint_scores_equal_trainer_predictions(trained):
    store = TargetStore(trained["root"] / "targets")
    for kind in ("mlp", "linear"):
        out = trained["root"] / kind
        surrogate = load_surrogate(str(out))
        preds = load_file(str(out / "test_predictions.safetensors"))
        for layer in range(4):
            x, y = store.layer("test", layer)
            torch.testing.assert_close(preds[f"y.{layer}"], y)
            torch.testing.assert_close(surrogate.score(x, layer), preds[f"pred.{layer}"],
                                       atol=1e-5, rtol=1e-5)  # fmt: skip


def test_vllm_serves_the_trained_surrogate(trained, tiny_model_dir, tmp_path):
    from vllm import LLM, SamplingParams

    stats_path = tmp_path / "stats.jsonl"
    pruning = {"method": "kvzap-mlp", "surrogate": str(trained["root"] / "mlp"), "threshold": -4,
               "window": 16, "stats_path": str(stats_path)}  # fmt: skip
    # eager: the surrogate is what is new here; the compiled path of an MLP surrogate is tested
    # in test_engine_offline.py (compiled == eager, inductor code), and eager starts ~20 s faster
    llm = LLM(model=str(tiny_model_dir["model"]), dtype="float32", max_model_len=1024,
              kv_cache_memory_bytes=64 * 2**20, seed=0, enforce_eager=True,
              additional_config={"kv_pruning": pruning})  # fmt: skip
    try:
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        outs = llm.generate([sample_text(21, 12), sample_text(22, 6)], params)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines = stats_path.read_text().splitlines() if stats_path.exists() else []
            if len(lines) >= len(outs):
                break
            time.sleep(0.2)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    stats = [json.loads(line) for line in lines]
    assert len(stats) == 2
    for s in stats:
        assert len(s["pruned_fraction_per_layer"]) == 4
        assert 0.0 < s["pruned_fraction"] < 1.0  # the trained scores sit around -4 on this model
