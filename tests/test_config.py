"""Options and start-up checks: KVPruningConfig, the CLI flags, and create_engine_config.

No engine is started here: `EngineArgs.create_engine_config` runs in-process and is where the
plugin validates options, the surrogate checkpoint and conflicting features.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from vllm_kvzap.config import KVPruningConfig, KVPruningConfigError
from vllm_kvzap.scorers import SurrogateCheckpointError


def test_defaults_match_the_issue():
    c = KVPruningConfig.from_dict({"method": "kvzap-mlp"})
    assert (c.threshold, c.window, c.surrogate, c.stats_path) == (-4.0, 128, None, None)
    assert c.resolve_surrogate("Qwen/Qwen3-8B") == "nvidia/KVzap-mlp-Qwen3-8B"
    lin = KVPruningConfig.from_dict({"method": "kvzap-linear"})
    assert lin.resolve_surrogate("/models/Llama-3.1-8B-Instruct/") == (
        "nvidia/KVzap-linear-Llama-3.1-8B-Instruct"
    )
    assert not KVPruningConfig.from_additional_config(None).enabled
    assert not KVPruningConfig.from_additional_config({"other": 1}).enabled


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"method": "kvzap-huge"}, "unknown kv_pruning method 'kvzap-huge'"),
        ({"method": "kvzap-mlp", "window": -1}, "window must be >= 0"),
        ({"method": "kvzap-mlp", "window": 2.5}, "window must be an integer"),
        ({"method": "kvzap-mlp", "threshold": "low"}, "threshold must be a number"),
        ({"method": "kvzap-mlp", "threshold": float("nan")}, "finite number or -inf"),
        ({"method": "kvzap-mlp", "threshold": True}, "threshold must be a number"),
        ({"method": "kvzap-mlp", "treshold": -3}, "unknown kv_pruning option(s) ['treshold']"),
        ("kvzap-mlp", "must be a dict"),
    ],
)
def test_bad_options_are_refused(options, needle):
    with pytest.raises(KVPruningConfigError) as e:
        KVPruningConfig.from_dict(options)
    assert needle in str(e.value)


def test_threshold_accepts_strings_and_minus_inf():
    assert KVPruningConfig.from_dict({"threshold": "-3.5"}).threshold == -3.5
    assert KVPruningConfig.from_dict({"threshold": "-inf"}).threshold == -math.inf


def _parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


def test_cli_flags_reach_additional_config(tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = _parser().parse_args(
        ["--model", "m", "--kv-pruning", "kvzap-linear", "--kv-pruning-threshold", "-7",
         "--kv-pruning-window", "64", "--kv-pruning-surrogate", "some/dir",
         "--kv-pruning-stats", str(tmp_path / "s.jsonl"), "--kv-pruning-prefill", "chunked"]
    )  # fmt: skip
    engine_args = AsyncEngineArgs.from_cli_args(args)
    options = engine_args.additional_config["kv_pruning"]
    assert KVPruningConfig.from_dict(options) == KVPruningConfig(
        method="kvzap-linear",
        threshold=-7.0,
        window=64,
        surrogate="some/dir",
        stats_path=str(tmp_path / "s.jsonl"),
        prefill="chunked",
    )


@pytest.mark.parametrize(
    "argv, key, value",
    [
        (["--kv-pruning-threshold", "-2.5"], "threshold", -2.5),
        (["--kv-pruning-threshold=-2.5"], "threshold", -2.5),
        (["--kv-pruning-threshold", "-.5"], "threshold", -0.5),
        (["--kv-pruning-threshold", "-1e1"], "threshold", -10.0),
        (["--kv-pruning-threshold", "-inf"], "threshold", -math.inf),
        (["--kv-pruning-threshold", "-4"], "threshold", -4.0),
        (["--kv-pruning-threshold", "2.5"], "threshold", 2.5),
        (["--kv-pruning-ratio", ".5"], "ratio", 0.5),
        (["--kv-pruning-alpha", "0.25", "--kv-pruning-ratio", "0.5"], "alpha", 0.25),
    ],
)
def test_numeric_flags_parse_negative_and_fractional_values(argv, key, value):
    """vLLM's parser reads an argument with "-" and "." as a dotted config flag (`-O.level`);
    the plugin's flags take `-2.5` as a value in both forms (`patches.join_negative_values`)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = _parser().parse_args(["--model", "m", "--kv-pruning", "kvzap-mlp", *argv, "--seed", "1"])
    options = AsyncEngineArgs.from_cli_args(args).additional_config["kv_pruning"]
    assert options[key] == value and args.seed == 1


