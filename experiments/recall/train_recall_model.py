"""Train a small Qwen3 model from scratch on the recall task (``recall_task.py``), on CPU.

Part of the recall-model experiment (``experiments/recall/``)::

    python -m experiments.recall.train_recall_model --out .cache/recall_run [--seed 0] \
        [--max-steps 6000]

Model: Qwen3 architecture, hidden 128, 2 layers, 4 query / 2 KV heads of 32 (~370k parameters;
at hidden 64 the runs stalled at the "not an already answered value" plateau, see
``experiments/recall/recall_training_attempts.md``), AdamW lr 1e-3. Curriculum: stage i samples
contexts with up to ``STAGES[i]`` = (pairs, filler segments); it moves to the next stage when the
held-out answer accuracy at the stage's maximum reaches ``--advance-acc``; at the last stage
training stops once answers reach ``--target-acc`` and the repeat turn ``--target-repeat-acc``
(token accuracy), or at ``--time-budget-min``. Loss: cross-entropy on the answer tokens, plus
(weight ``--repeat-weight``) on the repeated context of the examples that have a ``<repeat>`` turn
(``--repeat-prob``), so that the model can reconstruct its context (KVzip+ targets), plus
optionally (``--lm-weight``) a next-token loss on all tokens. Data for step ``s`` depends only on
``(seed, s)``, so a run resumed from ``OUT/ckpt.pt`` (written every ``--ckpt-every`` steps) sees the
same batches. Writes ``OUT/train_curve.json`` / ``.png`` as it goes and, at the end,
``OUT/model`` (HF format, float32, with the word-level tokenizer), ``OUT/model/eval.json`` (answer
accuracy on held-out contexts at the longest length) and copies of the curve next to it.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.recall.recall_task import PAD, TOKEN_TO_ID, build_tokenizer, make_example

# (max pairs, max filler segments) per curriculum stage; the last one is the target length.
# Starting at 2 pairs let the model settle on "not an already answered value" (75% at 2 pairs).
STAGES = [(4, 2), (6, 4), (8, 8), (12, 12), (16, 16)]
EVAL_SEED_BASE = 1_000_000_000  # held-out contexts: seeds >= this; training seeds stay below

MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10_000.0,
    tie_word_embeddings=False,
)


def qwen3_config(overrides: dict | None = None):
    from tools.make_tiny_model import qwen3_config as config_for

    return config_for(dict(MODEL_CONFIG, **(overrides or {})), build_tokenizer())


def _train_seed(seed: int, step: int, i: int) -> int:
    return ((seed * 1_000_003 + step) * 1024 + i) % EVAL_SEED_BASE


def sample_batch(seed: int, step: int, batch: int, stage: int, repeat_prob: float,
                 value_first: bool = False):
    """Examples for one step: pairs/filler uniform up to the stage's maxima."""
    rng = random.Random(_train_seed(seed, step, 10**6))
    max_p, max_f = STAGES[stage]
    exs = []
    for i in range(batch):
        n_p = rng.randint(min(2, max_p), max_p)  # one pair alone is trivial
        n_f = rng.randint(0, max_f)
        exs.append(
            make_example(
                _train_seed(seed, step, i), n_p, n_f,
                with_repeat=rng.random() < repeat_prob, value_first=value_first,
            )
        )
    return exs


@functools.cache
def stage_batch(stage: int, min_batch: int, tokens_per_batch: int) -> int:
    """Examples per step: about ``tokens_per_batch`` tokens (short stages get bigger batches)."""
    mean_len = sum(len(make_example(i, *STAGES[stage]).ids) for i in range(32)) / 32
    return max(min_batch, min(512, int(tokens_per_batch / mean_len)))


def collate(exs, repeat_weight: float):
    """Right-padded input ids [B, T] and per-target-position weights [B, T-1] (shifted)."""
    T = max(len(e.ids) for e in exs)
    ids = torch.full((len(exs), T), TOKEN_TO_ID[PAD], dtype=torch.long)
    ans_w = torch.zeros(len(exs), T)
    rep_w = torch.zeros(len(exs), T)
    for b, e in enumerate(exs):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        ans_w[b, e.answer_positions] = 1.0
        if e.repeat is not None and repeat_weight > 0:
            r0, r1 = e.repeat
            rep_w[b, r0 : r1 + 1] = 1.0  # the repeated context and the token after it
    return ids, ans_w[:, 1:], rep_w[:, 1:]


def forward_logits(model, ids):
    # Right padding + causal attention: pads never influence real tokens, so no mask is needed.
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def evaluate(model, n_pairs: int, n_filler: int, n: int = 128, batch: int = 32, with_repeat=False):
    """Answer accuracy (argmax, teacher forced) and repeat-token accuracy on held-out contexts."""
    model.eval()
    correct = total = rep_correct = rep_total = 0
    for s in range(0, n, batch):
        exs = [
            make_example(EVAL_SEED_BASE + i, n_pairs, n_filler, with_repeat=with_repeat)
            for i in range(s, min(n, s + batch))
        ]
        ids, ans_w, rep_w = collate(exs, 1.0)
        pred = forward_logits(model, ids)[:, :-1].argmax(-1)
        hit = pred == ids[:, 1:]
        correct += (hit & (ans_w > 0)).sum().item()
        total += (ans_w > 0).sum().item()
        rep_correct += (hit & (rep_w > 0)).sum().item()
        rep_total += (rep_w > 0).sum().item()
    model.train()
    out = {"acc": correct / max(total, 1)}
    if with_repeat:
        out["repeat_acc"] = rep_correct / max(rep_total, 1)
    return out


