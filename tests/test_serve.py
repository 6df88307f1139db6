"""`vllm-kvzap serve` (vLLM's CLI; `vllm serve` on GPU builds) with `--kv-pruning` on loopback.

One server for the module, with vLLM's data parallelism (`--data-parallel-size 2`: one engine per
rank, each with its own scheduler, workers and pools, behind one API server): it answers through
the OpenAI-compatible API and writes each request's statistics line, naming the engine that
served it; concurrent requests are served by both engines, each pruning as the plain-torch DMS
reference does. Bad command lines end quickly with a one-line error and no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.reference_dms import dms_generate

STARTUP_TIMEOUT_S = 240


def cli() -> list[str]:
    script = Path(sys.executable).parent / "vllm-kvzap"
    assert script.exists(), "the vllm-kvzap console script is not installed (pip install -e .)"
    return [str(script)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def running_server(model_dir, tmp: Path, *extra: str):
    """`vllm-kvzap serve` of the tiny model with `kvzap-mlp` (window 16) on a free loopback port,
    until healthy; yields its base URL, statistics path and log."""
    stats_path = tmp / "stats.jsonl"
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [*cli(), "serve", str(model_dir["model"]),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 * 2**20),
         "--served-model-name", "tiny",
         "--kv-pruning", "kvzap-mlp", "--kv-pruning-window", "16",
         "--kv-pruning-surrogate", str(model_dir["mlp"]),
         "--kv-pruning-stats", str(stats_path), *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not become healthy in time")
            time.sleep(1)
        yield {"base": base, "stats_path": stats_path, "log": tmp / "server.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # eager: compilation is tested in test_compile.py; two engines start faster without it
    tmp = tmp_path_factory.mktemp("serve")
    with running_server(tiny_model_dir, tmp, "--data-parallel-size", "2", "--enforce-eager") as srv:
        yield srv


def wait_for_stats(path: Path, response_id: str, timeout_s: float = 30.0) -> dict:
    """The line of an API response: vLLM names a completion's n-th prompt `{id}-{n}`."""
    wanted = {response_id, f"{response_id}-0"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                stats = json.loads(line)
                if stats["request_id"] in wanted:
                    return stats
        time.sleep(0.2)
    raise AssertionError(f"no statistics line for {response_id} in {path}")


def test_completion_with_pruning_reports_statistics(server):
    prompt = "The river runs through the valley and the valley " * 12
    resp = post(
        f"{server['base']}/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True},
    )
    assert resp["usage"]["completion_tokens"] == 24
    stats = wait_for_stats(server["stats_path"], resp["id"])
    assert stats["num_prompt_tokens"] == resp["usage"]["prompt_tokens"]
    assert stats["num_output_tokens"] == 24
    assert len(stats["pruned_fraction_per_layer"]) == 4
    assert 0.1 < stats["pruned_fraction"] < 0.9


def test_chat_completion_with_pruning(server):
    resp = post(
        f"{server['base']}/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about rivers. " * 8}],
         "max_tokens": 8, "temperature": 0},
    )  # fmt: skip
    assert resp["choices"][0]["message"]["content"] is not None
    stats = wait_for_stats(server["stats_path"], resp["id"])
    assert stats["num_prompt_tokens"] == resp["usage"]["prompt_tokens"]


def test_per_request_threshold_through_vllm_xargs(server):
    body = {"model": "tiny", "prompt": "The river runs through the valley " * 12, "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    resp = post(f"{server['base']}/v1/completions", {**body, "vllm_xargs": {"kv_pruning": "none"}})
    stats = wait_for_stats(server["stats_path"], resp["id"])
    assert stats["pruned_fraction"] == 0.0  # the engine's -4 prunes this prompt (test above)
    assert stats["threshold"] == float("-inf") and stats["per_request"] is True


@pytest.mark.parametrize("bad", ["low", "inf"])
def test_bad_per_request_value_is_http_400(server, bad):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "vllm_xargs": {"kv_pruning": bad}}
    with pytest.raises(urllib.error.HTTPError) as e:
        post(f"{server['base']}/v1/completions", body)
    assert e.value.code == 400
    assert 'extra_args["kv_pruning"]' in json.loads(e.value.read())["error"]["message"]
    ok = post(f"{server['base']}/v1/completions", {**body, "vllm_xargs": {"kv_pruning": -5}})
    assert ok["usage"]["completion_tokens"] == 2