def test_parsed_namespace_already_carries_the_flags():
    """vLLM hands the parsed namespace to its API-server processes, which build their engine
    arguments before they load plugins: the flags must be in `additional_config` already."""
    args = _parser().parse_args(
        ["--model", "m", "--kv-pruning", "kvzap-mlp", "--kv-pruning-window", "8",
         "--additional-config", json.dumps({"other": 1})]
    )  # fmt: skip
    assert args.additional_config == {"other": 1, "kv_pruning": {"method": "kvzap-mlp", "window": 8}}


def test_cli_without_flags_leaves_additional_config_alone():
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(_parser().parse_args(["--model", "m"]))
    assert not (engine_args.additional_config or {}).get("kv_pruning")


@pytest.mark.parametrize(
    "argv",
    [
        ["--kv-pruning", "bogus"],
        ["--kv-pruning", "kvzap-mlp", "--kv-pruning-window", "-3"],
        ["--kv-pruning", "kvzap-mlp", "--kv-pruning-threshold", "abc"],
        ["--kv-pruning", "kvzap-mlp", "--kv-pruning-prefill", "sparse"],
    ],
)
def test_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--model", "m", *argv])
    assert e.value.code == 2
    assert "--kv-pruning" in capsys.readouterr().err


def _from_cli(argv: list[str]):
    """Engine arguments from a command line; bad kv_pruning flags fail as soon as vLLM's parser
    returns (the flags are merged into `additional_config` there, `patches._wrap_parse_args`)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(_parser().parse_args(argv))


def test_cli_method_options_come_from_the_registry():
    """A method's own options (its press's fields) are `--kv-pruning-<option>` flags."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_kvzap.cli import FLAG_TO_KEY
    from vllm_kvzap.config import PRESS_OPTIONS
    from vllm_kvzap.scorers.baselines import Window

    assert {"sinks", "seed"} <= set(PRESS_OPTIONS) <= set(FLAG_TO_KEY.values())
    args = _parser().parse_args(["--model", "m", "--kv-pruning", "window", "--kv-pruning-sinks", "2"])
    options = AsyncEngineArgs.from_cli_args(args).additional_config["kv_pruning"]
    assert options == {"method": "window", "sinks": 2}
    assert KVPruningConfig.from_dict(options).press == Window(sinks=2)


def test_cli_option_without_method_is_an_error():
    with pytest.raises(KVPruningConfigError, match="--kv-pruning-window given but pruning is off"):
        _from_cli(["--model", "m", "--kv-pruning-window", "32"])


def _engine_args(tiny_model_dir, **pruning):
    from vllm.engine.arg_utils import EngineArgs

    options = {"method": "kvzap-mlp", "surrogate": str(tiny_model_dir["mlp"]), **pruning}
    return EngineArgs(
        model=str(tiny_model_dir["model"]),
        dtype="float32",
        max_model_len=512,
        additional_config={"kv_pruning": options},
    )


def test_engine_config_turns_off_conflicts_and_names_the_connector(tiny_model_dir, monkeypatch):
    from vllm_kvzap import engine_setup

    warnings = []
    monkeypatch.setattr(engine_setup.logger, "warning", lambda msg, *a: warnings.append(msg % a))
    args = _engine_args(tiny_model_dir, window=8)
    config = args.create_engine_config()
    assert len(warnings) == 1  # one warning naming everything that was switched off
    assert "prefix caching" in warnings[0] and "enforce_eager" not in warnings[0]
    assert config.cache_config.enable_prefix_caching is False
    assert not config.model_config.enforce_eager  # scoring is a custom op in the compiled graph
    assert config.kv_transfer_config.kv_connector == "KVzapPruningConnector"
    resolved = KVPruningConfig.from_additional_config(config.additional_config)
    assert resolved.window == 8 and resolved.surrogate == str(tiny_model_dir["mlp"])


def test_engine_config_without_pruning_is_untouched(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(tiny_model_dir["model"]), max_model_len=512).create_engine_config()
    assert config.kv_transfer_config is None
    assert not config.model_config.enforce_eager


@pytest.mark.parametrize(
    "engine_kwargs, needle",
    [
        ({"enable_prefix_caching": True}, "prefix caching"),
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
        ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
    ],
)
def test_explicitly_requested_conflicts_are_refused(tiny_model_dir, engine_kwargs, needle):
    args = _engine_args(tiny_model_dir)
    for key, value in engine_kwargs.items():
        setattr(args, key, value)
    with pytest.raises(KVPruningConfigError, match=needle):
        args.create_engine_config()


