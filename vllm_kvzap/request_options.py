"""Per-request pruning options: ``SamplingParams.extra_args["kv_pruning"]``.

Data flow: a request carries its own value of the engine's rule -> **validated at intake (this
module, called from vLLM's request validation in the front end: a bad value is a `ValueError`,
an HTTP 400 on the OpenAI API)** -> the scheduler side of the KV connector reads it when the request
is scheduled (first time, or again after a preemption) and sends it with the step's metadata, keyed
by the request's first block (its `req_key`) -> the page table (`cache/row_state.py`) gives the
request's index (`req_idx`) that threshold (or ratio) when the request takes it.

Accepted values of ``extra_args["kv_pruning"]`` (``None`` or no key: the engine's value):

- a number (or a numeric string, e.g. ``"-inf"``): the request's threshold (threshold mode) or
  ratio (ratio mode), with the same bounds as the engine-level option;
- ``"none"``: no pair of this request is pruned (threshold ``-inf``; ratio ``0``);
- a dict ``{"threshold": t}``, ``{"ratio": r}`` or ``{"method": "none"}`` (``method`` may also name
  the engine's own method, which changes nothing).

The OpenAI API's ``vllm_xargs`` holds flat values only: ``"vllm_xargs": {"kv_pruning": -3.5}``.
Everything else is refused: a ratio for a threshold engine or the reverse, a threshold for the
``window`` baseline (it has no scores to compare: ``Press.has_scores``), per-request options in
mask mode, another method (scoring is per engine), and any option on an engine without pruning.
"""

from __future__ import annotations

import math
from typing import Any

from vllm_kvzap.config import (
    KVPruningConfig,
    KVPruningConfigError,
    parse_ratio,
    parse_threshold,
)

REQUEST_KEY = "kv_pruning"
OFF = "none"
_WHERE = f'extra_args["{REQUEST_KEY}"]'


def request_value(extra_args: dict | None, config: KVPruningConfig) -> float | None:
    """The request's threshold (threshold mode) or ratio (ratio mode); None: the engine's.

    Raises `KVPruningConfigError` (a `ValueError`) naming the key for anything not accepted.
    """
    raw = (extra_args or {}).get(REQUEST_KEY)
    if raw is None:  # absent, or None: the engine's value (as for engine-level options)
        return None
    if not config.enabled:
        raise KVPruningConfigError(
            f"{_WHERE} was given but this engine runs without KV pruning (start it with "
            "--kv-pruning METHOD / additional_config={'kv_pruning': {...}})"
        )
    if not config.paged:
        raise KVPruningConfigError(
            f"{_WHERE}: per-request options need paged mode; this engine runs in mask mode"
        )
    option = "ratio" if config.ratio_mode else "threshold"
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"threshold", "ratio", "method"})
        if unknown:
            raise KVPruningConfigError(
                f"{_WHERE}: unknown option(s) {unknown}; accepted: 'threshold' or 'ratio' (the "
                "engine's rule) or 'method': 'none'"
            )
        if len(raw) != 1:
            raise KVPruningConfigError(
                f"{_WHERE}: give exactly one of 'threshold', 'ratio', 'method', got {sorted(raw)}"
            )
        (name, value), = raw.items()
        if name == "method":
            if value is None or value == config.method:
                return None
            if value != OFF:
                raise KVPruningConfigError(
                    f'{_WHERE}["method"] may be "none" (no pruning for this request) or the '
                    f"engine's own method {config.method!r}, not {value!r}: the scorer is chosen "
                    "per engine"
                )
            return _off(config)
        if name != option:
            other = "threshold" if option == "ratio" else "ratio"
            raise KVPruningConfigError(
                f'{_WHERE}["{name}"]: this engine prunes by {option} ({config.describe_rule()}); '
                f'give {{"{option}": ...}} instead of a {other}'
            )
        return _parse(value, option, config, f'{_WHERE}["{name}"]')
    if isinstance(raw, str) and raw.strip().lower() == OFF:
        return _off(config)
    return _parse(raw, option, config, _WHERE)


def _off(config: KVPruningConfig) -> float:
    return 0.0 if config.ratio_mode else -math.inf


def _parse(value: Any, option: str, config: KVPruningConfig, where: str) -> float:
    if option == "threshold" and not config.press.has_scores:
        raise KVPruningConfigError(
            f"{where}: the {config.method} baseline has no scores to compare with a threshold; "
            'only "none" (no pruning for this request) is accepted'
        )
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass  # the parsers below name the bad value
    try:
        return parse_ratio(value) if option == "ratio" else parse_threshold(value)
    except KVPruningConfigError as e:
        raise KVPruningConfigError(f"{where}: {e}") from None

