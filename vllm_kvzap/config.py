"""KV pruning options: the one place that parses, validates and defaults them.

Data flow: CLI flags (`--kv-pruning ...`) and `additional_config={"kv_pruning": {...}}` both end up as
a plain dict under `vllm_config.additional_config["kv_pruning"]`; every process (front end, engine
core, workers) turns that dict back into a `KVPruningConfig` with `KVPruningConfig.from_dict`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

ADDITIONAL_CONFIG_KEY = "kv_pruning"

# method -> surrogate kind; "none" switches pruning off.
KVZAP_METHODS = {"kvzap-mlp": "mlp", "kvzap-linear": "linear"}
# baselines scored without a surrogate (scorers/baselines.py), applied by the same DMS machinery
BASELINE_METHODS = ("window", "knorm", "random")
METHODS = ("none", *KVZAP_METHODS, *BASELINE_METHODS)
# options that only one method reads
METHOD_OPTIONS = {"sinks": ("window",), "seed": ("random",)}

# "paged": pruned pairs stop occupying KV memory; "mask": they are only hidden from attention.
MODES = ("paged", "mask")

DEFAULT_THRESHOLD = -4.0
DEFAULT_WINDOW = 128
DEFAULT_SINKS = 4


class KVPruningConfigError(ValueError):
    """A bad `kv_pruning` option; the message says which and what is accepted."""


@dataclass(frozen=True)
class KVPruningConfig:
    method: str = "none"
    threshold: float = DEFAULT_THRESHOLD
    window: int = DEFAULT_WINDOW
    surrogate: str | None = None
    stats_path: str | None = None
    mode: str = "paged"
    sinks: int = DEFAULT_SINKS
    seed: int = 0

    @property
    def paged(self) -> bool:
        return self.enabled and self.mode == "paged"

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def uses_surrogate(self) -> bool:
        return self.method in KVZAP_METHODS

    @property
    def surrogate_kind(self) -> str:
        return KVZAP_METHODS[self.method]

    def resolve_surrogate(self, model: str) -> str:
        """The surrogate to load: the explicit one, else `nvidia/KVzap-{kind}-{model basename}`."""
        if self.surrogate:
            return self.surrogate
        basename = os.path.basename(os.path.normpath(model))
        return f"nvidia/KVzap-{self.surrogate_kind}-{basename}"

    def to_dict(self) -> dict[str, Any]:
        options = asdict(self)
        for option, methods in METHOD_OPTIONS.items():
            if self.method not in methods:
                del options[option]
        return options

    @classmethod
    def from_dict(cls, options: Any) -> KVPruningConfig:
        """Validate a user-supplied `kv_pruning` dict; unknown keys and bad values are errors."""
        if options is None:
            return cls()
        if not isinstance(options, dict):
            raise KVPruningConfigError(
                f"kv_pruning must be a dict of options, got {type(options).__name__}: {options!r}"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(options) - known)
        if unknown:
            raise KVPruningConfigError(
                f"unknown kv_pruning option(s) {unknown}; accepted: {sorted(known)}"
            )
        method = options.get("method", "none")
        if method is None:
            method = "none"
        if method not in METHODS:
            raise KVPruningConfigError(
                f"unknown kv_pruning method {method!r}; choose one of {list(METHODS)}"
            )
        for option, methods in METHOD_OPTIONS.items():
            if option in options and method not in methods:
                raise KVPruningConfigError(
                    f"kv_pruning option {option!r} applies to method(s) {list(methods)} only, "
                    f"not {method!r}"
                )
        if options.get("surrogate") and method in BASELINE_METHODS:
            raise KVPruningConfigError(
                f"kv_pruning method {method!r} uses no surrogate; drop the surrogate option"
            )
        mode = options.get("mode", "paged")
        if mode not in MODES:
            raise KVPruningConfigError(
                f"unknown kv_pruning mode {mode!r}; choose one of {list(MODES)}"
            )
        return cls(
            mode=mode,
            method=method,
            threshold=_parse_threshold(options.get("threshold", DEFAULT_THRESHOLD)),
            window=_parse_window(options.get("window", DEFAULT_WINDOW)),
            surrogate=_parse_optional_str("surrogate", options.get("surrogate")),
            stats_path=_parse_optional_str("stats_path", options.get("stats_path")),
            sinks=_parse_count("sinks", options.get("sinks", DEFAULT_SINKS)),
            seed=_parse_count("seed", options.get("seed", 0)),
        )

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> KVPruningConfig:
        if not additional_config:
            return cls()
        return cls.from_dict(dict(additional_config).get(ADDITIONAL_CONFIG_KEY))


def _parse_threshold(value: Any) -> float:
    if isinstance(value, bool):
        raise KVPruningConfigError(f"kv_pruning threshold must be a number, got {value!r}")
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise KVPruningConfigError(
            f"kv_pruning threshold must be a number (e.g. -4, or -inf to prune nothing), "
            f"got {value!r}"
        ) from None
    if math.isnan(threshold) or threshold == math.inf:
        raise KVPruningConfigError(
            f"kv_pruning threshold must be a finite number or -inf, got {value!r}"
        )
    return threshold


def _parse_window(value: Any) -> int:
    return _parse_count("window", value)


def _parse_count(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise KVPruningConfigError(f"kv_pruning {name} must be an integer >= 0, got {value!r}")
    try:
        count = int(value)
        if count != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise KVPruningConfigError(
            f"kv_pruning {name} must be an integer >= 0, got {value!r}"
        ) from None
    if count < 0:
        raise KVPruningConfigError(f"kv_pruning {name} must be >= 0, got {count}")
    return count


def _parse_optional_str(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise KVPruningConfigError(f"kv_pruning {name} must be a string, got {value!r}")
    return os.fspath(value)
