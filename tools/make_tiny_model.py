"""Build a tiny, self-contained Qwen3 model and matching KVzap surrogates for tests and demos.

Part of the developer tooling (``tools/``), not of the installed plugin. No model hub is needed:

    python -m tools.make_tiny_model --out DIR [--seed 0] [--force] [--check-vllm]

writes, deterministically from ``--seed``:

- ``DIR/model``: a 4-layer ``Qwen3ForCausalLM`` with random weights in Hugging Face format
  (float32), with a byte-level BPE tokenizer trained here on a small built-in English corpus and a
  minimal Qwen-style chat template. It loads offline in transformers and in vLLM.
- ``DIR/KVzap-mlp-tiny-qwen3`` and ``DIR/KVzap-linear-tiny-qwen3``: random surrogates in the
  published KVzap checkpoint format (``vllm_kvzap.scorers.save_checkpoint``). Their random weights
  are calibrated on the tiny model's real self-attention inputs so that scores spread over about
  -8..0 around -4, with a per-(layer, head) offset: threshold -4 prunes roughly 30-70% of the KV
  pairs, varying across layers and heads.
- ``DIR/tiny_model.json``: seed, model shape and the pruned fractions measured on held-out text.

``make_tiny_model(out_dir, seed=0)`` does the same from Python and returns the paths.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

__all__ = [
    "MODEL_SUBDIR",
    "MLP_SUBDIR",
    "LINEAR_SUBDIR",
    "TINY_CONFIG",
    "CHAT_TEMPLATE",
    "make_tiny_model",
    "build_tokenizer",
    "capture_attention_inputs",
    "pruned_fraction",
    "qwen3_config",
    "sample_text",
    "save_hf_model",
]

MODEL_SUBDIR = "model"
MLP_SUBDIR = "KVzap-mlp-tiny-qwen3"
LINEAR_SUBDIR = "KVzap-linear-tiny-qwen3"
MANIFEST = "tiny_model.json"
FORMAT_VERSION = 1

# Model shape (vocab_size is taken from the trained tokenizer).
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=False,
)
TOKENIZER_VOCAB_SIZE = 1024
SURROGATE_MLP_HIDDEN = 512
THRESHOLD = -4.0

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# --------------------------------------------------------------------------------------------------
# Built-in corpus
# --------------------------------------------------------------------------------------------------

_PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. All that glitters is not gold, and not all those who wander are lost.",
    "Once upon a time there was a small village at the edge of a great forest. The people of the "
    "village were farmers, bakers and weavers, and every morning they walked to the market square.",
    "Language models read text as a sequence of tokens. Each layer of the model computes keys and "
    "values for every token, and the attention mechanism uses them to decide what matters later.",
    "The key value cache grows with the length of the context. Pruning the cache removes the pairs "
    "that are unlikely to be needed again, which saves memory and makes decoding faster.",
    "Question: What is the capital of France? Answer: The capital of France is Paris. "
    "Question: How many days are there in a week? Answer: There are seven days in a week.",
    "Please summarize the following document in three sentences. Repeat the previous context "
    "exactly. Explain your reasoning step by step, then give the final answer.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 512 1024 2048 4096 3.14 2.718 -1 +1 = 50%.",
    "Punctuation and symbols: ( ) [ ] { } < > , . ; : ! ? ' \" - _ / \\ | @ # $ % ^ & * ~ ` "
    "+ = \n\t",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
]

_SUBJECTS = (
    "the teacher, a young engineer, my neighbour, the old captain, a curious student, the tired "
    "doctor, our team, the small robot, a famous writer, the farmer, she, he, they, we, the "
    "scientist, a patient cat, the river, the city council, the model"
).split(", ")
_VERBS = (
    "reads, writes, builds, finds, remembers, forgets, explains, carries, paints, measures, "
    "repairs, discovers, opens, closes, follows, answers, counts, keeps"
).split(", ")
_OBJECTS = (
    "a long letter, the red door, an old map, the answer, a new bridge, the last train, a quiet "
    "garden, the secret number, three green apples, the morning news, a blue box, the first "
    "chapter, every question, the broken clock, a bright lamp, the key"
).split(", ")
_PLACES = (
    "in the kitchen, near the station, after dinner, before sunrise, at the library, on the "
    "hill, during the storm, under the bridge, at school, in the evening, by the sea, in the "
    "morning, at the market, inside the house, across the street"
).split(", ")
_CONNECTORS = ["and then", "because", "although", "while", "so", "but", "after that"]


def _sentence(rng: random.Random) -> str:
    pick = rng.choice
    s = f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_PLACES)}"
    if rng.random() < 0.4:
        s += f", {pick(_CONNECTORS)} {pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)}"
    if rng.random() < 0.15:
        s += f" {rng.randint(1, 9999)} times"
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])


def sample_text(seed: int, n_sentences: int = 60) -> str:
    """Deterministic English-like text (used for the tokenizer corpus, calibration and tests)."""
    rng = random.Random(seed)
    return " ".join(_sentence(rng) for _ in range(n_sentences))


def _corpus() -> list[str]:
    # Fixed corpus: the tokenizer does not depend on the model seed.
    texts = list(_PARAGRAPHS)
    texts += [sample_text(1000 + i, 40) for i in range(100)]
    return texts


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def build_tokenizer():
    """Train a byte-level BPE tokenizer on the built-in corpus (a transformers fast tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
        ],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        padding_side="left",
    )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def qwen3_config(shape: dict, tokenizer):
    """A float32 ``Qwen3Config`` of ``shape`` (a dict like ``TINY_CONFIG``) for ``tokenizer``
    (its size and special tokens); shared with ``experiments/recall/train_recall_model.py``."""
    from transformers import Qwen3Config

    cfg = dict(shape)
    rope_theta = cfg.pop("rope_theta")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        **cfg,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    config.dtype = torch.float32
    return config


