"""Multi-query associative recall embedded in redundant, language-like filler (a synthetic task).

Part of the recall-model experiment (``experiments/recall/``). A *context* mixes a few key-value
facts (``k17 v42 ;``), which cannot be reconstructed from anything else, with
redundant material that can: counting runs (``count : 5 6 7 8 .``), a phrase said several times in
a row (``the sun is warm today . the sun is warm today .``) and templated sentences
(``the red box is near the old door .``). Every key of the context is then asked for, in a random
order (``? k17 v42 ;``), and optionally the context is repeated after a ``<repeat>`` marker (the
"repeat the context" turn that KVzip+ targets use). A KV-pruning method that drops a fact's tokens
loses that answer; one that drops filler should not.

Everything is deterministic from a seed; the vocabulary is word-level (a few hundred tokens) and
``build_tokenizer()`` returns the matching Hugging Face fast tokenizer (with a tiny chat template)
so the trained model loads in transformers and vLLM offline. A whole example is::

    <|endoftext|> CONTEXT [<repeat> CONTEXT] <query> ? k17 v42 ; ? k3 v9 ; ... <|im_end|>

``make_example`` returns the token ids, the context span, the answer positions (the index of each
value token ``v42`` after ``? k17``: the model predicts it at the key's position) and per-token
kinds of the context (``fact``/``filler``/``punct``) for later analysis.

Facts read ``k17 v42 ;`` (``value_first``: ``v42 k17 ;``), so answering is an induction-head
pattern (find the earlier ``k17``, copy what followed it), the same skill as the repeat turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = [
    "BOS",
    "CHAT_TEMPLATE",
    "EOS",
    "N_KEYS",
    "N_NUMBERS",
    "N_VALUES",
    "PAD",
    "QUERY",
    "REPEAT",
    "SPECIAL_TOKENS",
    "TOKEN_TO_ID",
    "VOCAB",
    "Example",
    "build_tokenizer",
    "decode",
    "encode",
    "make_context",
    "make_example",
    "query_prompt",
    "write_corpus",
]

N_KEYS = 64
N_VALUES = 64
N_NUMBERS = 100

PAD = "<|endoftext|>"
BOS = "<|endoftext|>"
EOS = "<|im_end|>"
REPEAT = "<repeat>"
QUERY = "<query>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", REPEAT, QUERY]

PUNCT = ["=", ";", "?", "->", ".", ":", ","]
ROLES = ["system", "user", "assistant"]

_ADJ = ["red", "old", "big", "small", "green", "quiet", "bright", "dark", "warm", "cold"]
_NOUN = ["box", "door", "cat", "dog", "tree", "house", "river", "lamp", "road", "book", "bird",
         "stone"]
_PREP = ["near", "under", "behind", "above", "beside", "inside"]
_PHRASES = [
    "the sun is warm today .",
    "we walk to the market .",
    "the rain falls on the hill .",
    "a bird sings in the tree .",
    "the clock says it is late .",
    "my friend reads a long book .",
    "the wind moves the grass .",
    "we count the stars at night .",
]
_WORDS = sorted(
    set(_ADJ + _NOUN + _PREP + " ".join(_PHRASES).split() + ["the", "is", "count", "a"])
    - set(PUNCT)
)

VOCAB: list[str] = (
    SPECIAL_TOKENS
    + PUNCT
    + ROLES
    + [f"k{i}" for i in range(N_KEYS)]
    + [f"v{i}" for i in range(N_VALUES)]
    + [str(i) for i in range(N_NUMBERS)]
    + _WORDS
)
assert len(VOCAB) == len(set(VOCAB)), "duplicate vocabulary entries"
TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + ' ' + message['content'] + ' <|im_end|> ' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant ' }}{%- endif %}"
)


def encode(tokens: list[str]) -> list[int]:
    return [TOKEN_TO_ID[t] for t in tokens]


def decode(ids: list[int]) -> list[str]:
    return [VOCAB[i] for i in ids]


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


def _counting(rng: random.Random) -> list[str]:
    n = rng.randint(4, 9)
    start = rng.randint(0, N_NUMBERS - n)
    return ["count", ":"] + [str(start + i) for i in range(n)] + ["."]


def _phrase(rng: random.Random) -> list[str]:
    return rng.choice(_PHRASES).split() * rng.randint(2, 3)


def _template(rng: random.Random) -> list[str]:
    p = rng.choice
    return ["the", p(_ADJ), p(_NOUN), "is", p(_PREP), "the", p(_ADJ), p(_NOUN), "."]


_FILLERS = (_counting, _phrase, _template)


def make_context(
    rng: random.Random, n_pairs: int, n_filler: int, value_first: bool = False
) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(context tokens, [(key, value)] in context order, per-token kind: fact/filler/punct).

    Facts read ``k17 v42 ;``, or ``v42 k17 ;`` with ``value_first`` (same random draws)."""
    if not 1 <= n_pairs <= N_KEYS:
        raise ValueError(f"n_pairs must be in 1..{N_KEYS}")
    keys = rng.sample(range(N_KEYS), n_pairs)  # distinct: each key appears exactly once
    pairs = [(f"k{k}", f"v{rng.randrange(N_VALUES)}") for k in keys]
    segments: list[tuple[str, list[str]]] = [
        ("fact", [v, k, ";"] if value_first else [k, v, ";"]) for k, v in pairs
    ]
    segments += [("filler", rng.choice(_FILLERS)(rng)) for _ in range(n_filler)]
    # Shuffle, keeping the facts in their sampled order (so `pairs` is in context order).
    order = list(range(len(segments)))
    rng.shuffle(order)
    fact_slots = sorted(i for i, s in enumerate(order) if s < n_pairs)
    for slot, fact_idx in zip(fact_slots, range(n_pairs), strict=True):
        order[slot] = fact_idx
    tokens: list[str] = []
    kinds: list[str] = []
    for s in order:
        kind, toks = segments[s]
        tokens += toks
        if kind == "fact":
            kinds += ["fact", "fact", "punct"]
        else:
            kinds += ["punct" if t in PUNCT else "filler" for t in toks]
    return tokens, pairs, kinds


