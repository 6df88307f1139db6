"""KV pruning options: the one place that parses, validates and defaults them.

Data flow: CLI flags (`--kv-pruning ...`) and `additional_config={"kv_pruning": {...}}` both end up as
a plain dict under `vllm_config.additional_config["kv_pruning"]`; every process (front end, engine
core, workers) turns that dict back into a `KVPruningConfig` with `KVPruningConfig.from_dict`. The
methods and their own options come from the scorers' registry (`scorers/registry.py`): the method
and its options become `KVPruningConfig.press`, which the worker asks for scores.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from vllm_kvzap.scorers.registry import Press, methods

ADDITIONAL_CONFIG_KEY = "kv_pruning"

# method name -> its press (scorers/registry.py); "none" switches pruning off
PRESSES = methods()
METHODS = ("none", *PRESSES)
# methods whose scores the target-ratio rule (AdaKV, scorers/adakv.py) can rank; `window` has no
# meaningful scores (+inf / -inf), so a ratio is refused for it
RATIO_METHODS = tuple(name for name, press in PRESSES.items() if press.has_scores)


def _press_options() -> dict[str, tuple[str, ...]]:
    """Each press's own options (its fields) -> the methods that have them."""
    options: dict[str, tuple[str, ...]] = {}
    for name, press in PRESSES.items():
        for f in fields(press):
            options[f.name] = (*options.get(f.name, ()), name)
    return options


PRESS_OPTIONS = _press_options()
# options that only some methods read
METHOD_OPTIONS = {**PRESS_OPTIONS, "ratio": RATIO_METHODS, "alpha": RATIO_METHODS}
# options of threshold mode, which a ratio excludes
THRESHOLD_OPTIONS = ("threshold", "window")

# "paged": pruned pairs stop occupying KV memory; "mask": they are only hidden from attention.
MODES = ("paged", "mask")
# when the prompt is judged: "dense" (kvpress): attended whole, judged at its end; "chunked": with
# vLLM's chunked prefill, after each chunk the tokens that left the window are judged and freed
PREFILL_MODES = ("dense", "chunked")

DEFAULT_THRESHOLD = -4.0
DEFAULT_WINDOW = 128
DEFAULT_ALPHA = 0.2


class KVPruningConfigError(ValueError):
    """A bad `kv_pruning` option; the message says which and what is accepted."""


