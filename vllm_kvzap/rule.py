"""KVzap's pruning rule, written once: a KV pair is kept iff its score >= the threshold.

Pruned iff strictly below; a threshold of -inf keeps every pair. The page table (decoding and
prefill verdicts), mask mode and the scorers' torch paths all call `keep`; the tests' plain-torch
references (tests/reference_dms.py) write the rule independently on purpose.
"""

import torch


def keep(scores: torch.Tensor, thresholds) -> torch.Tensor:
    """Bool tensor, True where a pair is kept (`thresholds` broadcasts: a float or a tensor)."""
    return scores >= thresholds