def test_tensor_parallelism_needs_the_kv_heads_split_evenly(tiny_model_dir):
    """The tiny model has 2 KV heads: TP=2 gives one per rank (tests/test_tensor_parallel.py);
    TP=4 would replicate heads across ranks, which pruning refuses by name."""
    from vllm_kvzap.engine_setup import finish_vllm_config

    config = _engine_args(tiny_model_dir).create_engine_config()
    pruning = KVPruningConfig.from_additional_config(config.additional_config)
    config.parallel_config.tensor_parallel_size = 4
    with pytest.raises(KVPruningConfigError, match="2 KV heads split evenly over the 4 ranks"):
        finish_vllm_config(config, pruning)
    config.parallel_config.tensor_parallel_size = 2
    finish_vllm_config(config, pruning)


def test_missing_checkpoint_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(SurrogateCheckpointError, match="does-not-exist"):
        _engine_args(tiny_model_dir, surrogate=str(tmp_path / "does-not-exist")).create_engine_config()


def test_default_hub_surrogate_missing_offline_is_refused(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = _engine_args(tiny_model_dir, surrogate=None)
    with pytest.raises(SurrogateCheckpointError, match="nvidia/KVzap-mlp-model"):
        args.create_engine_config()


def test_wrong_shapes_are_refused_naming_both(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad-surrogate"
    shutil.copytree(tiny_model_dir["mlp"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["n_modules"] = 7
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(SurrogateCheckpointError) as e:
        _engine_args(tiny_model_dir, surrogate=str(bad)).create_engine_config()
    message = str(e.value)
    assert "n_modules" in message
    # reading a checkpoint whose tensors disagree with its own config fails first, naming shapes
    assert "7" in message


def test_model_shape_mismatch_names_both_shapes(tiny_model_dir, tmp_path):
    import torch

    from vllm_kvzap.scorers import SurrogateConfig, load_surrogate, save_checkpoint

    cfg = SurrogateConfig(input_dim=64, output_dim=3, n_modules=4, hidden_dim=None)
    state = {}
    for i in range(4):
        state[f"layers.{i}.weight"] = torch.zeros(3, 64)
        state[f"layers.{i}.bias"] = torch.zeros(3)
    save_checkpoint(tmp_path / "lin", cfg, state)
    load_surrogate(tmp_path / "lin")  # a valid checkpoint in itself
    args = _engine_args(tiny_model_dir, method="kvzap-linear", surrogate=str(tmp_path / "lin"))
    with pytest.raises(SurrogateCheckpointError) as e:
        args.create_engine_config()
    message = str(e.value)
    assert "input_dim=64" in message and "output_dim=3" in message
    assert "hidden_size=128" in message and "num_kv_heads=2" in message


def test_kind_mismatch_is_refused(tiny_model_dir):
    args = _engine_args(tiny_model_dir, method="kvzap-linear", surrogate=str(tiny_model_dir["mlp"]))
    with pytest.raises(KVPruningConfigError, match="needs a linear surrogate"):
        args.create_engine_config()


# --------------------------------------------------------------------------------------------------
# Target-ratio mode (issue 13): `ratio` / `alpha`
# --------------------------------------------------------------------------------------------------


def test_ratio_mode_options():
    c = KVPruningConfig.from_dict({"method": "kvzap-mlp", "ratio": 0.5})
    assert c.ratio_mode and c.rule == "ratio"
    assert (c.ratio, c.alpha) == (0.5, 0.2)
    # effective threshold-mode values: no pair pruned by its score alone, the whole prompt judged
    assert (c.threshold, c.window) == (-math.inf, 0)
    assert c.rule_settings() == {"rule": "ratio", "ratio": 0.5, "alpha": 0.2}
    assert c.describe_rule() == "ratio 0.5, alpha 0.2 (prompt only)"
    t = KVPruningConfig.from_dict({"method": "kvzap-mlp"})
    assert not t.ratio_mode and t.rule == "threshold" and t.ratio is None
    assert t.rule_settings() == {
        "rule": "threshold", "threshold": -4.0, "window": 128, "prefill": "dense"
    }  # fmt: skip
    assert t.describe_rule() == "threshold -4, window 128"
    assert KVPruningConfig().rule == "none" and not KVPruningConfig().ratio_mode
    for method in ("kvzap-linear", "knorm", "random"):
        c = KVPruningConfig.from_dict({"method": method, "ratio": "0.25", "alpha": 0})
        assert c.ratio_mode and (c.ratio, c.alpha) == (0.25, 0.0)
    assert KVPruningConfig.from_dict({"method": "kvzap-mlp", "ratio": 0, "alpha": 1}).ratio == 0.0


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"method": "kvzap-mlp", "ratio": 0.5, "threshold": -4}, "cannot be combined with threshold"),
        ({"method": "kvzap-mlp", "ratio": 0.5, "window": 128}, "cannot be combined with window"),
        ({"method": "kvzap-mlp", "ratio": 0.5, "window": 0, "threshold": -3},
         "cannot be combined with threshold and window"),
        ({"method": "kvzap-mlp", "alpha": 0.3}, "add a ratio"),
        ({"method": "kvzap-mlp", "threshold": -4, "alpha": 0.3}, "add a ratio"),
        ({"method": "kvzap-mlp", "ratio": 1.0}, "0 <= ratio < 1"),
        ({"method": "kvzap-mlp", "ratio": -0.1}, "0 <= ratio < 1"),
        ({"method": "kvzap-mlp", "ratio": float("nan")}, "0 <= ratio < 1"),
        ({"method": "kvzap-mlp", "ratio": True}, "ratio must be a number"),
        ({"method": "kvzap-mlp", "ratio": "half"}, "ratio must be a number"),
        ({"method": "kvzap-mlp", "ratio": 0.5, "alpha": 1.5}, "0 <= alpha <= 1"),
        ({"method": "kvzap-mlp", "ratio": 0.5, "alpha": -0.2}, "0 <= alpha <= 1"),
        ({"method": "kvzap-mlp", "ratio": 0.5, "alpha": None}, "alpha must be a number"),
        ({"method": "window", "ratio": 0.5}, "option 'ratio' applies to method(s)"),
        ({"method": "none", "ratio": 0.5}, "option 'ratio' applies to method(s)"),
        ({"ratio": 0.5}, "option 'ratio' applies to method(s)"),
    ],
)  # fmt: skip
def test_bad_ratio_options_are_refused(options, needle):
    with pytest.raises(KVPruningConfigError) as e:
        KVPruningConfig.from_dict(options)
    assert needle in str(e.value)