@dataclass
class Example:
    """One sequence: ``ids`` and where things are in it (all positions index ``ids``)."""

    ids: list[int]
    context: tuple[int, int]  # [start, end) of the (first) context
    repeat: tuple[int, int] | None  # [start, end) of the repeated context, after <repeat>
    answer_positions: list[int]  # positions of the value tokens answering the queries
    answers: list[int]  # ids[answer_positions]
    pairs: list[tuple[str, str]]  # (key, value) in context order
    query_keys: list[str]  # in query order
    kinds: list[str] = field(default_factory=list)  # per context token: fact / filler / punct

    @property
    def context_ids(self) -> list[int]:
        return self.ids[self.context[0] : self.context[1]]


def make_example(
    seed: int,
    n_pairs: int = 16,
    n_filler: int = 24,
    n_queries: int | None = None,
    with_repeat: bool = False,
    value_first: bool = False,
) -> Example:
    """A deterministic example from ``seed``: BOS context [<repeat> context] <query> queries EOS.

    ``n_queries`` (default all) distinct keys of the context are asked for, in random order.
    """
    rng = random.Random(seed)
    ctx, pairs, kinds = make_context(rng, n_pairs, n_filler, value_first)
    n_q = n_pairs if n_queries is None else min(n_queries, n_pairs)
    asked = rng.sample(pairs, n_q)
    toks = [BOS] + ctx
    context = (1, 1 + len(ctx))
    repeat = None
    if with_repeat:
        toks += [REPEAT]
        repeat = (len(toks), len(toks) + len(ctx))
        toks += ctx
    toks += [QUERY]
    answer_positions = []
    for k, v in asked:
        toks += ["?", k]
        answer_positions.append(len(toks))
        toks += [v, ";"]
    toks += [EOS]
    ids = encode(toks)
    return Example(
        ids=ids,
        context=context,
        repeat=repeat,
        answer_positions=answer_positions,
        answers=[ids[p] for p in answer_positions],
        pairs=pairs,
        query_keys=[k for k, _ in asked],
        kinds=kinds,
    )


def query_prompt(example: Example, i: int) -> list[int]:
    """Prompt ids for asking query ``i`` alone: BOS context <query> ? key (the answer is next)."""
    c1 = example.context[1]
    return example.ids[:c1] + encode([QUERY, "?", example.query_keys[i]])


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def build_tokenizer(model_max_length: int = 4096):
    """Word-level HF fast tokenizer over ``VOCAB`` (whitespace-split; decode joins with spaces)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_TO_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", REPEAT, QUERY],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="left",
    )


def write_corpus(out_dir, n: int, n_pairs: int, n_filler: int, seed_base: int) -> list[str]:
    """Write ``n`` contexts (seeds ``seed_base..``) as text files, one per file: the ``--data`` of
    ``training.train_surrogate`` (use its ``--repeat-format`` with the ``<repeat>`` marker)."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ex = make_example(seed_base + i, n_pairs, n_filler)
        path = out / f"context_{i:05d}.txt"
        path.write_text(" ".join(decode(ex.context_ids)) + "\n")
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m experiments.recall.recall_task",
                                 description="Print an example, or write a corpus of contexts.")
    ap.add_argument("--corpus", default=None, help="write contexts as .txt files into this folder")
    ap.add_argument("--n", type=int, default=600, help="contexts to write")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--filler", type=int, default=16)
    ap.add_argument("--seed-base", type=int, default=2_000_000_000,
                    help="first seed (training and held-out evaluation seeds lie below)")
    args = ap.parse_args(argv)
    if args.corpus is None:
        ex = make_example(0, n_pairs=4, n_filler=4, with_repeat=True)
        print(f"vocab size {len(VOCAB)}; example ({len(ex.ids)} tokens):")
        print(" ".join(decode(ex.ids)))
        return 0
    paths = write_corpus(args.corpus, args.n, args.pairs, args.filler, args.seed_base)
    print(f"wrote {len(paths)} contexts to {args.corpus}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
