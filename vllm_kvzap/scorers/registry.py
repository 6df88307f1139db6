"""Scoring methods as presses (kvpress's word): one small dataclass per method, and their registry.

Data flow: `kv_pruning.method` and the method's options -> `KVPruningConfig.press` (config.py
validates the names and options from this registry; the CLI's `--kv-pruning` choices and option
flags, and the README's method list, come from it too) -> the worker's `PruningRuntime` asks the
press for each layer's scores `[T, H_kv]` float32, which the DMS machinery applies (a pair is kept
iff its score >= the threshold once it has left the window, `rule.py`; or ranked in ratio mode).

A method is a `Press` subclass with a `name`, defined in any module of this package: `methods()`
imports them all, so a new method is one new file here and needs no other edit. Its options are
its dataclass fields (an int field is a count >= 0; `metadata={"help": ...}` is its flag's help),
given as `kv_pruning` keys or `--kv-pruning-<field>` flags and accepted only with that method.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from vllm_kvzap.attention.runtime import PruningRuntime

# the built-in methods' modules, first and in this order (the order of the CLI's choices and of
# error messages); any other module of the package follows, in alphabetical order
BUILT_IN = ("kvzap", "baselines")


@dataclass(frozen=True)
class Press:
    """A scoring method: scores a layer's KV pairs, from the layer's input or from its keys."""

    name: ClassVar[str]  # the `kv_pruning` method name
    help: ClassVar[str] = ""  # a few words after its name in `--kv-pruning`'s help
    # its scores tell pairs apart: ratio mode may rank them and a request's own threshold means
    # something (not window's +-inf)
    has_scores: ClassVar[bool] = True
    surrogate_kind: ClassVar[str | None] = None  # a KVzap surrogate's kind ("mlp", "linear")

    def input_scores(
        self,
        runtime: PruningRuntime,
        layer_idx: int,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor | None:
        """Scores [T, H_kv] float32 of the step's tokens from the layer's input `[T, D]` and their
        positions `[T]`, in torch ops traced into the compiled model; None: scored from the keys.
        `runtime` gives this rank's `num_kv_heads`, its `heads` (tensor parallelism) and the
        loaded `surrogate`."""
        return None

    def key_scores(self, key: torch.Tensor) -> torch.Tensor | None:
        """Scores [T, H_kv] float32 from the step's keys `[T, H_kv, D]` (in the attention backend,
        after the key norm and RoPE); None: the method scores the layer's input."""
        return None


@functools.cache
def methods() -> dict[str, type[Press]]:
    """Method name -> Press class, built-ins first (`BUILT_IN`), then by module and definition."""
    package = importlib.import_module(__package__)
    names = {m.name for m in pkgutil.iter_modules(package.__path__)} - {"registry"}
    found: dict[str, type[Press]] = {}
    for module_name in (*BUILT_IN, *sorted(names - set(BUILT_IN))):
        module = importlib.import_module(f"{__package__}.{module_name}")
        for obj in vars(module).values():
            if not (isinstance(obj, type) and issubclass(obj, Press) and "name" in vars(obj)):
                continue
            if obj.__module__ != module.__name__:
                continue  # imported here, defined elsewhere
            if obj.name in found or obj.name == "none":
                raise RuntimeError(f"kv_pruning method {obj.name!r} is defined twice or reserved")
            found[obj.name] = obj
    return found