def test_ratio_given_as_none_means_threshold_mode():
    c = KVPruningConfig.from_dict({"method": "kvzap-mlp", "ratio": None, "threshold": -5})
    assert not c.ratio_mode and c.threshold == -5.0


def test_direct_construction_in_ratio_mode():
    c = KVPruningConfig(method="kvzap-mlp", ratio=0.3)
    assert (c.threshold, c.window, c.alpha) == (-math.inf, 0, 0.2)
    with pytest.raises(KVPruningConfigError, match="cannot be combined"):
        KVPruningConfig(method="kvzap-mlp", ratio=0.3, window=16)
    with pytest.raises(KVPruningConfigError, match="applies to method"):
        KVPruningConfig(method="window", ratio=0.3)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"method": "kvzap-mlp"},
        {"method": "kvzap-mlp", "threshold": "-inf", "window": 0, "mode": "mask"},
        {"method": "kvzap-linear", "threshold": -7, "window": 64, "surrogate": "s", "stats_path": "p"},
        {"method": "window", "window": 32, "sinks": 2},
        {"method": "random", "threshold": -0.3, "seed": 5},
        {"method": "kvzap-mlp", "ratio": 0.5},
        {"method": "kvzap-linear", "ratio": 0.0, "alpha": 1.0, "surrogate": "s", "mode": "mask"},
        {"method": "knorm", "ratio": 0.9, "alpha": 0.0},
        {"method": "random", "ratio": 0.7, "seed": 3, "stats_path": "x.jsonl"},
    ],
)
def test_to_dict_round_trips(options):
    """Every process re-parses the dict: from_dict(to_dict(c)) == c, also through JSON."""
    c = KVPruningConfig.from_dict(options)
    d = c.to_dict()
    assert KVPruningConfig.from_dict(d) == c
    assert KVPruningConfig.from_dict(json.loads(json.dumps(d))) == c
    assert ("ratio" in d) == c.ratio_mode and ("alpha" in d) == c.ratio_mode
    assert ("threshold" in d) != c.ratio_mode and ("window" in d) != c.ratio_mode


