"""Training prompts for KVzap surrogates: text files or Hugging Face datasets -> bounded prompts.

Data flow: **--data sources -> prompts (this module)** -> KVzip+ targets in shards
(``kvzip_targets``) -> per-layer fit and R^2 (``surrogate_fit``) -> checkpoint
(``train_surrogate``).

Each ``--data`` source is one *subset* (kvpress: one Nemotron subset):

- a text file is one document; a directory holds one document per ``*.txt`` / ``*.md`` file
  (sorted); shell-style globs are expanded;
- ``hf:NAME[:CONFIG][:SPLIT][:COLUMN]`` streams rows of a Hugging Face dataset through
  ``datasets`` (optional dependency; split ``train`` and column ``text`` by default), e.g.
  ``hf:nvidia/Nemotron-Pretraining-Dataset-sample:Nemotron-CC-MATH``.

A document whose token count lies in ``[min_tokens, max_tokens]`` is one prompt (kvpress keeps
exactly those); a longer one is cut into consecutive prompts of random lengths in that range (the
tail shorter than ``min_tokens`` is dropped); a shorter one is skipped. The first
``test_per_subset`` prompts of a subset are its test split, the next ``per_subset`` its train split
(kvpress: ``head(n_test)`` then ``head(n_train)`` of the rest).
"""

from __future__ import annotations

import glob
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Prompt:
    subset: str
    split: str  # "train" | "test"
    text: str


def parse_hf_spec(source: str) -> tuple[str, str | None, str, str]:
    """``hf:NAME[:CONFIG][:SPLIT][:COLUMN]`` -> (name, config or None, split, column)."""
    parts = source.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 4:
        raise ValueError(f"bad dataset spec {source!r}: expected hf:NAME[:CONFIG][:SPLIT][:COLUMN]")
    parts += [""] * (4 - len(parts))
    name, config, split, column = parts
    return name, config or None, split or "train", column or "text"


def iter_documents(source: str) -> Iterator[str]:
    """Documents (strings) of one ``--data`` source, lazily."""
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError as e:
            raise SystemExit(
                f"--data {source}: the `datasets` package is needed for Hugging Face datasets "
                "(pip install datasets), or pass plain text files"
            ) from e
        name, config, split, column = parse_hf_spec(source)
        for row in datasets.load_dataset(name, config, split=split, streaming=True):
            if column not in row:
                raise SystemExit(f"--data {source}: no column {column!r} (columns: {list(row)})")
            yield row[column]
        return
    paths = (
        [Path(p) for p in sorted(glob.glob(source))] if glob.has_magic(source) else [Path(source)]
    )
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"--data {source}: no such file or directory")
    if not files:
        raise SystemExit(f"--data {source}: no {'/'.join(TEXT_SUFFIXES)} files found")
    for f in files:
        yield f.read_text(encoding="utf-8", errors="replace")


def cut_document(n_tokens: int, min_tokens: int, max_tokens: int, rng: random.Random):
    """Token spans ``(start, end)`` of the prompts cut from a document of ``n_tokens`` tokens."""
    if n_tokens < min_tokens:
        return []
    if n_tokens <= max_tokens:
        return [(0, n_tokens)]
    spans, start = [], 0
    while n_tokens - start >= min_tokens:
        end = min(start + rng.randint(min_tokens, max_tokens), n_tokens)
        spans.append((start, end))
        start = end
    return spans


def load_prompts(
    sources: list[str],
    tokenizer,
    min_tokens: int,
    max_tokens: int,
    per_subset: int,
    test_per_subset: int,
    seed: int = 0,
) -> list[Prompt]:
    """Test then train prompts of every subset, in order; deterministic in ``seed``."""
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}..{max_tokens}")
    prompts: list[Prompt] = []
    for k, source in enumerate(sources):
        rng = random.Random(seed * 7919 + k)
        wanted, got = test_per_subset + per_subset, 0
        for doc in iter_documents(source):
            ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
            for start, end in cut_document(len(ids), min_tokens, max_tokens, rng):
                text = tokenizer.decode(ids[start:end]).strip()
                split = "test" if got < test_per_subset else "train"
                prompts.append(Prompt(source, split, text))
                got += 1
                if got == wanted:
                    break
            if got == wanted:
                break
        if got < wanted:
            print(
                f"note: --data {source} gave {got} prompts of {min_tokens}..{max_tokens} tokens "
                f"(asked for {test_per_subset} test + {per_subset} train)"
            )
    return prompts


def prompts_digest(prompts: list[Prompt]) -> str:
    """Fingerprint of the prompt list (stored with the targets so a resumed run can check it)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p.subset}\0{p.split}\0{p.text}\0".encode())
    return h.hexdigest()[:16]
