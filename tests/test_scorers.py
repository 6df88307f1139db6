"""Tests for scorers/: the methods' registry, published checkpoint format, Hub resolution (offline),
Surrogate scoring.

References are independent of the code under test: kvpress-style ``nn.Linear`` /
``nn.Sequential(Linear, GELU, Linear)`` modules under ``layers`` load the same safetensors file
with ``load_state_dict(strict=True)``, and a checkpoint written by hand (json + safetensors from
those modules) must load as-is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vllm_kvzap.rule import keep
from vllm_kvzap.scorers import (
    Press,
    Surrogate,
    SurrogateCheckpointError,
    SurrogateConfig,
    default_surrogate_id,
    load_surrogate,
    methods,
    read_checkpoint,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from vllm_kvzap.scorers.registry import BUILT_IN

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "nvidia/KVzap-mlp-X"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

MLP = SurrogateConfig(input_dim=40, output_dim=3, n_modules=4, hidden_dim=24)
LINEAR = SurrogateConfig(input_dim=40, output_dim=3, n_modules=4, hidden_dim=None)


# ---------------------------------------------------------------- the methods' registry


def test_registry_holds_the_methods_in_order() -> None:
    from vllm_kvzap.config import METHODS, RATIO_METHODS

    builtin = ["kvzap-mlp", "kvzap-linear", "window", "knorm", "random"]
    assert list(methods())[: len(builtin)] == builtin  # built-ins first, in the CLI's order
    assert METHODS == ("none", *methods())
    assert set(RATIO_METHODS) == {name for name, press in methods().items() if press.has_scores}
    for name, press in methods().items():
        assert issubclass(press, Press) and press.name == name
    assert {n: p.surrogate_kind for n, p in methods().items() if p.surrogate_kind} == {
        "kvzap-mlp": "mlp", "kvzap-linear": "linear"
    }  # fmt: skip


def test_readme_lists_the_built_in_methods() -> None:
    """The README's method list is the registry's built-in methods (`BUILT_IN` modules), in its
    order: a built-in added, renamed or removed shows here. A method in a new module of the
    package is listed by `--help` (from the registry) and needs no README edit."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("**Methods.**") :].split("\n\n", 1)[0]
    built_in = [
        name for name, press in methods().items()
        if press.__module__.rsplit(".", 1)[-1] in BUILT_IN
    ]  # fmt: skip
    assert re.findall(r"^- `([^`]+)`", section, re.MULTILINE) == built_in


class KVzapReference(nn.Module):
    """Same module layout as kvpress's KVzapModel (plain torch)."""

    def __init__(self, cfg: SurrogateConfig) -> None:
        super().__init__()
        D, H, N = cfg.input_dim, cfg.output_dim, cfg.hidden_dim
        self.layers = nn.ModuleList(
            nn.Linear(D, H) if N is None else nn.Sequential(nn.Linear(D, N), nn.GELU(), nn.Linear(N, H))
            for _ in range(cfg.n_modules)
        )


def reference_model(cfg: SurrogateConfig, seed: int = 0) -> KVzapReference:
    torch.manual_seed(seed)
    ref = KVzapReference(cfg)
    with torch.no_grad():  # push scores to the paper's range (-10..0) so thresholds split them
        for m in ref.layers:
            last = m if isinstance(m, nn.Linear) else m[2]
            last.bias.sub_(4.0)
    return ref