def test_cli_ratio_flags_reach_additional_config():
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = _parser().parse_args(
        ["--model", "m", "--kv-pruning", "kvzap-mlp", "--kv-pruning-ratio", "0.6",
         "--kv-pruning-alpha", "0.1"]
    )  # fmt: skip
    options = AsyncEngineArgs.from_cli_args(args).additional_config["kv_pruning"]
    assert options == {"method": "kvzap-mlp", "ratio": 0.6, "alpha": 0.1}
    assert KVPruningConfig.from_dict(options) == KVPruningConfig(
        method="kvzap-mlp", ratio=0.6, alpha=0.1
    )
    args = _parser().parse_args(["--model", "m", "--kv-pruning", "knorm", "--kv-pruning-ratio", "0.5"])
    c = KVPruningConfig.from_dict(AsyncEngineArgs.from_cli_args(args).additional_config["kv_pruning"])
    assert (c.method, c.ratio, c.alpha) == ("knorm", 0.5, 0.2)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--kv-pruning-ratio", "0.5", "--kv-pruning-threshold", "-4"], "cannot be combined with threshold"),
        (["--kv-pruning-ratio", "0.5", "--kv-pruning-window", "128"], "cannot be combined with window"),
        (["--kv-pruning-alpha", "0.5"], "add a ratio"),
    ],
)
def test_cli_ratio_conflicts_are_errors(argv, needle):
    with pytest.raises(KVPruningConfigError, match=needle):
        _from_cli(["--model", "m", "--kv-pruning", "kvzap-mlp", *argv])


def test_cli_ratio_conflicts_with_additional_config_threshold():
    """A threshold given through additional_config and a ratio on the command line are both given."""
    with pytest.raises(KVPruningConfigError, match="cannot be combined with threshold"):
        _from_cli(
            ["--model", "m", "--additional-config", json.dumps({"kv_pruning": {"threshold": -5}}),
             "--kv-pruning", "kvzap-mlp", "--kv-pruning-ratio", "0.5"]
        )  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["--kv-pruning", "kvzap-mlp", "--kv-pruning-ratio", "1"],
        ["--kv-pruning", "kvzap-mlp", "--kv-pruning-ratio", "abc"],
        ["--kv-pruning", "kvzap-mlp", "--kv-pruning-ratio", "0.5", "--kv-pruning-alpha", "2"],
    ],
)
def test_cli_rejects_bad_ratio_values(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--model", "m", *argv])
    assert e.value.code == 2
    assert "--kv-pruning" in capsys.readouterr().err


def test_cli_ratio_without_method_is_an_error():
    with pytest.raises(KVPruningConfigError, match="--kv-pruning-ratio given but pruning is off"):
        _from_cli(["--model", "m", "--kv-pruning-ratio", "0.5"])


def test_engine_config_keeps_the_ratio(tiny_model_dir):
    config = _engine_args(tiny_model_dir, ratio=0.4, alpha=0.3).create_engine_config()
    resolved = KVPruningConfig.from_additional_config(config.additional_config)
    assert resolved.ratio_mode and (resolved.ratio, resolved.alpha) == (0.4, 0.3)
    assert (resolved.threshold, resolved.window) == (-math.inf, 0)
    assert resolved.surrogate == str(tiny_model_dir["mlp"])


# --------------------------------------------------------------------------------------------------
# Prompts pruned while they are prefilled: `prefill`
# --------------------------------------------------------------------------------------------------


def test_prefill_option():
    c = KVPruningConfig.from_dict({"method": "kvzap-mlp", "prefill": "chunked"})
    assert c.prefill == "chunked" and KVPruningConfig.from_dict(c.to_dict()) == c
    assert c.rule_settings()["prefill"] == "chunked"
    assert c.describe_rule() == "threshold -4, window 128, chunked prefill"
    assert KVPruningConfig.from_dict({"method": "kvzap-mlp"}).prefill == "dense"
    ratio = KVPruningConfig.from_dict({"method": "kvzap-mlp", "ratio": 0.5, "prefill": "dense"})
    assert ratio.prefill == "dense"


@pytest.mark.parametrize(
    "options,match",
    [
        ({"prefill": "chunk"}, r"unknown kv_pruning prefill 'chunk'; choose one of \['dense', 'chunked'\]"),
        ({"prefill": "chunked", "ratio": 0.5}, "threshold mode and paged mode only, not with a ratio"),
        ({"prefill": "chunked", "mode": "mask"}, "not with mode 'mask'"),
    ],
)
def test_prefill_option_errors(options, match):
    with pytest.raises(KVPruningConfigError, match=match):
        KVPruningConfig.from_dict({"method": "kvzap-mlp", **options})