def plot_curve(curve: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ev = [c for c in curve if "acc" in c]
    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    tr = [c for c in curve if "loss" in c]
    ax1.plot([c["step"] for c in tr], [c["loss"] for c in tr], color="tab:blue", lw=0.8,
             label="train loss (answers)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss", color="tab:blue")
    ax1.set_yscale("log")
    ax2 = ax1.twinx()
    ax2.plot([c["step"] for c in ev], [c["acc"] for c in ev], "o-", color="tab:red", ms=3,
             label="held-out acc (stage max)")
    ax2.plot([c["step"] for c in ev], [c["acc_final"] for c in ev], "s--", color="tab:green",
             ms=3, label=f"held-out acc at {STAGES[-1]}")
    rp = [c for c in ev if "repeat_acc" in c]
    if rp:
        ax2.plot([c["step"] for c in rp], [c["repeat_acc"] for c in rp], "^:", color="tab:purple",
                 ms=3, label="repeat-turn token acc")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("answer accuracy")
    for c in ev:
        if c.get("advanced"):
            ax2.axvline(c["step"], color="gray", lw=0.5, ls=":")
    fig.legend(loc="center right", bbox_to_anchor=(0.9, 0.45), fontsize=8)
    ax1.set_title("recall-qwen3 training (dotted: curriculum stage advances)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_hf(model, out_dir: Path) -> None:
    from tools.make_tiny_model import save_hf_model

    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf_model(model.to(torch.float32), build_tokenizer(model.config.max_position_embeddings),
                  out_dir)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.recall.train_recall_model",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".cache/recall_run"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--time-budget-min", type=float, default=55.0, help="stop after this (0: none)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens-per-batch", type=int, default=8192,
                    help="batch grows to about this many tokens at short stages")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--hidden", type=int, default=MODEL_CONFIG["hidden_size"])
    ap.add_argument("--layers", type=int, default=MODEL_CONFIG["num_hidden_layers"])
    ap.add_argument("--intermediate", type=int, default=MODEL_CONFIG["intermediate_size"])
    ap.add_argument("--repeat-prob", type=float, default=0.5)
    ap.add_argument("--repeat-weight", type=float, default=0.5)
    ap.add_argument("--lm-weight", type=float, default=0.0,
                    help="weight of an auxiliary next-token loss on all tokens (0: off)")
    ap.add_argument("--value-first-until", type=int, default=0,
                    help="facts read 'v42 k17 ;' before this step (a run that stalled on that "
                         "format but learned to copy was continued on 'k17 v42 ;')")
    ap.add_argument("--advance-acc", type=float, default=0.9)
    ap.add_argument("--target-acc", type=float, default=0.97,
                    help="stop at the last stage once answer accuracy reaches this...")
    ap.add_argument("--target-repeat-acc", type=float, default=0.95,
                    help="...and the repeat turn's token accuracy this (KVzip+ targets need a "
                         "model that can repeat its context)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-n", type=int, default=128)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--final-eval-n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared CPU")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--stages", default=None,
                    help="curriculum as 'pairs:filler,...' (default: %s)" % STAGES)
    ap.add_argument("--heads", type=int, default=MODEL_CONFIG["num_attention_heads"])
    args = ap.parse_args(argv)
    if args.stages:
        try:
            stages = [tuple(int(x) for x in st.split(":")) for st in args.stages.split(",")]
        except ValueError:
            stages = []
        if not stages or any(len(st) != 2 or st[0] < 1 or st[1] < 0 for st in stages):
            ap.error(f"--stages {args.stages!r}: expected 'pairs:filler,...' such as '4:2,16:16'")
        STAGES[:] = stages

    from transformers import Qwen3ForCausalLM

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(hidden_size=args.hidden, num_hidden_layers=args.layers,
                     intermediate_size=args.intermediate, num_attention_heads=args.heads,
                     num_key_value_heads=max(1, args.heads // 2))
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(qwen3_config(overrides))
    model.config._attn_implementation = "sdpa"
    model.train()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim == 2 and "embed" not in n else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    step, stage, curve, elapsed0 = 0, 0, [], 0.0
    ckpt = out / "ckpt.pt"
    if ckpt.exists() and not args.no_resume:
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, stage, curve, elapsed0 = st["step"], st["stage"], st["curve"], st["elapsed"]
        print(f"resumed from {ckpt} at step {step}, stage {stage}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    run_info = {"args": {k: str(v) for k, v in vars(args).items()},
                "command": "python -m experiments.recall.train_recall_model "
                + " ".join(argv or sys.argv[1:]),
                "model_config": dict(MODEL_CONFIG, **overrides), "n_params": n_params,
                "stages": STAGES}
    (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    print(f"model: {n_params} parameters; stages {STAGES}", flush=True)

    def save_ckpt():
        tmp = out / "ckpt.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "stage": stage, "curve": curve, "elapsed": elapsed}, tmp)
        tmp.replace(ckpt)

    def write_curve():
        (out / "train_curve.json").write_text(json.dumps(
            {"stages": STAGES, "curve": curve}, indent=1) + "\n")
        plot_curve(curve, out / "train_curve.png")

    t0 = time.time()
    elapsed = elapsed0
    loss_acc, n_acc = 0.0, 0
    done = False
    while step < args.max_steps and not done:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        bsz = stage_batch(stage, args.batch, args.tokens_per_batch)
        exs = sample_batch(args.seed, step, bsz, stage, args.repeat_prob,
                           value_first=step < args.value_first_until)
        ids, ans_w, rep_w = collate(exs, args.repeat_weight)
        logits = forward_logits(model, ids)[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none").view_as(ans_w)
        ans_loss = (nll * ans_w).sum() / ans_w.sum().clamp_min(1)
        loss = ans_loss
        if args.lm_weight > 0:
            real = (ids[:, 1:] != TOKEN_TO_ID[PAD]).float()
            loss = loss + args.lm_weight * (nll * real).sum() / real.sum()
        if rep_w.sum() > 0:
            loss = loss + args.repeat_weight * (nll * rep_w).sum() / rep_w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_acc += ans_loss.item()
        n_acc += 1
        elapsed = elapsed0 + time.time() - t0
        if step % 20 == 0:
            curve.append({"step": step, "loss": round(loss_acc / n_acc, 4), "stage": stage,
                          "lr": lr, "batch": bsz, "time_s": round(elapsed, 1)})
            loss_acc, n_acc = 0.0, 0
        if step % args.eval_every == 0:
            mp, mf = STAGES[stage]
            ev = evaluate(model, mp, mf, args.eval_n)
            ev_final = ev if stage == len(STAGES) - 1 else evaluate(model, *STAGES[-1], 64)
            if not (curve and curve[-1]["step"] == step):
                curve.append({"step": step, "stage": stage})
            entry = curve[-1]
            entry.update(acc=round(ev["acc"], 4), acc_final=round(ev_final["acc"], 4))
            if stage == len(STAGES) - 1 and ev["acc"] >= args.target_acc:
                rep = evaluate(model, *STAGES[-1], n=64, with_repeat=True)
                entry["repeat_acc"] = round(rep["repeat_acc"], 4)
                done = rep["repeat_acc"] >= args.target_repeat_acc
            elif stage < len(STAGES) - 1 and ev["acc"] >= args.advance_acc:
                stage += 1
                entry["advanced"] = stage
            print(f"step {step} stage {stage} loss {entry.get('loss')} acc {ev['acc']:.3f} "
                  f"acc_final {ev_final['acc']:.3f} repeat_acc {entry.get('repeat_acc', '-')} "
                  f"lr {lr:.2e} t {elapsed:.0f}s", flush=True)
            write_curve()
        if step % args.ckpt_every == 0 or done:
            save_ckpt()
        if args.time_budget_min and elapsed > 60 * args.time_budget_min:
            print("time budget reached", flush=True)
            break
    save_ckpt()
    write_curve()

    # Final: held-out accuracy at the longest length, HF export.
    final = evaluate(model, *STAGES[-1], n=args.final_eval_n)
    rep = evaluate(model, *STAGES[-1], n=64, with_repeat=True)
    lengths = [len(make_example(EVAL_SEED_BASE + i, *STAGES[-1]).ids) for i in range(50)]
    eval_info = {
        "answer_accuracy": round(final["acc"], 4),
        "n_contexts": args.final_eval_n,
        "n_pairs": STAGES[-1][0],
        "n_filler": STAGES[-1][1],
        "mean_tokens_per_example": round(sum(lengths) / len(lengths), 1),
        "repeat_token_accuracy": round(rep["repeat_acc"], 4),
        "answer_accuracy_with_repeat_turn": round(rep["acc"], 4),
        "eval_seeds": f"{EVAL_SEED_BASE}..{EVAL_SEED_BASE + args.final_eval_n - 1}",
        "steps": step,
        "final_stage": stage,
        "train_time_s": round(elapsed, 1),
        "n_params": n_params,
    }
    print(json.dumps(eval_info, indent=1), flush=True)
    model_dir = out / "model"
    save_hf(model, model_dir)
    (model_dir / "eval.json").write_text(json.dumps(eval_info, indent=2) + "\n")
    for f in ("train_curve.json", "train_curve.png"):
        if (out / f).exists():
            shutil.copy(out / f, model_dir / f)
    (out / "eval.json").write_text(json.dumps(eval_info, indent=2) + "\n")
    print(f"wrote {model_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