def save_hf_model(model, tokenizer, out_dir: Path) -> None:
    """Save ``model`` and ``tokenizer`` in Hugging Face format, loadable by transformers and vLLM
    offline; generation stops at EOS or PAD. Shared with
    ``experiments/recall/train_recall_model.py``."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=[
            tokenizer.convert_tokens_to_ids(EOS_TOKEN),
            tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        ],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    # transformers 5 writes its internal class name; the generic alias is understood more widely.
    tok_cfg_path = Path(out_dir) / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


@torch.no_grad()
def _init_weights(model, gen: torch.Generator) -> None:
    """Random weights scaled so activations are O(1) and logits vary (std ~3), not near-uniform."""
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=gen))
        elif name.endswith("lm_head.weight"):
            p.copy_(torch.randn(p.shape, generator=gen) * (3.0 / p.shape[1] ** 0.5))
        elif p.ndim == 2:  # projections: std 1/sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        elif name.endswith("bias"):
            p.zero_()
        else:
            raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")


def _build_model(tokenizer, seed: int):
    from transformers import Qwen3ForCausalLM

    config = qwen3_config(TINY_CONFIG, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    _init_weights(model, gen)
    model.to(torch.float32).eval()
    return model


def capture_attention_inputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Run ``model`` on ``input_ids`` [B, T]; return each layer's self-attention input [B*T, D]."""
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(idx):
        def hook(module, args, kwargs):
            hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[idx] = hs.detach().reshape(-1, hs.shape[-1]).float().clone()

        return hook

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(model.model.layers))]


