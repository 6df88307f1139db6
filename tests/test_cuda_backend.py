"""The CUDA path, on this CPU machine: its backend end to end in vLLM's engine, its scoring op, and
how `engine_setup` chooses (or refuses) attention backends on a CUDA platform.

- The engine test runs vLLM's CPU engine (Model Runner V1) with `attention/cuda_backend.py`'s
  backend in place of the CPU one (`tests/engine_harness.py`): page state in the plain layout, vLLM's Triton
  `unified_attention` under `TRITON_INTERPRET=1`, chunked prefill (prompt chunks and decode rows in
  one step). Greedy tokens, log-probs and per-layer pruned pairs must equal the plain-torch DMS
  reference, as the CPU backend's do (`test_engine_offline.py`).
- The scoring op `vllm_kvzap::surrogate_scores` (the Triton kernel, under the interpreter) equals
  the torch twin, also inside `torch.compile(fullgraph=True)`.
- Backend choice is tested against a CUDA platform faked on `current_platform`.
"""

from __future__ import annotations

import pytest
from vllm.config.attention import AttentionConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from tests.interpreter import run_in_triton_interpreter
from tests.test_engine_offline import WINDOW, check_against_reference, prompts
from tests.test_model_runners import TOKENS
from vllm_kvzap.config import KVPruningConfig, KVPruningConfigError
from vllm_kvzap.engine_setup import prepare_engine_args


@pytest.fixture(scope="module")
def cuda_path_run(tiny_model_dir, tmp_path_factory):
    """The CUDA backend under Model Runner V1 (V2's runs are in `test_model_runners.py`)."""
    from tests.test_model_runners import engine_spec, run_harness

    tmp = tmp_path_factory.mktemp("cuda_path")
    pruning = {"method": "kvzap-mlp", "threshold": -4, "window": WINDOW,
               "surrogate": str(tiny_model_dir["mlp"])}  # fmt: skip
    spec = engine_spec(tiny_model_dir, tmp, "v1", "cuda", pruning, kv_cache_memory_bytes=64 * 2**20)
    spec.update(prompts=prompts(), max_tokens=TOKENS["cuda"])
    return run_harness(spec, tmp)


def test_cuda_path_engine_equals_reference(cuda_path_run, tiny_model_dir):
    assert cuda_path_run["runner_module"] == "vllm.v1.worker.cpu_model_runner"  # V1
    assert cuda_path_run["key_layout"] == "plain"  # the CUDA path's page table really ran
    fractions = check_against_reference(cuda_path_run, tiny_model_dir, "mlp", TOKENS["cuda"])
    assert max(fractions) > 0.2  # pruning really happened


def test_surrogate_scores_op_equals_torch_twin():
    run_in_triton_interpreter(
        "import torch\n"
        "from vllm_kvzap.kernels.surrogate_score import scores_torch, surrogate_scores\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(37, 64, generator=g).to(torch.bfloat16)\n"
        "w1, b1 = torch.randn(24, 64, generator=g) / 8, torch.randn(24, generator=g)\n"
        "w2, b2 = torch.randn(4, 24, generator=g) / 5, torch.randn(4, generator=g)\n"
        "for args in ((w1, b1, w2, b2), (w1[:4], b1[:4], None, None)):\n"
        "    # the op multiplies x by w1 in x's dtype: the reference uses the same bf16-rounded w1\n"
        "    ref = scores_torch(x, args[0].bfloat16(), *args[1:])\n"
        "    got = surrogate_scores(x, *args)\n"
        "    assert got.dtype == torch.float32 and got.shape == ref.shape\n"
        "    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()\n"
        "    compiled = torch.compile(lambda x: surrogate_scores(x, *args) + 1, fullgraph=True)\n"
        "    assert torch.allclose(compiled(x), ref + 1, atol=1e-4)\n"
        "print('OK')\n",
        timeout=300,
    )


@pytest.fixture
def fake_cuda(monkeypatch):
    from vllm.platforms import current_platform

    from vllm_kvzap.plugin import register

    register()  # on the real (CPU) platform, before it is faked
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)


def _args(**kwargs) -> EngineArgs:
    return EngineArgs(model="unused", **kwargs)


PRUNING = KVPruningConfig.from_additional_config(
    {"kv_pruning": {"method": "kvzap-mlp", "threshold": -4}}
)


@pytest.mark.parametrize(
    "given",
    [{}, {"attention_backend": "TRITON_ATTN"}, {"attention_backend": "CUSTOM"},
     {"attention_config": AttentionConfig(backend=AttentionBackendEnum.TRITON_ATTN)}],
)  # fmt: skip
def test_cuda_selects_the_pruning_backend(fake_cuda, given):
    args = _args(**given)
    prepare_engine_args(args, PRUNING)
    assert args.attention_backend == AttentionBackendEnum.CUSTOM
    assert args.attention_config.backend is None  # not both (vLLM refuses the pair)
    assert args.kv_transfer_config.kv_connector == "KVzapPruningConnector"


def test_cuda_refuses_backends_that_cannot_prune(fake_cuda):
    with pytest.raises(KVPruningConfigError, match="attention backend FLASH_ATTN"):
        prepare_engine_args(_args(attention_backend="FLASH_ATTN"), PRUNING)


def test_cuda_refuses_mask_mode(fake_cuda):
    mask = KVPruningConfig.from_additional_config(
        {"kv_pruning": {"method": "kvzap-mlp", "threshold": -4, "mode": "mask"}}
    )
    with pytest.raises(KVPruningConfigError, match="mode 'mask' on a GPU"):
        prepare_engine_args(_args(), mask)


def test_other_platforms_are_refused(monkeypatch):
    from vllm.platforms import current_platform

    from vllm_kvzap.plugin import register

    register()
    monkeypatch.setattr(current_platform, "is_cuda", lambda: False)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    with pytest.raises(KVPruningConfigError, match="CPU and CUDA platforms"):
        prepare_engine_args(_args(), PRUNING)


@pytest.mark.parametrize("given", [None, False])
def test_cuda_turns_off_vllm_034s_extensible_kv_cache(fake_cuda, given, caplog):
    """vLLM 0.34's `enable_extensible_kv_cache` (None: on for CUDA) is turned off with a logged
    reason; 0.32's arguments, which have no such field, get none."""
    args = _args()
    assert not hasattr(args, "enable_extensible_kv_cache")  # vLLM 0.32
    prepare_engine_args(args, PRUNING)
    assert not hasattr(args, "enable_extensible_kv_cache")
    args = _args()
    args.enable_extensible_kv_cache = given  # what 0.34's EngineArgs holds
    with caplog.at_level("WARNING"):
        prepare_engine_args(args, PRUNING)
    assert args.enable_extensible_kv_cache is False
    assert ("extensible KV cache" in caplog.text) is (given is None)


def test_cuda_refuses_an_extensible_kv_cache_asked_for(fake_cuda):
    args = _args()
    args.enable_extensible_kv_cache = True
    with pytest.raises(KVPruningConfigError, match="the extensible KV cache"):
        prepare_engine_args(args, PRUNING)
    from types import SimpleNamespace

    from vllm_kvzap.engine_setup import finish_vllm_config

    resolved = SimpleNamespace(enable_extensible_kv_cache=True)  # 0.34's resolved CacheConfig
    with pytest.raises(KVPruningConfigError, match="--no-enable-extensible-kv-cache"):
        finish_vllm_config(SimpleNamespace(model_config=None, cache_config=resolved), PRUNING)
