"""Tests of the recall task generator (experiments/recall/recall_task.py) and of the committed
recall model.

The committed model (``models/recall-qwen3/``, produced by
``python -m experiments.recall.train_recall_model``) is checked against the task's own answers:
unpruned held-out accuracy must stay >= 0.95.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.recall.recall_task import (
    EOS,
    QUERY,
    REPEAT,
    TOKEN_TO_ID,
    VOCAB,
    build_tokenizer,
    decode,
    make_example,
    query_prompt,
    write_corpus,
)

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "recall-qwen3"
SHAPES = [(1, 0), (2, 2), (5, 3), (16, 16), (30, 10)]


@pytest.mark.parametrize("n_pairs,n_filler", SHAPES)
def test_deterministic(n_pairs, n_filler):
    a = make_example(7, n_pairs, n_filler, with_repeat=True)
    b = make_example(7, n_pairs, n_filler, with_repeat=True)
    assert a == b
    c = make_example(8, n_pairs, n_filler, with_repeat=True)
    assert n_pairs == 1 and n_filler == 0 or a.ids != c.ids


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("n_pairs,n_filler", SHAPES)
def test_answers_determined_by_context(seed, n_pairs, n_filler):
    ex = make_example(seed, n_pairs, n_filler)
    ctx = decode(ex.context_ids)
    assert len(ex.query_keys) == n_pairs == len(set(ex.query_keys))
    for key, pos, ans in zip(ex.query_keys, ex.answer_positions, ex.answers, strict=True):
        assert ctx.count(key) == 1  # the queried key appears exactly once in the context
        i = ctx.index(key)
        assert TOKEN_TO_ID[ctx[i + 1]] == ans == ex.ids[pos]  # its value is the answer
        assert decode(ex.ids[pos - 2 : pos]) == ["?", key]
    # Every fact of the context is one of `pairs`; the kinds align with the context tokens.
    assert len(ex.kinds) == len(ctx)
    assert sum(k == "fact" for k in ex.kinds) == 2 * n_pairs
    assert ex.ids[-1] == TOKEN_TO_ID[EOS] and QUERY in decode(ex.ids)


def test_value_first_same_draws():
    a, b = make_example(5, 6, 6), make_example(5, 6, 6, value_first=True)
    assert a.pairs == b.pairs and a.answers == b.answers and len(a.ids) == len(b.ids)
    ctx = decode(b.context_ids)
    for k, v in b.pairs:
        assert ctx[ctx.index(k) - 1] == v


@pytest.mark.parametrize("seed", range(10))
def test_ids_in_vocab_and_tokenizer_round_trip(seed):
    tok = build_tokenizer()
    assert len(tok) == len(VOCAB)
    ex = make_example(seed, 8, 8, with_repeat=True)
    assert all(0 <= i < len(VOCAB) for i in ex.ids)
    text = " ".join(decode(ex.ids))
    assert tok(text, add_special_tokens=False)["input_ids"] == ex.ids
    assert tok.decode(ex.ids) == text


def test_chat_template():
    tok = build_tokenizer()
    ex = make_example(0, 3, 3)
    content = " ".join(decode(ex.context_ids))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.convert_ids_to_tokens(ids)[:2] == ["<|im_start|>", "user"]
    assert ids[2 : 2 + len(ex.context_ids)] == ex.context_ids
    assert tok.convert_ids_to_tokens(ids)[-2:] == ["<|im_start|>", "assistant"]


@pytest.mark.parametrize("seed", range(10))
def test_repeat_turn_reproduces_context(seed):
    ex = make_example(seed, 6, 6, with_repeat=True)
    r0, r1 = ex.repeat
    assert ex.ids[r0 - 1] == TOKEN_TO_ID[REPEAT]
    assert ex.ids[r0:r1] == ex.context_ids
    assert ex.ids[r1] == TOKEN_TO_ID[QUERY]
    # The answers are the same with or without the repeat turn.
    plain = make_example(seed, 6, 6)
    assert plain.answers == ex.answers and plain.context_ids == ex.context_ids


def test_query_prompt():
    ex = make_example(3, 5, 5)
    for i, pos in enumerate(ex.answer_positions):
        p = query_prompt(ex, i)
        assert p[: ex.context[1]] == ex.ids[: ex.context[1]]
        assert decode(p[-3:]) == [QUERY, "?", ex.query_keys[i]]
        assert ex.ids[pos] == ex.answers[i]


def test_corpus_and_repeat_format_locate_both_copies(tmp_path):
    """The surrogate trainer's ``--repeat-format`` builds the model's own repeat prompt from the
    corpus files: BOS context <repeat> context, with both copies found token for token."""
    from training.kvzip_targets import repeat_prompt

    tok = build_tokenizer()
    paths = write_corpus(tmp_path, 3, n_pairs=6, n_filler=5, seed_base=77)
    fmt = "<|endoftext|> {context} <repeat> {context}"
    for i, path in enumerate(paths):
        context = make_example(77 + i, 6, 5).context_ids
        ids, ctx, rep = repeat_prompt(tok, Path(path).read_text(), fmt)
        ids = ids[0].tolist()
        assert ids == [TOKEN_TO_ID["<|endoftext|>"], *context, TOKEN_TO_ID[REPEAT], *context]
        assert ids[ctx] == context and ids[rep] == context


@pytest.mark.parametrize("fmt", ["{context} <repeat>", "{context} {context} {context}", "x"])
def test_repeat_format_needs_two_placeholders(fmt):
    from training.kvzip_targets import repeat_prompt

    with pytest.raises(ValueError, match="exactly twice"):
        repeat_prompt(build_tokenizer(), "k1 v2 ;", fmt)


def test_train_surrogate_rejects_a_bad_repeat_format(tmp_path):
    from training.train_surrogate import main

    write_corpus(tmp_path / "corpus", 2, 4, 2, seed_base=5)
    argv = ["--model", str(MODEL_DIR), "--data", str(tmp_path / "corpus"), "--kind", "mlp",
            "--out", str(tmp_path / "out"), "--repeat-format", "<repeat> {context}"]
    with pytest.raises(SystemExit, match="--repeat-format: .*exactly twice"):
        main(argv)
    assert not (tmp_path / "out-targets").exists()  # refused before any work


def test_committed_model_accuracy():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.recall.train_recall_model import EVAL_SEED_BASE, STAGES

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert len(tok) == len(VOCAB)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    n_pairs, n_filler = STAGES[-1]
    exs = [make_example(EVAL_SEED_BASE + 10_000 + i, n_pairs, n_filler) for i in range(50)]
    T = max(len(e.ids) for e in exs)
    ids = torch.full((len(exs), T), TOKEN_TO_ID[EOS], dtype=torch.long)
    for b, e in enumerate(exs):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)  # right padding: causal, no mask needed
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)
    hits = [
        pred[b, p - 1].item() == e.ids[p] for b, e in enumerate(exs) for p in e.answer_positions
    ]
    acc = sum(hits) / len(hits)
    assert acc >= 0.95, acc
    info = json.loads((MODEL_DIR / "eval.json").read_text())
    assert info["answer_accuracy"] >= 0.95
