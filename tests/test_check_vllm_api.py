"""tools/check_vllm_api.py: the installed vLLM passes; edited copies of it fail where they should.

Each failure case edits a copy of the files the check reads (`files_read`, ~35 files) and is
compared with the unedited copy: the edited symbol or override must pass there and fail after
the edit, and nothing else may change, so no case can pass vacuously.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import check_vllm_api as tool

REPO = Path(__file__).resolve().parent.parent
INSTALLED = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A copy of only the installed vLLM files the check reads: tmp/vllm/..."""
    root = tmp_path_factory.mktemp("vllm_copy")
    for rel in tool.files_read(INSTALLED):
        (root / "vllm" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(INSTALLED / rel, root / "vllm" / rel)
    return root


@pytest.fixture(scope="module")
def before(pristine) -> dict[str, list[str]]:
    """The failures of the unedited copy (none, once compat's table is right for 0.32)."""
    return failures(pristine)


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    """A fresh copy of `pristine` to edit."""
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def failures(source: Path, version: str | None = None) -> dict[str, list[str]]:
    """{symbol name or Class.method: problems} of the failing rows."""
    report, _ = tool.check(source, version)
    rows = {r["name"]: r for r in report["symbols"]}
    rows |= {f"{r['class']}.{r['method']}": r for r in report["overrides"]}
    return {name: r["problems"] for name, r in rows.items() if not r["ok"]}


def edit_def(path: Path, qualname: str, rename=None, drop=None, add=None) -> None:
    """Edit the signature of def `qualname` ("f" or "Class.f") in `path`: rename it, drop a
    parameter (one per line in vLLM's style), or add one before the closing parenthesis."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    scope = ast.parse(text)
    for part in qualname.split("."):
        scope = next(n for n in scope.body if getattr(n, "name", None) == part)
    start, end = scope.lineno - 1, scope.body[0].lineno - 1  # the signature's lines
    sig = lines[start:end]
    if rename:
        sig[0] = sig[0].replace(f"def {scope.name}(", f"def {rename}(")
    if drop:
        kept = [ln for ln in sig if not ln.strip().startswith((f"{drop}:", f"{drop}=", f"{drop},"))]
        assert len(kept) == len(sig) - 1, f"{drop} not on a line of its own in {qualname}"
        sig = kept
    if add:
        close = next(i for i, ln in enumerate(sig) if ln.lstrip().startswith(")"))
        sig.insert(close, f"        {add},\n")
    assert sig != lines[start:end]
    path.write_text("".join(lines[:start] + sig + lines[end:]))


def test_installed_vllm_passes(tmp_path):
    report, _ = tool.check(INSTALLED)
    assert report["ok"], tool.render(report)
    assert report["vllm_version"].startswith("0.32")
    assert len(report["symbols"]) == len(tool.compat.SYMBOLS)
    methods = {f"{r['class']}.{r['method']}" for r in report["overrides"]}
    assert {
        "KVzapTritonAttentionImpl.forward",
        "KVzapCPUAttentionBackendImpl.do_kv_cache_update",
        "KVzapBlockManager.allocate_new_blocks",
        "KVzapPruningConnector.__init__",
    } <= methods


@pytest.mark.parametrize("how", [["-m", "tools.check_vllm_api"], ["tools/check_vllm_api.py"]])
def test_command_line(how, pristine, tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run(
        [sys.executable, *how, str(pristine), "--json", str(out)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert run.returncode == (0 if report["ok"] else 1), run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == tool.summary(report)
    assert report["source"] == str(pristine) and report["plugin_range"] == tool.compat.SUPPORTED
    assert {"name", "location", "ok", "problems", "notes"} <= set(report["symbols"][0])


def test_copy_checks_like_the_installed_tree(pristine):
    full, _ = tool.check(INSTALLED)
    copy, _ = tool.check(pristine)
    assert (copy["symbols"], copy["overrides"]) == (full["symbols"], full["overrides"])


def test_renamed_symbol_fails(before, tree):
    kernel = tree / "vllm/v1/attention/ops/triton_unified_attention.py"
    edit_def(kernel, "unified_attention", rename="unified_attention_v2")
    after = failures(tree)
    assert "unified_attention" not in before
    assert after.pop("unified_attention") == [
        "unified_attention not defined in vllm.v1.attention.ops.triton_unified_attention"
    ]
    assert after == before


@pytest.mark.parametrize(
    "file, qualname, param, symbol",
    [
        ("v1/attention/ops/triton_unified_attention.py", "unified_attention", "seq_threshold_3D",
         "unified_attention"),
        ("v1/kv_cache_spec_registry.py", "KVCacheSpecRegistry.register", "uniform_type_base_spec",
         "KVCacheSpecRegistry"),
    ],
)  # fmt: skip
def test_removed_parameter_fails(before, tree, file, qualname, param, symbol):
    edit_def(tree / "vllm" / file, qualname, drop=param)
    after = failures(tree)
    assert symbol not in before
    (problem,) = after.pop(symbol)
    assert problem.endswith(f"has no parameter {param}")
    assert after == before
    # a def taking **kwargs accepts it, with a note
    edit_def(tree / "vllm" / file, qualname, add="**kwargs")
    report, _ = tool.check(tree)
    row = next(r for r in report["symbols"] if r["name"] == symbol)
    assert row["ok"] and row["notes"] == [
        f"{qualname.split('.')[-1]}(): {param} accepted by **kwargs"
    ]


@pytest.mark.parametrize(
    "file, qualname, plugin_method",
    [
        ("v1/attention/backends/triton_attn.py", "TritonAttentionImpl.forward",
         "KVzapTritonAttentionImpl.forward"),
        ("v1/attention/backends/cpu_attn.py", "CPUAttentionBackendImpl.do_kv_cache_update",
         "KVzapCPUAttentionBackendImpl.do_kv_cache_update"),
    ],
)  # fmt: skip
def test_changed_overridden_method_fails(before, tree, file, qualname, plugin_method):
    edit_def(tree / "vllm" / file, qualname, add="new_param=None")
    after = failures(tree)
    assert plugin_method not in before
    (problem,) = after.pop(plugin_method)
    assert problem.startswith(f"{plugin_method} overrides {qualname}(layer, ")
    assert problem.endswith("new_param): plugin lacks new_param")
    assert after == before


def test_moved_symbol_fails_where_it_did_not_move(pristine, before, tree):
    """compat says 0.34 moved the CPU ops to vllm._cpu_ops: a 0.34 tree with them only in
    vllm._custom_ops fails, and passes once they are in vllm._cpu_ops (the symbols 0.34 added,
    absent from the 0.32 files the tree is made of, fail throughout)."""
    cpu_ops = [n for n, s in tool.compat.SYMBOLS.items() if s.location_for((0, 34)).startswith(
        "vllm._cpu_ops:")]  # fmt: skip
    added = {n for n, s in tool.compat.SYMBOLS.items() if s.since == (0, 34)}
    assert "cpu_attention_with_kv_cache" in cpu_ops
    (tree / "vllm/_version.py").write_text("__version__ = version = '0.34.0'\n")
    assert not (tree / "vllm/_cpu_ops.py").exists()
    after = failures(tree)
    assert not set(cpu_ops) & set(before)
    assert after.pop("cpu_attention_with_kv_cache") == [
        "module vllm._cpu_ops not found (no vllm/_cpu_ops.py or vllm/_cpu_ops/__init__.py)"
    ]
    assert set(after) - set(before) == set(cpu_ops) - {"cpu_attention_with_kv_cache"} | added
    assert tool.main([str(pristine), "--version", "0.34.0"]) == 1  # --version: the same
    shutil.copy(tree / "vllm/_custom_ops.py", tree / "vllm/_cpu_ops.py")
    assert set(failures(tree)) == set(before) | added