def _tokens(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            raise ValueError(f"calibration text too short: {len(ids)} < {length} tokens")
        rows.append(ids[:length])
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Surrogates
# --------------------------------------------------------------------------------------------------


def _raw_scores(x: torch.Tensor, w1, b1, w2=None, b2=None) -> torch.Tensor:
    h = x @ w1.T + b1
    if w2 is None:
        return h
    return torch.nn.functional.gelu(h, approximate="none") @ w2.T + b2


def _make_surrogate(kind: str, attn_inputs: list[torch.Tensor], n_kv: int, seed: int):
    """Random surrogate whose per-(layer, head) scores on ``attn_inputs`` have a chosen median/std.

    Directions are random; the last affine map of each head is rescaled and shifted so that on the
    calibration hidden states the head's scores have std in [1.5, 2.5] and median in -4 + [-1, 1].
    """
    from vllm_kvzap.scorers import SurrogateConfig

    d = attn_inputs[0].shape[1]
    n_layers = len(attn_inputs)
    hidden = SURROGATE_MLP_HIDDEN if kind == "mlp" else None
    gen = torch.Generator().manual_seed(seed * 1000 + (1 if kind == "mlp" else 2))
    state: dict[str, torch.Tensor] = {}
    for i, x in enumerate(attn_inputs):
        if kind == "mlp":
            w1 = torch.randn(hidden, d, generator=gen) / d**0.5
            b1 = 0.5 * torch.randn(hidden, generator=gen)
            w2 = torch.randn(n_kv, hidden, generator=gen) / hidden**0.5
            b2 = torch.zeros(n_kv)
        else:
            w1 = torch.randn(n_kv, d, generator=gen) / d**0.5
            b1 = torch.zeros(n_kv)
            w2 = b2 = None
        target_std = 1.5 + torch.rand(n_kv, generator=gen)
        target_median = THRESHOLD + (2.0 * torch.rand(n_kv, generator=gen) - 1.0)
        s = _raw_scores(x, w1, b1, w2, b2)  # [T, H]
        scale = target_std / s.std(dim=0).clamp_min(1e-6)
        shift = target_median - scale * s.median(dim=0).values
        if kind == "mlp":
            w2 = w2 * scale[:, None]
            b2 = b2 * scale + shift
            state[f"layers.{i}.0.weight"] = w1.contiguous()
            state[f"layers.{i}.0.bias"] = b1.contiguous()
            state[f"layers.{i}.2.weight"] = w2.contiguous()
            state[f"layers.{i}.2.bias"] = b2.contiguous()
        else:
            state[f"layers.{i}.weight"] = (w1 * scale[:, None]).contiguous()
            state[f"layers.{i}.bias"] = (b1 * scale + shift).contiguous()
    config = SurrogateConfig(
        input_dim=d, output_dim=n_kv, n_modules=n_layers, hidden_dim=hidden, dtype="float32"
    )
    return config, state


def _score_with_state(
    kind: str, state: dict[str, torch.Tensor], x: torch.Tensor, layer: int
) -> torch.Tensor:
    """Scores [T, H] of one layer straight from a published-format state dict."""
    if kind == "mlp":
        return _raw_scores(
            x,
            state[f"layers.{layer}.0.weight"],
            state[f"layers.{layer}.0.bias"],
            state[f"layers.{layer}.2.weight"],
            state[f"layers.{layer}.2.bias"],
        )
    return _raw_scores(x, state[f"layers.{layer}.weight"], state[f"layers.{layer}.bias"])


def pruned_fraction(
    score_fn, attn_inputs: list[torch.Tensor], threshold: float = THRESHOLD
) -> torch.Tensor:
    """Fraction of (token, head) scores strictly below ``threshold``, per layer and head: [L, H]."""
    return torch.stack(
        [(score_fn(x, i) < threshold).float().mean(dim=0) for i, x in enumerate(attn_inputs)]
    )


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

_MODEL_FILES = [
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
_SURROGATE_FILES = ["config.json", "model.safetensors"]


def _paths(out: Path) -> dict[str, Path]:
    return {"model": out / MODEL_SUBDIR, "mlp": out / MLP_SUBDIR, "linear": out / LINEAR_SUBDIR}


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out: Path) -> bool:
    p = _paths(out)
    return (
        all((p["model"] / f).is_file() for f in _MODEL_FILES)
        and all((p[k] / f).is_file() for k in ("mlp", "linear") for f in _SURROGATE_FILES)
        and _read_manifest(out) is not None
    )


def _build(out: Path, seed: int, verbose: bool) -> dict:
    from vllm_kvzap.scorers import save_checkpoint

    paths = _paths(out)
    tokenizer = build_tokenizer()
    model = _build_model(tokenizer, seed)
    save_hf_model(model, tokenizer, paths["model"])

    # Calibrate surrogates on the model's self-attention inputs for a few built-in texts, then
    # measure on held-out text.
    calib = capture_attention_inputs(
        model, _tokens(tokenizer, [sample_text(seed * 7 + k, 80) for k in range(4)], 256)
    )
    held_out = capture_attention_inputs(
        model, _tokens(tokenizer, [sample_text(10_000 + seed, 120)], 512)
    )
    n_kv = model.config.num_key_value_heads
    fractions = {}
    for kind in ("mlp", "linear"):
        cfg, state = _make_surrogate(kind, calib, n_kv, seed)
        save_checkpoint(paths[kind], cfg, state)
        score_fn = functools.partial(_score_with_state, kind, state)
        frac = pruned_fraction(score_fn, held_out)
        scores = torch.cat([score_fn(x, i) for i, x in enumerate(held_out)])
        fractions[kind] = {
            "mean": round(frac.mean().item(), 4),
            "per_layer_head": [[round(v, 4) for v in row] for row in frac.tolist()],
            "score_p05_p50_p95": [
                round(v, 3)
                for v in torch.quantile(scores.flatten(), torch.tensor([0.05, 0.5, 0.95])).tolist()
            ],
        }
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "model_config": {
            k: getattr(model.config, k)
            for k in ("vocab_size", *[k for k in TINY_CONFIG if k != "rope_theta"])
        },
        "threshold": THRESHOLD,
        "pruned_fraction_held_out": fractions,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def make_tiny_model(
    out_dir, seed: int = 0, force: bool = False, verbose: bool = False
) -> dict[str, Path]:
    """Create (or reuse) the tiny model and its surrogates under ``out_dir``; returns their paths.

    Reuses a complete output built with the same seed unless ``force``; refuses (ValueError) to
    overwrite a complete output made with another seed unless ``force``.
    """
    out = Path(out_dir).expanduser().resolve()
    paths = _paths(out)
    if _is_complete(out) and not force:
        manifest = _read_manifest(out)
        if manifest.get("seed") == seed and manifest.get("format_version") == FORMAT_VERSION:
            if verbose:
                print(
                    f"{out} already holds a complete tiny model (seed {seed}); "
                    "skipping (use --force to rebuild)"
                )
                _print_summary(out, manifest)
            return paths
        raise ValueError(
            f"{out} holds a tiny model built with seed={manifest.get('seed')} "
            f"(format {manifest.get('format_version')}), not seed={seed}; "
            "pass force=True / --force to overwrite"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir, then move into place: a half-written output is never "complete".
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _build(tmp, seed, verbose)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        for name in (MODEL_SUBDIR, MLP_SUBDIR, LINEAR_SUBDIR):
            if (out / name).exists():
                shutil.rmtree(out / name)
            (tmp / name).rename(out / name)
        (tmp / MANIFEST).rename(out / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        _print_summary(out, manifest)
    return paths


def _print_summary(out: Path, manifest: dict) -> None:
    paths = _paths(out)
    print(f"wrote tiny Qwen3 model (seed {manifest['seed']}): {paths['model']}")
    print("  config: " + ", ".join(f"{k}={v}" for k, v in manifest["model_config"].items()))
    for kind in ("mlp", "linear"):
        f = manifest["pruned_fraction_held_out"][kind]
        print(f"wrote {kind} surrogate: {paths[kind]}")
        print(
            f"  pruned fraction at threshold {manifest['threshold']} on held-out text: "
            f"mean {f['mean']:.3f}; "
            f"score p5/p50/p95 {f['score_p05_p50_p95']}"
        )
        for i, row in enumerate(f["per_layer_head"]):
            print(f"    layer {i}: " + " ".join(f"{v:.3f}" for v in row))
    print(f"wrote manifest: {out / MANIFEST}")


def check_vllm(paths: dict[str, Path]) -> None:
    """Load the tiny model in vLLM (offline, CPU-friendly settings), generate greedily from a text
    prompt and a chat, and compare the tokens with transformers' greedy decoding."""
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(paths["model"]),
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=256 * 1024 * 1024,  # on CPU: else gpu_memory_utilization ~0.5
        enforce_eager=True,
        seed=0,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=32)
    prompt = "The quick brown fox jumps over the lazy dog. Once upon a time"
    messages = [
        {"role": "system", "content": "You are tiny."},
        {"role": "user", "content": "Hello, who are you?"},
    ]
    text_out = llm.generate([prompt], sp)[0]
    chat_out = llm.chat(messages, sp)[0]
    print("vLLM generate:", repr(text_out.outputs[0].text))
    print("vLLM chat prompt:", repr(chat_out.prompt))
    print("vLLM chat:", repr(chat_out.outputs[0].text))

    model = AutoModelForCausalLM.from_pretrained(paths["model"]).eval()
    for name, out in (("generate", text_out), ("chat", chat_out)):
        ids = torch.tensor([list(out.prompt_token_ids)])
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=32, do_sample=False)[
                0, ids.shape[1] :
            ].tolist()
        got = list(out.outputs[0].token_ids)
        n_same = next(
            (i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b),
            min(len(got), len(ref)),
        )
        print(
            f"vLLM vs transformers greedy ({name}): "
            + ("identical" if got == ref else f"first {n_same} tokens agree")
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.make_tiny_model", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--force", action="store_true", help="rebuild even if DIR already holds a complete output"
    )
    ap.add_argument(
        "--check-vllm", action="store_true", help="afterwards load the model in vLLM and generate"
    )
    args = ap.parse_args(argv)
    try:
        paths = make_tiny_model(args.out, seed=args.seed, force=args.force, verbose=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check_vllm:
        check_vllm(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
