"""Natural English text available offline, as training data for the real model's surrogates.

    python -m training.build_corpus [--out .cache/corpus]

Data flow: **text shipped with Python, its packages and Debian (this module)** -> one directory per
subset of ``*.txt`` documents -> ``python -m training.train_surrogate --data DIR DIR DIR`` (one
subset each; ``training/TRAINING.md`` has the command that trained the bundled surrogates).

Subsets (all read from the machine, nothing downloaded):

- ``python-docs``: the Python language reference and library topics that ``pydoc`` ships
  (``pydoc_data.topics``, Python Software Foundation licence), grouped 8 topics per document;
- ``package-readmes``: the long descriptions (README text) in the ``METADATA`` of every package
  installed in this Python environment (each under its own package's licence), one per document;
- ``licenses``: Debian's ``/usr/share/common-licenses`` (GPL, LGPL, Apache, MPL, ...), one per
  document (skipped when the directory is absent).

Documents are plain text in a fixed order, so the same environment rebuilds the same corpus;
``manifest.json`` records the documents and their sizes.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".cache" / "corpus"
LICENSES = Path("/usr/share/common-licenses")
TOPICS_PER_DOC = 8
MIN_CHARS = 2000  # shorter texts cannot make a 750-token prompt anyway


def python_docs() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    docs = []
    for i in range(0, len(names), TOPICS_PER_DOC):
        group = names[i : i + TOPICS_PER_DOC]
        docs.append((f"topics-{i // TOPICS_PER_DOC:02d}", "\n\n".join(topics[n] for n in group)))
    return docs


def package_readmes() -> list[tuple[str, str]]:
    docs = {}
    for dist in md.distributions():
        name = dist.metadata.get("Name")
        body = dist.metadata.get_payload() if dist.metadata else None
        if not name or not body or len(body) < MIN_CHARS:
            continue
        key = re.sub(r"[^A-Za-z0-9._-]", "_", name.lower())
        docs.setdefault(key, body.strip())
    return sorted(docs.items())


def licenses() -> list[tuple[str, str]]:
    if not LICENSES.is_dir():
        return []
    docs = []
    for path in sorted(LICENSES.iterdir()):
        if path.is_file() and not path.is_symlink():
            text = path.read_text(errors="replace").strip()
            if len(text) >= MIN_CHARS:
                docs.append((path.name, text))
    return docs


SUBSETS = {"python-docs": python_docs, "package-readmes": package_readmes, "licenses": licenses}


def build(out: Path = DEFAULT_DIR) -> dict:
    manifest = {}
    for subset, source in SUBSETS.items():
        folder = out / subset
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.txt"):
            old.unlink()
        docs = source()
        for i, (name, text) in enumerate(docs):
            (folder / f"{i:04d}-{name}.txt").write_text(text + "\n")
        manifest[subset] = {"documents": len(docs), "chars": sum(len(t) for _, t in docs),
                            "names": [n for n, _ in docs]}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args(argv)
    manifest = build(args.out)
    for subset, m in manifest.items():
        print(f"{subset:>16}: {m['documents']:4d} documents, {m['chars'] / 1e6:.2f} M characters")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
