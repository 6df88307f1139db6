"""vLLM's CPU attention kernel: the same (query, KV pair) products in vLLM's own layout and as the
plugin's (request, KV head) rows, per pair, on one decode batch.

    python -m benchmarks.attention_microbenchmark [--batch 32] [--contexts 150,400,1000]
        [--repeats 40] [--threads N] [--dtypes bfloat16,float32] [--block-sizes 128,16]
        [--out benchmarks/results/attention_micro.json]

Shape: SmolLM2-135M's attention (9 query / 3 KV heads of 64), `--batch` decode requests of each
context length. One KV cache `[blocks, H_kv, block_size, 2 D]` per block size holds the pairs
(random block order), written by vLLM's `cpu_attn_reshape_and_cache`; every config of that block
size reads the same cache, and all are timed round-robin (one call of each per round: load from
other processes falls on all alike; min and median reported, min is the robust number on a busy
machine):

- `vllm bs=128`: vLLM's CPU backend as plain vLLM calls it (its default CPU block size 128: ISA
  `vec`), `[B, H_q, D]` queries, all KV heads of a request in one kernel sequence, the scheduler
  metadata built for the call (vLLM builds it once per step and shares it among layers);
- `vllm bs=16`: the same on pages of 16 slots (ISA `vec16`, the plugin's default block size);
- `rows G=3`: the plugin's rows (`attention/rows.py`): the cache viewed as a pool of (block, head)
  pages `[blocks * H_kv, 1, 2 bs, D]`, one kernel sequence per (request, KV head) with
  `num_kv_heads = 1` and its GQA group of 3 query heads, scheduler metadata built per call;
- `rows G=3->4`: the same rows with the query-head group padded to 4 (a zero query head, its
  output dropped). vLLM's kernel shares one K/V pass among a sequence's query heads only when
  their count divides its per-pass tile (`MaxQHeadNumPerIteration`, 8 on `vec`, 16 on `vec16`;
  `use_gqa` in csrc/cpu/cpu_attn_impl.hpp): this config tests whether G = 3 misses that path.
- `metadata only`: `cpu_attn_get_scheduler_metadata` for the rows alone (a per-layer cost where
  the rows are rebuilt per layer, `rows.RowMetadata`).

Each config's output is checked against a float64 softmax attention in plain torch (max abs
error), and the padded rows against the unpadded ones (bit-exact expected: each query head's row
of the kernel's tiles takes the same operations in the same order). ns per pair = time / (B x H_q
x context): one query head against one KV pair.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import save_json
from vllm_kvzap.compat import (
    cpu_attention_with_kv_cache,
    cpu_attn_get_scheduler_metadata,
    cpu_attn_reshape_and_cache,
    envs,
)

H_Q, H_KV, D = 9, 3, 64
G = H_Q // H_KV
PADDED_G = 4


def isa_for(block_size: int) -> str:
    return "vec" if block_size % 32 == 0 else "vec16"


def make_cache(batch, context, block_size, dtype, gen):
    """A KV cache holding `batch` requests of `context` tokens in random blocks; the keys and
    values as dense tensors for the reference."""
    pages_per_req = -(-context // block_size)
    num_blocks = batch * pages_per_req + 1
    cache = torch.zeros(num_blocks, H_KV, block_size, 2 * D, dtype=dtype)
    kv = cache.view(num_blocks, H_KV, 2 * block_size, D)
    key_cache, value_cache = kv.chunk(2, dim=2)
    block_ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).view(batch, pages_per_req)
    keys = torch.randn(batch, context, H_KV, D, generator=gen).to(dtype)
    values = torch.randn(batch, context, H_KV, D, generator=gen).to(dtype)
    pos = torch.arange(context)
    slots = block_ids[:, pos // block_size] * block_size + pos % block_size  # [B, ctx]
    cpu_attn_reshape_and_cache(
        keys.reshape(-1, H_KV, D), values.reshape(-1, H_KV, D), key_cache, value_cache,
        slots.reshape(-1), isa_for(block_size),
    )  # fmt: skip
    return cache, key_cache, value_cache, block_ids.int(), keys, values


def reference(query, keys, values, scale):
    """float64 softmax attention: query [B, H_q, D], keys/values [B, ctx, H_kv, D]."""
    q = query.double().view(-1, H_KV, G, D)
    k, v = keys.double(), values.double()
    logits = torch.einsum("bhgd,bthd->bhgt", q, k) * scale
    return torch.einsum("bhgt,bthd->bhgd", logits.softmax(-1), v).reshape(-1, H_Q, D)


def timed_interleaved(calls: dict, repeats: int) -> dict:
    """(median, min) seconds of each call, timed round-robin (one call of each per round)."""
    for fn in calls.values():
        fn()  # warm-up (the kernel's scratchpad is sized by the first call)
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def build_configs(batch, context, block_size, dtype, gen, query, scale, split):
    """{label: (call, output or None)} for one block size, and the float64 reference."""
    cache, key_cache, value_cache, block_ids, keys, values = make_cache(
        batch, context, block_size, dtype, gen
    )
    isa = isa_for(block_size)
    configs = {}

    # vLLM's own layout, as its CPU backend calls it
    out = torch.empty(batch, H_Q, D, dtype=dtype)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)

    def vllm_call():
        md = cpu_attn_get_scheduler_metadata(
            num_reqs=batch, num_heads=H_Q, num_kv_heads=H_KV, head_dim=D, seq_lens=seq_lens,
            dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=split,
        )  # fmt: skip
        cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=qsl, seq_lens=seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=block_ids, softcap=0.0,
            scheduler_metadata=md, s_aux=None,
        )  # fmt: skip

    configs[f"vllm bs={block_size}"] = (vllm_call, out)

    # the plugin's rows: (block, head) pages, one kernel sequence per (request, KV head)
    num_blocks = cache.shape[0]
    pages = cache.view(num_blocks * H_KV, 1, 2 * block_size, D)
    rk, rv = pages.chunk(2, dim=2)
    rows = batch * H_KV
    heads = torch.arange(H_KV, dtype=torch.int32)
    row_bt = (block_ids[:, None, :] * H_KV + heads[None, :, None]).reshape(rows, -1).contiguous()
    row_lens = torch.full((rows,), context, dtype=torch.int32)
    row_qsl = torch.arange(rows + 1, dtype=torch.int32)

    def metadata(gp):
        return cpu_attn_get_scheduler_metadata(
            num_reqs=rows, num_heads=gp, num_kv_heads=1, head_dim=D, seq_lens=row_lens,
            dtype=dtype, query_start_loc=row_qsl, causal=True, sliding_window_size=-1,
            isa=isa, enable_kv_split=split,
        )  # fmt: skip

    def rows_attend(q, o, gp):
        cpu_attention_with_kv_cache(
            query=q, key_cache=rk, value_cache=rv, output=o, query_start_loc=row_qsl,
            seq_lens=row_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=row_bt, softcap=0.0, scheduler_metadata=metadata(gp), s_aux=None,
        )  # fmt: skip

    q_rows = query.view(rows, G, D)
    o_rows = torch.empty(batch, H_Q, D, dtype=dtype)
    configs[f"rows G={G} bs={block_size}"] = (
        lambda: rows_attend(q_rows, o_rows.view(rows, G, D), G), o_rows,
    )  # fmt: skip

    q_pad = torch.zeros(rows, PADDED_G, D, dtype=dtype)
    o_pad = torch.empty(rows, PADDED_G, D, dtype=dtype)
    o_padded = torch.empty(batch, H_Q, D, dtype=dtype)

    def padded_call():
        q_pad[:, :G].copy_(q_rows)
        rows_attend(q_pad, o_pad, PADDED_G)
        o_padded.view(rows, G, D).copy_(o_pad[:, :G])

    configs[f"rows G={G}->{PADDED_G} bs={block_size}"] = (padded_call, o_padded)
    configs[f"metadata only bs={block_size}"] = (lambda: metadata(G), None)
    return configs, reference(query, keys, values, scale)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--contexts", default="150,400,1000")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--block-sizes", default="128,16")
    parser.add_argument("--out", default="benchmarks/results/attention_micro.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = D**-0.5
    split = bool(envs.VLLM_CPU_ATTN_SPLIT_KV)
    report = {
        "shape": {"batch": args.batch, "H_q": H_Q, "H_kv": H_KV, "D": D},
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "split_kv": split,
        "repeats": args.repeats,
        "results": {},
    }
    print(f"{args.batch} decode requests, {H_Q}/{H_KV} heads of {D}, {torch.get_num_threads()} "
          f"threads; per (query head, KV pair): min (median) of {args.repeats} rounds")  # fmt: skip
    for context in (int(c) for c in args.contexts.split(",")):
        pairs = args.batch * H_Q * context
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator().manual_seed(0)
            query = torch.randn(args.batch, H_Q, D, generator=gen).to(dtype)
            configs, refs = {}, {}
            for bs in (int(b) for b in args.block_sizes.split(",")):
                c, ref = build_configs(args.batch, context, bs, dtype, gen, query, scale, split)
                configs.update(c)
                refs.update(dict.fromkeys(c, ref))
            times = timed_interleaved({k: c[0] for k, c in configs.items()}, args.repeats)
            res = {}
            print(f"context {context}, {dtype_name}:")
            for label, (_, out) in configs.items():
                med, best = times[label]
                r = {"median_ms": med * 1e3, "min_ms": best * 1e3}
                if out is None:
                    print(f"  {label:22s} {best * 1e6:8.1f} us ({med * 1e6:.1f})")
                else:
                    r.update(
                        ns_per_pair=best / pairs * 1e9,
                        ns_per_pair_median=med / pairs * 1e9,
                        max_err=(out.double() - refs[label]).abs().max().item(),
                    )
                    line = (f"  {label:22s} {r['ns_per_pair']:6.2f} ns/pair "
                            f"({r['ns_per_pair_median']:6.2f})  {best * 1e3:7.3f} ms  "
                            f"max err {r['max_err']:.1e}")  # fmt: skip
                    if "->" in label:
                        unpadded = configs[label.replace(f"->{PADDED_G}", "")][1]
                        r["equal_to_unpadded"] = bool(torch.equal(out, unpadded))
                        line += f"  bit-exact vs G={G}: {r['equal_to_unpadded']}"
                    print(line)
                res[label] = r
            report["results"][f"{context}/{dtype_name}"] = res
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_json(out_path, report)
    print(f"saved {out_path}")


if __name__ == "__main__":
    main()