def write_published(path: Path, cfg: SurrogateConfig, ref: nn.Module, **extra) -> Path:
    """A checkpoint written without our code, like kvpress's save_pretrained output."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["KVzapModel"],
        "model_type": "kvzap",
        "input_dim": cfg.input_dim,
        "output_dim": cfg.output_dim,
        "n_modules": cfg.n_modules,
        "hidden_dim": cfg.hidden_dim,
        "dtype": "float32",
        "transformers_version": "4.57.1",
        **extra,
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path / "model.safetensors")
    return path


@pytest.fixture(params=[MLP, LINEAR], ids=["mlp", "linear"])
def cfg(request) -> SurrogateConfig:
    return request.param


@pytest.fixture
def published(tmp_path: Path, cfg: SurrogateConfig) -> tuple[Path, KVzapReference]:
    ref = reference_model(cfg)
    return write_published(tmp_path / "ckpt", cfg, ref), ref


# ---------------------------------------------------------------- format and scoring


def test_published_checkpoint_scores_match_reference_modules(published, cfg: SurrogateConfig) -> None:
    path, ref = published
    surrogate = load_surrogate(path)
    assert surrogate.kind == cfg.kind and surrogate.config == cfg
    H, N, L, D = cfg.output_dim, cfg.hidden_dim, cfg.n_modules, cfg.input_dim
    assert surrogate.w1.shape == ((L, H, D) if N is None else (L, N, D))
    assert surrogate.w1.dtype == torch.float32
    assert (surrogate.w2 is None) == (N is None)
    x = torch.randn(33, D)
    all_keep = []
    for layer in range(L):
        with torch.no_grad():
            expected = ref.layers[layer](x)
        scores = surrogate.score(x, layer)
        assert scores.dtype == torch.float32 and scores.shape == (33, H)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
        all_keep.append(keep(scores, -4.0))
    kept = torch.stack(all_keep)
    assert 0 < kept.sum() < kept.numel()
    # layers really differ: scoring with the wrong layer's weights would not pass
    assert not torch.allclose(surrogate.score(x, 0), surrogate.score(x, 1))


def test_a_ranks_heads_score_as_the_reference_modules_columns(published, cfg) -> None:
    """Tensor parallelism: `select_heads` keeps the rows of the last layer for a rank's heads."""
    path, ref = published
    H = cfg.output_dim
    x = torch.randn(9, cfg.input_dim)
    for first, count in [(0, 1), (H - 1, 1), (1, H - 1)]:
        shard = load_surrogate(path).select_heads(first, count)
        assert shard.config.output_dim == count
        for layer in range(cfg.n_modules):
            with torch.no_grad():
                expected = ref.layers[layer](x)[:, first : first + count]
            torch.testing.assert_close(shard.score(x, layer), expected, atol=1e-5, rtol=1e-5)


def test_score_casts_input_to_float32(published, cfg: SurrogateConfig) -> None:
    path, ref = published
    surrogate = load_surrogate(path)
    x = torch.randn(9, cfg.input_dim).to(torch.bfloat16)
    with torch.no_grad():
        expected = ref.layers[2](x.float())
    scores = surrogate.score(x, 2)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_tie_at_threshold_is_kept() -> None:
    sd = {k: torch.zeros(s) for k, s in MLP.expected_shapes().items()}
    sd["layers.1.2.bias"] = torch.tensor([-4.0, -4.5, -3.0])
    surrogate = Surrogate.from_state_dict(MLP, sd)
    scores = surrogate.score(torch.randn(5, MLP.input_dim), 1)
    assert torch.equal(scores, torch.tensor([-4.0, -4.5, -3.0]).expand(5, 3))
    assert torch.equal(keep(scores, -4.0), torch.tensor([True, False, True]).expand(5, 3))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip(tmp_path: Path, cfg: SurrogateConfig, dtype: str) -> None:
    cfg = SurrogateConfig(cfg.input_dim, cfg.output_dim, cfg.n_modules, cfg.hidden_dim, dtype)
    sd = {k: v.detach().clone() for k, v in reference_model(cfg, seed=1).state_dict().items()}
    out = save_checkpoint(tmp_path / "out", cfg, sd)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == {
        "architectures": ["KVzapModel"],
        "model_type": "kvzap",
        "input_dim": 40,
        "output_dim": 3,
        "n_modules": 4,
        "hidden_dim": cfg.hidden_dim,
        "dtype": dtype,
    }
    # the file loads strictly into kvpress-style modules
    on_disk = load_file(out / "model.safetensors")
    assert {v.dtype for v in on_disk.values()} == {getattr(torch, dtype)}
    KVzapReference(cfg).load_state_dict(on_disk, strict=True)

    cfg2, sd2 = read_checkpoint(out)
    assert cfg2 == cfg and sd2.keys() == sd.keys()
    tol = 0 if dtype == "float32" else 1e-2
    for k in sd:
        torch.testing.assert_close(sd2[k].float(), sd[k], atol=tol, rtol=tol)

    surrogate = load_surrogate(out)
    again = surrogate.save(tmp_path / "again")
    for k, v in load_file(again / "model.safetensors").items():
        assert torch.equal(v, on_disk[k])


def test_surrogate_to_device_and_repr(published) -> None:
    path, _ = published
    s = load_surrogate(path)
    assert s.to("cpu") is s and s.device == torch.device("cpu")
    assert str(path) in repr(s)


