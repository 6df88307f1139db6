"""The GPU scripts' parts that run without a GPU: the benchmark refuses at once, its model and
surrogate have the published shapes, its threshold interpolation inverts a known curve; the
kernel check refuses at once and imports no vLLM (the GPU machine it is for has none)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from benchmarks.harness import (
    QWEN3_8B_CONFIG,
    QWEN3_8B_SURROGATE_HIDDEN,
    interpolate_thresholds,
)
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
    from benchmarks.harness import make_shape
    from vllm_kvzap.scorers import load_surrogate

    paths = make_shape(QWEN3_8B_CONFIG, tmp_path, QWEN3_8B_SURROGATE_HIDDEN)
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


def test_kernel_check_fails_fast_without_gpu_and_imports_no_vllm():
    # the GPU machine this script is for has no vLLM: neither it nor what it imports may need it
    code = (
        "import sys\n"
        "import benchmarks.gpu_kernel_check, vllm_kvzap.cache.page_table\n"
        "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')], 'vllm imported'\n"
        "sys.exit(benchmarks.gpu_kernel_check.main([]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "needs an NVIDIA GPU" in proc.stderr, proc.stderr[-2000:]
    assert "vllm imported" not in proc.stderr


def test_benchmark_flow_on_the_tiny_model(tiny_model_dir, tmp_path):
    """The benchmark's engine runs, on this CPU with the test model: plain vLLM, then one plugin
    engine that calibrates by per-request thresholds and serves the workload at -inf and at the
    calibrated threshold; the statistics of each batch are matched to its own requests."""
    from types import SimpleNamespace

    from benchmarks.gpu_benchmark import plot, print_table, run_plain, run_plugin
    from benchmarks.harness import make_prompts

    config = json.loads((tiny_model_dir["model"] / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    bytes_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    n, prompt_len, out_len = 6, 100, 24
    wl = dict(prompts=make_prompts(n, prompt_len, seed=0), output_lens=[out_len] * n,
              max_model_len=256, bytes_per_token=bytes_per_token,
              kv_bytes=3 * 256 * bytes_per_token)  # fmt: skip
    args = SimpleNamespace(dtype="float32", load_format="auto", plugin_block_size=None,
                           targets=[0.3])  # fmt: skip
    paths = {"model": tiny_model_dir["model"], "mlp": tiny_model_dir["mlp"]}
    plain = run_plain(paths, wl, args)
    grid = [-12.0, -8.0, -6.0, -5.0, -4.5, -4.0, -3.5, -3.0, -2.0]
    calibration, plugin = run_plugin(paths, wl, args, tmp_path / "stats.jsonl", grid=grid,
                                     calibration_output=out_len, window=16)  # fmt: skip
    assert plain["output_tokens"] == n * out_len
    fractions = calibration["fractions"]
    assert fractions[0] < 0.1 and fractions[-1] > 0.6, fractions  # the grid brackets the target
    (threshold,) = calibration["thresholds"]
    assert grid[0] < threshold < grid[-1]
    at_inf, at_target = plugin
    for level in plugin:
        assert level["output_tokens"] == n * out_len and level["stats_lines"] == n
    assert at_inf["threshold"] == float("-inf") and at_inf["pruned_fraction"] == 0.0
    assert at_target["threshold"] == threshold
    assert at_target["pruned_fraction"] == pytest.approx(0.3, abs=0.1)  # calibrated on the curve
    assert at_target["resident_kv_kib_peak"] < at_inf["resident_kv_kib_peak"]
    print_table([plain, *plugin])  # the report's table and plot take these results
    plot([plain, *plugin], tmp_path / "gpu_benchmark.png", "tiny")
    assert (tmp_path / "gpu_benchmark.png").stat().st_size > 0


def test_smoke_agreement_tolerates_near_ties_only():
    from benchmarks.gpu_smoke import agreement

    plain = [dict(tokens=[1, 2, 3], top=[{1: -0.1, 9: -2.5}, {2: -0.60, 8: -0.70}, {3: -0.2, 7: -3.0}])]
    flipped_at_tie = [dict(tokens=[1, 8, 4], top=[{1: -0.12}, {8: -0.6}, {4: -0.1}])]
    flipped_clear = [dict(tokens=[9, 2, 3], top=[{9: -0.1}, {2: -0.6}, {3: -0.2}])]
    drifted = [dict(tokens=[1, 2, 3], top=[{1: -0.5}, {2: -0.6}, {3: -0.2}])]
    assert agreement(plain, plain, 0.2, 0.1)["ok"]
    ok = agreement(plain, flipped_at_tie, 0.2, 0.1)
    assert ok["ok"] and ok["identical"] == 0 and ok["max_logprob_diff"] == pytest.approx(0.02)
    assert not agreement(plain, flipped_clear, 0.2, 0.1)["ok"]  # a 2.4-nat gap does not flip
    assert not agreement(plain, drifted, 0.2, 0.1)["ok"]  # log-probs off by 0.4


def test_smoke_flow_on_the_tiny_model(tiny_model_dir, tmp_path):
    """The GPU smoke check's flow, on this CPU with the test model (vLLM's CPU defaults): plain
    vLLM, then the plugin at -inf (must agree with it) and at a calibrated threshold (pruning
    active), and the worker's pools back at their full counts."""
    from benchmarks.gpu_smoke import check_smoke, verdict_line
    from benchmarks.harness import make_prompts

    engine = dict(model=str(tiny_model_dir["model"]), dtype="float32", max_model_len=256,
                  kv_cache_memory_bytes=64 * 2**20, seed=0, skip_tokenizer_init=True)  # fmt: skip
    grid = [-12.0, -8.0, -6.0, -5.0, -4.5, -4.0, -3.5, -3.0, -2.0]
    report = check_smoke(engine, str(tiny_model_dir["mlp"]), make_prompts(6, 100, seed=0), 24,
                         tmp_path / "stats.jsonl", grid=grid, target=0.5, window=16)  # fmt: skip
    assert report["passed"], report["checks"]
    assert report["agreement_at_inf"]["identical"] == 6  # fp32 on CPU: token for token
    assert report["pruned_fraction"] == pytest.approx(0.5, abs=0.15)
    line = verdict_line(report)
    assert line.startswith("SMOKE PASS") and "Model Runner V1" in line  # vLLM's CPU default