@dataclass(frozen=True)
class KVPruningConfig:
    """Resolved options.

    Two decision rules. Threshold mode (the default, `ratio` None): kvpress's
    `DMSPress(press, threshold, sliding_window_size=window)`. Ratio mode (`ratio` set): kvpress's
    `AdaKVPress(press, alpha_safeguard=alpha)` with `compression_ratio=ratio`, decided once per
    layer at the end of the prompt (scorers/adakv.py); nothing generated afterwards is pruned. In
    ratio mode the fields hold the effective threshold-mode values, `threshold=-inf` (no pair is
    pruned by its score alone) and `window=0` (the whole prompt is judged); `to_dict` leaves both
    out.

    `prefill` (threshold mode, paged mode): "dense" attends the whole prompt before judging it, as
    kvpress does; "chunked" judges, after each chunk of vLLM's chunked prefill, the prompt tokens
    that left the window (the same rule as in decoding, applied per chunk instead of per token),
    so later chunks attend to the kept pairs, the window and themselves, and a prompt holds about
    kept + window + one chunk of KV memory instead of its dense size.

    `press`: the method with its own options (e.g. `Window(sinks=4)`), None when pruning is off;
    left out, the method's defaults.
    """

    method: str = "none"
    threshold: float = DEFAULT_THRESHOLD
    window: int = DEFAULT_WINDOW
    surrogate: str | None = None
    stats_path: str | None = None
    mode: str = "paged"
    press: Press | None = None
    ratio: float | None = None
    alpha: float = DEFAULT_ALPHA
    prefill: str = "dense"

    def __post_init__(self):
        if self.press is None and self.method in PRESSES:
            object.__setattr__(self, "press", PRESSES[self.method]())
        if self.press is not None and self.press.name != self.method:
            raise KVPruningConfigError(
                f"kv_pruning press {self.press!r} is not method {self.method!r}"
            )
        if self.prefill not in PREFILL_MODES:
            raise KVPruningConfigError(
                f"unknown kv_pruning prefill {self.prefill!r}; choose one of {list(PREFILL_MODES)}"
            )
        if self.prefill == "chunked" and (self.ratio is not None or self.mode != "paged"):
            raise KVPruningConfigError(
                "kv_pruning prefill 'chunked' (--kv-pruning-prefill) judges the prompt chunk by "
                "chunk against the threshold and frees the pruned pairs' pages: it runs in "
                "threshold mode and paged mode only, not with "
                + ("a ratio (ranked over the whole prompt at its end)" if self.ratio is not None
                   else f"mode {self.mode!r}")
            )
        if self.ratio is None:
            return
        if self.method not in RATIO_METHODS:
            raise KVPruningConfigError(
                f"kv_pruning option 'ratio' applies to method(s) {list(RATIO_METHODS)} only, "
                f"not {self.method!r}"
            )
        if self.threshold not in (DEFAULT_THRESHOLD, -math.inf) or self.window not in (
            DEFAULT_WINDOW,
            0,
        ):
            raise KVPruningConfigError(_RATIO_EXCLUDES.format(given="threshold/window"))
        object.__setattr__(self, "threshold", -math.inf)
        object.__setattr__(self, "window", 0)

    @property
    def ratio_mode(self) -> bool:
        """Target-ratio mode: AdaKV decisions at the end of the prompt, decoding never pruned."""
        return self.enabled and self.ratio is not None

    @property
    def rule(self) -> str:
        """The decision rule: "ratio" or "threshold" ("none" when pruning is off)."""
        if not self.enabled:
            return "none"
        return "ratio" if self.ratio_mode else "threshold"

    def rule_settings(self) -> dict[str, Any]:
        """The rule and its parameters, as statistics lines record them."""
        if self.ratio_mode:
            return {"rule": "ratio", "ratio": self.ratio, "alpha": self.alpha}
        settings = {"rule": self.rule, "threshold": self.threshold, "window": self.window}
        return {**settings, "prefill": self.prefill} if self.enabled else settings

    def describe_rule(self) -> str:
        """For logs: "ratio 0.5, alpha 0.2 (prompt only)", "threshold -4, window 128" or
        "threshold -4, window 128, chunked prefill"."""
        if self.ratio_mode:
            return f"ratio {self.ratio:g}, alpha {self.alpha:g} (prompt only)"
        chunked = ", chunked prefill" if self.prefill == "chunked" else ""
        return f"threshold {self.threshold:g}, window {self.window}{chunked}"

    @property
    def paged(self) -> bool:
        return self.enabled and self.mode == "paged"

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def uses_surrogate(self) -> bool:
        return self.surrogate_kind is not None

    @property
    def surrogate_kind(self) -> str | None:
        return None if self.press is None else self.press.surrogate_kind

    def resolve_surrogate(self, model: str) -> str:
        """The surrogate to load, first found of: the explicit one (`surrogate`,
        `--kv-pruning-surrogate`); the one bundled in this package for the model's basename
        (`vllm_kvzap/surrogates/KVzap-{kind}-{basename}`); NVIDIA's Hub id
        `nvidia/KVzap-{kind}-{basename}`."""
        from vllm_kvzap.scorers.surrogate import bundled_checkpoint_dir, default_surrogate_id

        if self.surrogate:
            return self.surrogate
        bundled = bundled_checkpoint_dir(self.surrogate_kind, model)
        if bundled is not None:
            return str(bundled)
        return default_surrogate_id(self.surrogate_kind, model)

    def to_dict(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "press":
                options.update(value or {})  # the method's own options, e.g. sinks
            else:
                options[key] = value
        # every process re-parses this dict: write only what from_dict accepts together
        if self.ratio is None:
            options.pop("ratio", None)
            options.pop("alpha", None)
        else:
            for option in THRESHOLD_OPTIONS:
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
        known = {f for f in cls.__dataclass_fields__} - {"press"} | set(PRESS_OPTIONS)
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
        for option, names in METHOD_OPTIONS.items():
            if option in options and method not in names:
                raise KVPruningConfigError(
                    f"kv_pruning option {option!r} applies to method(s) {list(names)} only, "
                    f"not {method!r}"
                )
        press = PRESSES.get(method)
        if options.get("surrogate") and press is not None and press.surrogate_kind is None:
            raise KVPruningConfigError(
                f"kv_pruning method {method!r} uses no surrogate; drop the surrogate option"
            )
        mode = options.get("mode", "paged")
        if mode not in MODES:
            raise KVPruningConfigError(
                f"unknown kv_pruning mode {mode!r}; choose one of {list(MODES)}"
            )
        # "given" = the key is in the dict with a value other than None: the CLI only copies the
        # flags that were typed, and to_dict leaves out what the other rule does not accept.
        ratio = options.get("ratio")
        if ratio is None:
            if options.get("alpha") is not None:
                raise KVPruningConfigError(
                    "kv_pruning option 'alpha' (--kv-pruning-alpha) is the safeguard of ratio "
                    "mode: add a ratio (--kv-pruning-ratio R), or drop alpha"
                )
            threshold = parse_threshold(options.get("threshold", DEFAULT_THRESHOLD))
            window = _parse_window(options.get("window", DEFAULT_WINDOW))
            alpha = DEFAULT_ALPHA
        else:
            ratio = parse_ratio(ratio)
            given = [o for o in THRESHOLD_OPTIONS if options.get(o) is not None]
            if given:
                raise KVPruningConfigError(_RATIO_EXCLUDES.format(given=" and ".join(given)))
            alpha = parse_alpha(options.get("alpha", DEFAULT_ALPHA))
            threshold, window = -math.inf, 0
        return cls(
            mode=mode,
            method=method,
            threshold=threshold,
            window=window,
            surrogate=_parse_optional_str("surrogate", options.get("surrogate")),
            stats_path=_parse_optional_str("stats_path", options.get("stats_path")),
            press=None if press is None else _parse_press(press, options),
            ratio=ratio,
            alpha=alpha,
            prefill=options.get("prefill") or "dense",
        )

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> KVPruningConfig:
        if not additional_config:
            return cls()
        return cls.from_dict(dict(additional_config).get(ADDITIONAL_CONFIG_KEY))


def parse_threshold(value: Any) -> float:
    """A threshold: a finite number or -inf (prunes nothing); numeric strings accepted."""
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


_RATIO_EXCLUDES = (
    "kv_pruning ratio (--kv-pruning-ratio) cannot be combined with {given} "
    "(--kv-pruning-threshold / --kv-pruning-window): a ratio prunes a fixed share of each layer's "
    "prompt at its end, with no threshold and no window; drop one or the other"
)


def _parse_fraction(name: str, value: Any, upper: float, upper_ok: bool, example: str) -> float:
    bound = f"0 <= {name} {'<=' if upper_ok else '<'} {upper:g}"
    if isinstance(value, bool):
        raise KVPruningConfigError(
            f"kv_pruning {name} must be a number with {bound}, got {value!r}"
        )
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise KVPruningConfigError(
            f"kv_pruning {name} must be a number with {bound} (e.g. {example}), got {value!r}"
        ) from None
    if not (0.0 <= number < upper or (upper_ok and number == upper)):  # NaN fails too
        raise KVPruningConfigError(f"kv_pruning {name} must satisfy {bound}, got {value!r}")
    return number


def parse_ratio(value: Any) -> float:
    """Compression ratio: the share of each layer's prompt KV pairs to prune, 0 <= R < 1."""
    return _parse_fraction("ratio", value, 1.0, False, "0.5 prunes half of the prompt")


def parse_alpha(value: Any) -> float:
    """Safeguard: each KV head keeps at least this share of a layer's kept pairs, 0 <= A <= 1."""
    return _parse_fraction("alpha", value, 1.0, True, "0.2")


def _parse_press(press: type[Press], options: dict[str, Any]) -> Press:
    """The method's press with its options: given ones parsed (an int option is a count >= 0),
    the others its defaults."""
    given = {f.name: options[f.name] for f in fields(press) if f.name in options}
    for name, value in given.items():
        if type(press.__dataclass_fields__[name].default) is int:
            given[name] = _parse_count(name, value)
    return press(**given)


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