def test_score_argument_errors(published, cfg: SurrogateConfig) -> None:
    s = load_surrogate(published[0])
    with pytest.raises(IndexError, match="n_modules=4"):
        s.score(torch.randn(2, cfg.input_dim), cfg.n_modules)
    with pytest.raises(ValueError, match=r"\[T, 40\]"):
        s.score(torch.randn(2, 41), 0)


# ---------------------------------------------------------------- compatibility, default ids


def test_check_compatible(published, cfg: SurrogateConfig) -> None:
    s = load_surrogate(published[0])
    s.check_compatible(hidden_size=40, num_kv_heads=3, num_layers=4)
    for args in [(128, 3, 4), (40, 2, 4), (40, 3, 36)]:
        with pytest.raises(SurrogateCheckpointError) as e:
            s.check_compatible(*args, model_name="tiny-qwen3")
        msg = str(e.value)
        for part in ["input_dim=40", "output_dim=3", "n_modules=4", "tiny-qwen3", str(published[0]),
                     f"hidden_size={args[0]}", f"num_kv_heads={args[1]}", f"num_layers={args[2]}"]:
            assert part in msg, (part, msg)


@pytest.mark.parametrize(
    "kind, model, expected",
    [
        ("mlp", "Qwen/Qwen3-8B", "nvidia/KVzap-mlp-Qwen3-8B"),
        ("linear", "meta-llama/Llama-3.1-8B-Instruct", "nvidia/KVzap-linear-Llama-3.1-8B-Instruct"),
        ("mlp", "/models/Qwen3-32B/", "nvidia/KVzap-mlp-Qwen3-32B"),
        ("linear", Path("/models/tiny-qwen3"), "nvidia/KVzap-linear-tiny-qwen3"),
    ],
)
def test_default_surrogate_id(kind: str, model, expected: str) -> None:
    assert default_surrogate_id(kind, model) == expected


def test_default_surrogate_id_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="linear"):
        default_surrogate_id("transformer", "Qwen/Qwen3-8B")


# ---------------------------------------------------------------- checkpoint errors


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            del cfg[k]
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, fn) -> None:
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors")


_DELETE = object()


def test_error_missing_local_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SurrogateCheckpointError, match="no such local directory") as e:
        load_surrogate(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(SurrogateCheckpointError, match="not a Hugging Face Hub repo id"):
        load_surrogate(str(missing))


def test_error_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(SurrogateCheckpointError, match="is a file"):
        load_surrogate(f)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_error_missing_file(published, missing: str) -> None:
    path, _ = published
    (path / missing).unlink()
    with pytest.raises(SurrogateCheckpointError, match=f"missing {missing}"):
        load_surrogate(path)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"model_type": "llama"}, "model_type is 'llama', expected 'kvzap'"),
        ({"model_type": _DELETE}, "model_type is None"),
        ({"input_dim": _DELETE}, "'input_dim' must be a positive integer"),
        ({"output_dim": 0}, "'output_dim' must be a positive integer, got 0"),
        ({"n_modules": "36"}, "'n_modules' must be a positive integer"),
        ({"hidden_dim": -1}, "'hidden_dim' must be a positive integer"),
        ({"dtype": "int8"}, "unsupported dtype 'int8'"),
    ],
)
def test_error_bad_config(published, changes: dict, match: str) -> None:
    path, _ = published
    _edit_config(path, **changes)
    with pytest.raises(SurrogateCheckpointError, match=match) as e:
        read_checkpoint(path)
    assert "config.json" in str(e.value)


def test_error_config_not_json(published) -> None:
    path, _ = published
    (path / "config.json").write_text("{not json")
    with pytest.raises(SurrogateCheckpointError, match="cannot parse JSON"):
        read_checkpoint(path)


