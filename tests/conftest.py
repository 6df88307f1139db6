"""Shared pytest fixtures for the vllm-kvzap test suite.

Each section below belongs to one area of the project; keep them separate.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ==================================================================================================
# Every test starts from the same global RNG state, whatever ran before it
# ==================================================================================================


@pytest.fixture(autouse=True)
def _seeded_torch():
    import torch

    torch.manual_seed(0)


# ==================================================================================================
# Tiny model (tools/make_tiny_model.py)
# ==================================================================================================


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> dict[str, Path]:
    """Paths of the tiny Qwen3 model and its surrogates: {"model", "mlp", "linear"} -> Path.

    Built once per session (seed 0) into a temp dir, or into/from ``$TINY_MODEL_DIR`` when set
    (reused when it already holds a complete seed-0 build, e.g. one made by
    ``python -m tools.make_tiny_model --out $TINY_MODEL_DIR``).
    """
    from tools.make_tiny_model import make_tiny_model

    env_dir = os.environ.get("TINY_MODEL_DIR")
    out = Path(env_dir) if env_dir else tmp_path_factory.mktemp("tiny_model") / "tiny"
    return make_tiny_model(out, seed=0)
