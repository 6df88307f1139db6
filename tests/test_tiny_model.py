"""Tests for tools/make_tiny_model.py: the tiny Qwen3 model, its tokenizer, its random surrogates.

Fast (no vLLM): transformers loads what was written, the tokenizer round-trips text and applies the
chat template, builds are deterministic in the seed, and the surrogates fit the model and prune a
substantial but not total fraction of KV pairs at threshold -4 on real self-attention inputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tools import make_tiny_model as mtm
from vllm_kvzap.scorers import SurrogateCheckpointError, load_surrogate

THRESHOLD = -4.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model built once for this module (seed 0)."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    return mtm.make_tiny_model(out, seed=0)


@pytest.fixture(scope="module")
def tiny_seed1(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_seed1") / "out"
    return mtm.make_tiny_model(out, seed=1)


@pytest.fixture(scope="module")
def hf_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["model"])


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------------------------------- model


def test_returns_paths_and_files(tiny):
    assert set(tiny) == {"model", "mlp", "linear"}
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (tiny["model"] / name).is_file(), name
    for kind in ("mlp", "linear"):
        assert tiny[kind].name == f"KVzap-{kind}-tiny-qwen3"
        assert (tiny[kind] / "config.json").is_file()
        assert (tiny[kind] / "model.safetensors").is_file()


def test_config_matches_request(tiny, hf_model, tokenizer):
    cfg = hf_model.config
    assert type(hf_model).__name__ == "Qwen3ForCausalLM"
    assert cfg.model_type == "qwen3"
    assert cfg.architectures == ["Qwen3ForCausalLM"]
    for key, value in mtm.TINY_CONFIG.items():
        if key == "rope_theta":
            assert cfg.rope_parameters["rope_theta"] == value
        else:
            assert getattr(cfg, key) == value, key
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    raw = json.loads((tiny["model"] / "config.json").read_text())
    assert raw["dtype"] == "float32"
    assert all(p.dtype == torch.float32 for p in hf_model.parameters())
    assert all(t.dtype == torch.float32 for t in _tensors(tiny["model"]).values())
    gen = json.loads((tiny["model"] / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


def test_greedy_generation_is_not_degenerate(hf_model, tokenizer):
    ids = tokenizer("Once upon a time there was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=32, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) == 32
    assert len(set(new)) >= 8, new


# ------------------------------------------------------------------------------------ tokenizer

ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld — naïve café, Ærøskøbing, Ελληνικά, русский, עברית, العربية",
    "日本語のテキスト、中文文本，한국어 텍스트 🤖🚀👩‍👩‍👧 \u200b zero width",
    "  leading and trailing spaces \t tabs\nnew lines\r\n\n  ",
    "code: def f(x):\n    return {'a': [1, 2.5, -3e9]}  # comment",
    "\x00\x01 control chars \x7f and a lone accent \u0301",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|endoftext|>"
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] == tokenizer.convert_tokens_to_ids(tok)
    # No BOS/EOS added implicitly (Qwen style).
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]
    # English text compresses (BPE merges learned).
    text = "The teacher reads a long letter in the kitchen."
    assert len(tokenizer(text)["input_ids"]) < len(text.encode()) / 2


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "You are tiny."},
        {"role": "user", "content": "Hello, 世界!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are tiny.<|im_end|>\n"
        "<|im_start|>user\nHello, 世界!<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n"
        "<|im_start|>user\nAgain?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=False
    )
    assert no_prompt.endswith("<|im_end|>\n")
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert list(ids) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert list(ids).count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5


def test_chat_template_stored_in_tokenizer_config(tiny):
    cfg = json.loads((tiny["model"] / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == mtm.CHAT_TEMPLATE
    assert cfg["eos_token"] == "<|im_end|>"


# ---------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_tensors(tiny, tmp_path):
    again = mtm.make_tiny_model(tmp_path / "again", seed=0)
    for key in ("model", "mlp", "linear"):
        a, b = _tensors(tiny[key]), _tensors(again[key])
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (key, name)
    assert (tiny["model"] / "tokenizer.json").read_bytes() == (
        again["model"] / "tokenizer.json"
    ).read_bytes()
    assert (tiny["model"] / "config.json").read_text() == (
        again["model"] / "config.json"
    ).read_text()


def test_different_seed_gives_different_tensors(tiny, tiny_seed1):
    for key in ("model", "mlp", "linear"):
        a, b = _tensors(tiny[key]), _tensors(tiny_seed1[key])
        assert a.keys() == b.keys()
        differing = [n for n in a if a[n].shape == b[n].shape and not torch.equal(a[n], b[n])]
        assert any(n.endswith("weight") and "norm" not in n for n in differing), key
    # The tokenizer does not depend on the seed.
    assert (tiny["model"] / "tokenizer.json").read_bytes() == (
        tiny_seed1["model"] / "tokenizer.json"
    ).read_bytes()


def test_reuse_refuse_and_force(tiny_seed1, capsys):
    out = tiny_seed1["model"].parent
    model_file = tiny_seed1["model"] / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns
    assert mtm.make_tiny_model(out, seed=1) == tiny_seed1  # complete: reused
    assert model_file.stat().st_mtime_ns == mtime
    assert mtm.main(["--out", str(out), "--seed", "1"]) == 0
    assert "skipping" in capsys.readouterr().out
    with pytest.raises(ValueError, match="seed=1"):
        mtm.make_tiny_model(out, seed=2)
    assert mtm.main(["--out", str(out), "--seed", "2"]) == 2
    assert mtm.main(["--out", str(out), "--seed", "1", "--force"]) == 0
    printed = capsys.readouterr().out
    assert "wrote mlp surrogate" in printed and "pruned fraction" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model", "KVzap-mlp-tiny-qwen3", "KVzap-linear-tiny-qwen3", "tiny_model.json"]
    )
    assert not list(out.parent.glob(".out.tmp-*"))


# ----------------------------------------------------------------------------------- surrogates


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_surrogate_loads_and_fits_model(tiny, hf_model, kind):
    sur = load_surrogate(tiny[kind])
    cfg = hf_model.config
    assert sur.kind == kind
    assert sur.config.hidden_dim == (512 if kind == "mlp" else None)
    sur.check_compatible(cfg.hidden_size, cfg.num_key_value_heads, cfg.num_hidden_layers)
    with pytest.raises(SurrogateCheckpointError):
        sur.check_compatible(cfg.hidden_size, cfg.num_key_value_heads + 1, cfg.num_hidden_layers)
    raw = json.loads((tiny[kind] / "config.json").read_text())
    assert raw["model_type"] == "kvzap" and raw["architectures"] == ["KVzapModel"]


@pytest.fixture(scope="module")
def attn_inputs(hf_model, tokenizer):
    """Self-attention inputs of every layer on text not used for calibration."""
    text = (
        "Question: What is the capital of France? Answer: The capital of France is Paris. "
        + mtm.sample_text(424242, 80)
    )
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :400]
    assert ids.shape[1] >= 300
    xs = mtm.capture_attention_inputs(hf_model, ids)
    assert len(xs) == hf_model.config.num_hidden_layers
    return xs


def test_attention_inputs_are_rms_normalised(attn_inputs):
    for x in attn_inputs:
        rms = x.pow(2).mean(-1).sqrt()
        assert 0.5 < rms.mean().item() < 2.0


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_pruned_fraction_at_minus_4(tiny, attn_inputs, kind):
    sur = load_surrogate(tiny[kind])
    frac = mtm.pruned_fraction(sur.score, attn_inputs, THRESHOLD)  # [L, H]
    assert frac.shape == (4, 2)
    assert 0.1 < frac.mean().item() < 0.9, frac
    assert ((frac > 0.05) & (frac < 0.95)).all(), frac
    assert frac.max() - frac.min() > 0.05, frac  # varies across layers and heads
    scores = torch.cat([sur.score(x, i) for i, x in enumerate(attn_inputs)])
    assert -6.0 < scores.median().item() < -2.0
    assert scores.min().item() < -6.0 and scores.max().item() > -2.0


def test_conftest_fixture(tiny_model_dir):
    assert set(tiny_model_dir) == {"model", "mlp", "linear"}
    assert (tiny_model_dir["model"] / "config.json").is_file()