def test_error_corrupt_safetensors(published) -> None:
    path, _ = published
    (path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(SurrogateCheckpointError, match="cannot read safetensors"):
        read_checkpoint(path)


def test_error_missing_tensor(published, cfg: SurrogateConfig) -> None:
    path, _ = published
    name = "layers.2.weight" if cfg.hidden_dim is None else "layers.2.2.bias"
    _edit_tensors(path, lambda sd: sd.pop(name))
    with pytest.raises(SurrogateCheckpointError, match=f"missing tensors \\[{name}\\]"):
        read_checkpoint(path)


def test_error_misshaped_tensor(published, cfg: SurrogateConfig) -> None:
    path, _ = published
    name = "layers.1.weight" if cfg.hidden_dim is None else "layers.1.0.weight"

    def shrink(sd):
        sd[name] = sd[name][:, :-1].contiguous()

    _edit_tensors(path, shrink)
    with pytest.raises(SurrogateCheckpointError, match=f"tensor '{name}' has shape \\[\\d+, 39\\], expected"):
        read_checkpoint(path)


def test_error_config_kind_disagrees_with_tensors(published, cfg: SurrogateConfig) -> None:
    path, _ = published
    _edit_config(path, hidden_dim=None if cfg.hidden_dim else 24)
    with pytest.raises(SurrogateCheckpointError, match="missing tensors .* unexpected tensors"):
        read_checkpoint(path)


def test_error_fewer_layers_than_config(published, cfg: SurrogateConfig) -> None:
    path, _ = published
    _edit_config(path, n_modules=5)
    with pytest.raises(SurrogateCheckpointError, match=r"missing tensors \[layers\.4\."):
        read_checkpoint(path)


def test_error_save_bad_state_dict(tmp_path: Path) -> None:
    sd = {k: torch.zeros(s) for k, s in MLP.expected_shapes().items()}
    sd["layers.0.0.bias"] = torch.zeros(25)
    with pytest.raises(SurrogateCheckpointError, match="'layers.0.0.bias' has shape \\[25\\]"):
        save_checkpoint(tmp_path / "out", MLP, sd)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- Hugging Face Hub (offline)


def make_hub_cache(cache: Path, repo_id: str, cfg: SurrogateConfig, ref: nn.Module) -> Path:
    """The layout huggingface_hub uses: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = write_published(repo_dir / "snapshots" / COMMIT, cfg, ref)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_resolves_from_cache_offline(offline_hub: Path) -> None:
    ref = reference_model(MLP, seed=5)
    snapshot = make_hub_cache(offline_hub, HUB_ID, MLP, ref)
    assert resolve_checkpoint_dir(HUB_ID) == snapshot
    surrogate = load_surrogate(HUB_ID)
    assert surrogate.source == HUB_ID and surrogate.kind == "mlp"
    x = torch.randn(7, MLP.input_dim)
    with torch.no_grad():
        torch.testing.assert_close(surrogate.score(x, 3), ref.layers[3](x), atol=1e-5, rtol=1e-5)


def test_local_dir_wins_over_hub_id(offline_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_hub_cache(offline_hub, HUB_ID, MLP, reference_model(MLP, seed=5))
    local = write_published(tmp_path / "cwd" / HUB_ID, LINEAR, reference_model(LINEAR))
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_checkpoint_dir(HUB_ID) == local
    assert load_surrogate(HUB_ID).kind == "linear"


def test_hub_id_absent_offline_is_a_clear_error(offline_hub: Path) -> None:
    with pytest.raises(SurrogateCheckpointError) as e:
        load_surrogate("nvidia/KVzap-mlp-NotThere")
    msg = str(e.value)
    for part in ["nvidia/KVzap-mlp-NotThere", "offline", "not in the local cache", str(offline_hub),
                 "tried local directory"]:
        assert part in msg, (part, msg)


def test_hub_snapshot_without_weights_is_a_clear_error(offline_hub: Path) -> None:
    snapshot = make_hub_cache(offline_hub, HUB_ID, MLP, reference_model(MLP))
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(SurrogateCheckpointError, match="missing model.safetensors"):
        load_surrogate(HUB_ID)


def test_hub_offline_via_environment_in_fresh_process(tmp_path: Path) -> None:
    """HF_HOME + HF_HUB_OFFLINE=1 set before huggingface_hub is imported (the real setup)."""
    hf_home = tmp_path / "hf_home"
    ref = reference_model(MLP, seed=9)
    make_hub_cache(hf_home / "hub", HUB_ID, MLP, ref)
    x = torch.randn(6, MLP.input_dim)
    torch.save({"x": x, "expected": ref.layers[1](x).detach()}, tmp_path / "io.pt")
    code = textwrap.dedent(
        f"""
        import torch
        from vllm_kvzap.scorers import SurrogateCheckpointError, load_surrogate

        io = torch.load({str(tmp_path / "io.pt")!r})
        s = load_surrogate({HUB_ID!r})
        torch.testing.assert_close(s.score(io["x"], 1), io["expected"], atol=1e-5, rtol=1e-5)
        try:
            load_surrogate("nvidia/KVzap-linear-Absent")
        except SurrogateCheckpointError as e:
            assert "offline" in str(e) and "nvidia/KVzap-linear-Absent" in str(e), str(e)
        else:
            raise AssertionError("absent hub id loaded")
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=pythonpath)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