def test_prometheus_metrics_report_pruning(server):
    post(
        f"{server['base']}/v1/completions",
        {"model": "tiny", "prompt": "A long river. " * 40, "max_tokens": 16, "ignore_eos": True},
    )
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{server['base']}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        values: dict[str, dict[str, float]] = {}  # metric -> engine label -> value
        for line in text.splitlines():
            if line.startswith("vllm:kv_pruning_"):
                name, value = line.rsplit(" ", 1)
                engine = re.search(r'engine="(\d+)"', name).group(1)
                values.setdefault(name.split("{")[0], {})[engine] = float(value)
        total = {name: sum(by_engine.values()) for name, by_engine in values.items()}
        if total.get("vllm:kv_pruning_requests_total", 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert set(values["vllm:kv_pruning_requests_total"]) == {"0", "1"}  # one series per engine
    assert total["vllm:kv_pruning_requests_total"] >= 1
    assert total["vllm:kv_pruning_pruned_pairs_total"] > 0
    assert total["vllm:kv_pruning_kv_pairs_total"] > total["vllm:kv_pruning_pruned_pairs_total"]
    for engine, kv_pairs in values["vllm:kv_pruning_kv_pairs_total"].items():
        if kv_pairs:  # each engine's fraction is its own counters' ratio
            assert values["vllm:kv_pruning_pruned_fraction"][engine] == pytest.approx(
                values["vllm:kv_pruning_pruned_pairs_total"][engine] / kv_pairs
            )
    assert "vllm:kv_pruning_freed_kv_bytes" in values
    assert "vllm:kv_pruning_resident_kv_bytes" in values


DP_TOKENS = 16
DP_PROMPT_LENS = (30, 45, 60, 75, 90, 105)


@pytest.fixture(scope="module")
def concurrent(server, tiny_model_dir):
    """Six requests at once: the API server spreads them over both engines."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(10, 900, (n,), generator=g).tolist() for n in DP_PROMPT_LENS]

    def complete(ids):
        body = {"model": "tiny", "prompt": ids, "max_tokens": DP_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        resp = post(f"{server['base']}/v1/completions", body)
        return resp["choices"][0]["token_ids"], wait_for_stats(server["stats_path"], resp["id"])

    with ThreadPoolExecutor(len(prompts)) as pool:
        return prompts, list(pool.map(complete, prompts))


def test_both_engines_serve_and_their_lines_name_them(concurrent):
    _, results = concurrent
    assert {stats["engine"] for _, stats in results} == {0, 1}


def test_each_engine_prunes_as_the_reference(concurrent, tiny_model_dir):
    prompts, results = concurrent
    for prompt, (tokens, stats) in zip(prompts, results):
        ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], prompt, DP_TOKENS,
                           -4.0, 16)  # fmt: skip
        assert tokens == ref["output_ids"]
        ref_pairs = [int(m.sum()) for m in ref["pruned_mask"]]
        assert all(abs(a - b) <= 1 for a, b in zip(stats["pruned_pairs_per_layer"], ref_pairs))
        assert sum(ref_pairs) > 0


def test_help_lists_the_flags():
    out = subprocess.run(
        [*cli(), "serve", "--help=kv-pruning"], capture_output=True, text=True, timeout=180
    )
    for flag in ("--kv-pruning ", "--kv-pruning-threshold", "--kv-pruning-window",
                 "--kv-pruning-surrogate", "--kv-pruning-stats"):  # fmt: skip
        assert flag in out.stdout


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--kv-pruning", "kvzap-huge"], "invalid choice: 'kvzap-huge'"),
        (["--kv-pruning", "kvzap-mlp", "--kv-pruning-window", "-1"], "window must be >= 0"),
        (["--kv-pruning", "kvzap-mlp", "--kv-pruning-threshold", "low"], "threshold must be a number"),
        (["--kv-pruning", "kvzap-mlp", "--kv-pruning-surrogate", "/nonexistent/kvzap"], "/nonexistent/kvzap"),
        # a negative fractional threshold parses (the error is the surrogate's, not the number's)
        (["--kv-pruning", "kvzap-mlp", "--kv-pruning-threshold", "-2.5",
          "--kv-pruning-surrogate", "/nonexistent/kvzap"], "/nonexistent/kvzap"),
    ],
)  # fmt: skip
def test_bad_command_lines_fail_fast_and_clearly(tiny_model_dir, extra, needle):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [*cli(), "serve", str(tiny_model_dir["model"]), "--dtype", "float32",
         "--max-model-len", "512", *extra],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_console_script_on_path():
    assert shutil.which("vllm-kvzap", path=str(Path(sys.executable).parent))
