"""Tokens forced during decoding: a logits processor that forces given output tokens
(`extra_args["forced_tokens"]`; the accuracy benchmark's questions, the quality benchmark's
teacher-forced answers), and the recall task's requests built for it (the context, `<query>`,
then `? key FREE ;` per query; the tensor-parallel benchmark's prompts)."""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from experiments.recall.recall_task import QUERY, TOKEN_TO_ID, Example, encode

FREE = -1  # a decoding step the model chooses (an answer)


class ForcedTokens(AdapterLogitsProcessor):
    """Forces ``extra_args["forced_tokens"][i]`` at output step ``i`` (``-1``: left free)."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        forced = (params.extra_args or {}).get("forced_tokens")
        if not forced:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            i = len(output_ids)
            if i < len(forced) and forced[i] != FREE:
                logits.fill_(float("-inf"))
                logits[forced[i]] = 0.0
            return logits

        return force


def query_request(ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids: BOS context <query>, forced output tokens: ``? key FREE ;`` per query)."""
    prompt = ex.ids[: ex.context[1]] + encode([QUERY])
    forced = []
    for key in ex.query_keys:
        forced += [TOKEN_TO_ID["?"], TOKEN_TO_ID[key], FREE, TOKEN_TO_ID[";"]]
    return prompt, forced
