"""Train a KVzap surrogate for a model that has no published one, offline, and check its quality.

    python -m training.train_surrogate --model DIR_OR_ID --kind mlp|linear --out DIR
        --data FILE|DIR|GLOB|hf:NAME[:CONFIG][:SPLIT][:COLUMN] [MORE SOURCES ...]

then serve with it: ``vllm serve MODEL --kv-pruning kvzap-mlp --kv-pruning-surrogate DIR``
(``vllm-kvzap serve ...`` with the CPU build of vLLM).

Data flow: ``--data`` -> prompts (``surrogate_data``) -> KVzip+ targets in resumable shards
(``kvzip_targets``, default ``DIR-targets``) -> per-layer fit and R^2 on the test prompts
(``surrogate_fit``) -> **this module**: ``DIR/config.json`` + ``DIR/model.safetensors`` in the
published KVzap format (``vllm_kvzap.scorers.save_checkpoint``), ``DIR/r2.json``, ``DIR/r2.png``
and ``DIR/test_predictions.safetensors`` (``y.{l}``, ``pred.{l}``). Defaults are kvpress's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.kvzip_targets import (
    QUERY_NORMS,
    TargetStore,
    check_repeat_format,
    extract_targets,
)
from training.surrogate_data import load_prompts, prompts_digest
from training.surrogate_fit import FitConfig, fit_surrogate
from vllm_kvzap.scorers import save_checkpoint

TARGETS_FORMAT = 1


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" on required flags
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m training.train_surrogate",
        description="Train a KVzap surrogate (KVzip+ targets -> linear or MLP per layer).",
        formatter_class=_Help,
    )
    ap.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    ap.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="SOURCE",
        help="text file, directory of .txt/.md, glob, or hf:NAME[:CONFIG][:SPLIT][:COLUMN]; "
        "each source is one subset",
    )
    ap.add_argument("--kind", required=True, choices=("mlp", "linear"), help="surrogate kind")
    ap.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    ap.add_argument(
        "--targets",
        type=Path,
        default=None,
        help="target shards directory, reusable across runs and kinds (default: OUT-targets, "
        "next to OUT so that OUT holds only the checkpoint and its reports)",
    )
    g = ap.add_argument_group("data and targets")
    g.add_argument("--min-tokens", type=int, default=750, help="shortest prompt (tokens)")
    g.add_argument("--max-tokens", type=int, default=1250, help="longest prompt (tokens)")
    g.add_argument(
        "--tokens-per-prompt",
        type=int,
        default=500,
        help="context tokens kept (at random) per prompt",
    )
    g.add_argument("--prompts-per-subset", type=int, default=500, help="train prompts per source")
    g.add_argument(
        "--test-per-subset",
        type=int,
        default=5,
        help="held-out prompts per source (R^2 is measured on them)",
    )
    g.add_argument(
        "--query-norm",
        choices=QUERY_NORMS,
        default="attn_input",
        help="h_j of the KVzip+ normalisation: self-attention input (kvpress) or "
        "residual stream (decoder-layer input)",
    )
    g.add_argument(
        "--repeat-format",
        default=None,
        help="repeat prompt with '{context}' twice, e.g. '<|endoftext|> {context} <repeat> "
        "{context}' (default: the chat template, else kvpress's plain-text fallback)",
    )
    g.add_argument("--shard-size", type=int, default=8, help="prompts per target shard")
    g.add_argument(
        "--dtype", default="auto", help="model dtype for extraction (auto, bfloat16, ...)"
    )
    g = ap.add_argument_group("training")
    g.add_argument("--hidden-dim", type=int, default=512, help="MLP hidden width")
    g.add_argument("--epochs", type=int, default=15, help="MLP epochs (cosine schedule)")
    g.add_argument("--lr", type=float, default=5e-3, help="MLP AdamW learning rate")
    g.add_argument("--batch-size", type=int, default=512, help="MLP mini-batch rows")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of MLP training rows held out for the validation loss",
    )
    g.add_argument("--alpha", type=float, default=1.0, help="ridge penalty (linear)")
    ap.add_argument("--seed", type=int, default=0, help="prompt cuts, token sampling, MLP")
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="for extraction and MLP training",
    )
    return ap


def _model_shape(model: str, dtype: str) -> tuple[dict, int]:
    """Layers, hidden size and KV heads; and bytes per stored input value (the model's dtype)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model).get_text_config()
    shape = {
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
    }
    name = str(getattr(cfg, "dtype", None) or "bfloat16") if dtype == "auto" else dtype
    return shape, 4 if name.removeprefix("torch.") in ("float32", "float") else 2


def _model_key(model: str) -> str:
    """Local directories by absolute path (so ./m and m resume the same shards), hub ids as is."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def format_table(r2: torch.Tensor) -> str:
    heads = " ".join(f"{f'h{h}':>6}" for h in range(r2.shape[1]))
    lines = [f"{'layer':>5}  {'R^2':>6}   {heads}"]
    for layer, row in enumerate(r2.tolist()):
        per_head = " ".join(f"{v:6.3f}" for v in row)
        lines.append(f"{layer:>5}  {sum(row) / len(row):6.3f}   {per_head}")
    lines.append(f"{'mean':>5}  {r2.mean().item():6.3f}")
    return "\n".join(lines)


def plot_r2(r2: torch.Tensor, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the R^2 plot (pip install matplotlib)")
        return False
    layers = range(r2.shape[0])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * r2.shape[0] + 2), 3.2))
    ax.fill_between(
        layers, r2.min(1).values, r2.max(1).values, alpha=0.25, label="KV heads (min-max)"
    )
    ax.plot(layers, r2.mean(1), marker="o", label="mean over KV heads")
    ax.set(
        xlabel="layer",
        ylabel="R^2 (test prompts)",
        title=title,
        ylim=(min(0.0, r2.min().item()), 1.0),
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_targets(args: argparse.Namespace) -> TargetStore:
    """Prompts from ``--data``, then the target shards the store still lacks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.repeat_format is not None:
        try:
            check_repeat_format(args.repeat_format)
        except ValueError as e:
            raise SystemExit(f"--repeat-format: {e}") from None
    elif not getattr(tokenizer, "chat_template", None):
        print("note: the tokenizer has no chat template; repeat prompts use plain text")
    shape, x_bytes = _model_shape(args.model, args.dtype)
    prompts = load_prompts(
        args.data, tokenizer, args.min_tokens, args.max_tokens,
        args.prompts_per_subset, args.test_per_subset, args.seed,
    )  # fmt: skip
    n_split = {s: sum(p.split == s for p in prompts) for s in ("train", "test")}
    if not n_split["train"] or not n_split["test"]:
        raise SystemExit(
            f"not enough prompts of {args.min_tokens}..{args.max_tokens} tokens in "
            f"--data: {n_split['train']} train, {n_split['test']} test"
        )
    meta = {
        "format": TARGETS_FORMAT, "model": _model_key(args.model), "dtype": args.dtype,
        "query_norm": args.query_norm, "min_tokens": args.min_tokens,
        "max_tokens": args.max_tokens, "tokens_per_prompt": args.tokens_per_prompt,
        "seed": args.seed, "shard_size": args.shard_size, "prompts": n_split,
        "prompts_digest": prompts_digest(prompts), **shape,
    }  # fmt: skip
    if args.repeat_format is not None:  # absent otherwise: stores made before the flag still fit
        meta["repeat_format"] = args.repeat_format
    store = TargetStore(args.targets or args.out.with_name(args.out.name + "-targets"), meta)
    rows = len(prompts) * args.tokens_per_prompt
    size = rows * shape["num_layers"] * (shape["hidden_size"] * x_bytes + shape["num_kv_heads"] * 4)
    print(
        f"{n_split['train']} train + {n_split['test']} test prompts from {len(args.data)} "
        f"source(s): up to {rows} rows x {shape['num_layers']} layers, about "
        f"{size / 2**30:.2f} GiB of targets in {store.root}"
    )
    extract_targets(
        args.model, tokenizer, prompts, store, args.tokens_per_prompt, args.shard_size,
        args.seed, args.query_norm, args.dtype, args.device,
        repeat_format=args.repeat_format,
    )  # fmt: skip
    return store


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.tokens_per_prompt, args.test_per_subset, args.prompts_per_subset) < 1:
        raise SystemExit(
            "--tokens-per-prompt, --test-per-subset, --prompts-per-subset must be >= 1"
        )
    store = build_targets(args)
    cfg = FitConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FitConfig)})
    fit = fit_surrogate(store, args.kind, cfg)

    out: Path = args.out
    save_checkpoint(out, fit["config"], fit["state_dict"])
    tensors = {f"pred.{l}": p for l, p in enumerate(fit["pred"])}
    tensors |= {f"y.{l}": y for l, y in enumerate(fit["y"])}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "test_predictions.safetensors")
    r2 = fit["r2"]
    report = {
        "kind": args.kind, "model": args.model, "query_norm": args.query_norm,
        "train_rows": store.num_rows("train"), "test_rows": len(fit["y"][0]),
        "r2_mean": r2.mean().item(), "r2_per_layer": r2.mean(1).tolist(),
        "r2_per_layer_head": r2.tolist(),
        "command": "python -m training.train_surrogate "
        + shlex.join(sys.argv[1:] if argv is None else argv),
    }  # fmt: skip
    (out / "r2.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nR^2 per layer on {report['test_rows']} held-out tokens ({args.kind}):")
    print(format_table(r2))
    model = args.model if len(args.model) < 48 else "..." + args.model[-45:]
    if plot_r2(r2, out / "r2.png", f"KVzap-{args.kind}: {model}"):
        print(f"wrote {out / 'r2.png'}")
    print(f"wrote {out / 'config.json'}, {out / 'model.safetensors'}, {out / 'r2.json'}")
    print(
        f"serve with:  vllm serve {args.model} --kv-pruning kvzap-{args.kind} "
        f"--kv-pruning-surrogate {out}   (CPU build: vllm-kvzap serve ...)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
