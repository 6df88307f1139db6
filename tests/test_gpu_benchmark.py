"""The GPU benchmark's parts that run without a GPU: it refuses at once, its model and surrogate
have the published shapes, and its threshold interpolation inverts a known curve."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from benchmarks.gpu_benchmark import QWEN3_8B_CONFIG, SURROGATE_HIDDEN, interpolate_thresholds
from tests.interpreter import REPO_ROOT


def test_fails_fast_without_gpu():
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_benchmark"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "needs an NVIDIA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - t0 < 60  # before vLLM is imported or anything is written


def test_qwen3_8b_shape_and_published_surrogate_shape(tmp_path):
    from benchmarks.throughput_benchmark import make_shape
    from vllm_kvzap.scorers import load_surrogate

    paths = make_shape(QWEN3_8B_CONFIG, tmp_path, SURROGATE_HIDDEN)
    config = json.loads((paths["model"] / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"],
            config["num_attention_heads"], config["head_dim"]) == (36, 4096, 8, 32, 128)  # fmt: skip
    surrogate = load_surrogate(paths["mlp"])
    c = surrogate.config
    # NVIDIA's KVzap-mlp-Qwen3-8B: 36 modules of 4096 -> 512 -> 8
    assert (c.input_dim, c.hidden_dim, c.output_dim, c.n_modules) == (4096, 512, 8, 36)
    surrogate.check_compatible(hidden_size=4096, num_kv_heads=8, num_layers=36)


def test_interpolation_inverts_a_known_curve():
    grid = [-6.0, -5.0, -4.0, -3.0, -2.0]
    curve = [0.0, 0.2, 0.6, 0.8, 0.9]  # pruned fraction at each threshold, piecewise linear
    thresholds, notes = interpolate_thresholds(grid, curve, [0.5, 0.72, 0.2])
    assert thresholds == pytest.approx([-4.25, -3.4, -5.0])
    assert notes == []
    # a noisy dip is made monotone; targets out of range give the ends and a note
    thresholds, notes = interpolate_thresholds(grid, [0.0, 0.3, 0.25, 0.8, 0.9], [0.95, 0.0])
    assert thresholds == [-2.0, -6.0]
    assert len(notes) == 1 and "0.95" in notes[0]
    assert interpolate_thresholds(grid, [0.0, 0.3, 0.25, 0.8, 0.9], [0.3])[0] == [-5.0]
