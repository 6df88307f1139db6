"""Quality vs KV pruned on a real model (SmolLM2-135M-Instruct), through vLLM with the plugin.

    python -m benchmarks.quality_benchmark [--quick] [--out benchmarks/results/quality]
        [--methods kvzap-mlp,...] [--fractions 0.5,...] [--prefill dense,chunked] [--name quality]

Three tasks whose answers need the context, asked at the end of a chat prompt so that they are
answered *during decoding*, against the pruned cache. How the prompt itself is attended depends on
the plugin's ``prefill`` option: ``dense`` (the default, as kvpress) attends the whole prompt
densely and judges it at its end; ``chunked`` judges, after each chunk of vLLM's chunked prefill,
the prompt tokens that left the window and frees the pruned ones, so later chunks attend only to
the kept pairs, the window and themselves:

- ``passkey``: a 5-digit pass key hidden at a random depth in repeated filler (0.5k-4k tokens);
  correct when the answer contains it;
- ``facts``: four "X's favourite T is V." facts spread through natural text (Python's own module
  documentation, not part of the surrogates' training corpus), one question per fact; correct when
  the answer contains V;
- ``chat``: ordinary requests about a passage ("summarise", "what is it for", ...): the share of
  the first 64 greedy tokens identical (position by position) to the unpruned answer, and the mean
  log-prob the pruned model gives the unpruned answer (teacher-forced, vLLM's raw log-probs).

Methods: ``kvzap-mlp`` / ``kvzap-linear`` (the bundled surrogates), ``knorm``, ``random`` and
``window`` (sinks + recent window), each on the plugin's DMS machinery (window ``--window`` never
pruned). One engine per method: every pruning level runs in the same batch, with per-request
thresholds (``extra_args["kv_pruning"]``); ``window`` needs one engine per window size. Thresholds
are calibrated offline (transformers, the same scores on calibration contexts of the same tasks) to
target pruned fractions; the x axis is the fraction the plugin measured. The unpruned reference is
the same engine with ``"none"`` per request; a ``"none"`` level in each method's batch measures how
far bfloat16 batch effects alone move the answers. Prints a table, saves JSON and a plot
(``--name``: ``<name>.json`` / ``<name>.png`` under ``--out``).

``--prefill dense,chunked`` runs every method once per prefill mode, at the same calibrated
thresholds (calibration uses dense scores; the measured pruned fraction of ``chunked`` may differ a
little): rows ``<method> chunked`` beside ``<method>``, dashed in the plot. The dense engines keep
vLLM's CPU defaults (chunked prefill of 4096 tokens a step, so a prompt is mostly prefilled in one
step, and dense prefill attends it whole anyway); the chunked ones run
``enable_chunked_prefill=True`` with ``max_num_batched_tokens`` ``--chunk-tokens`` (256 by default:
every prompt, 0.3k-4k tokens, is split into 2-16 chunks, and a chunk is twice the 128-token window,
so most of each chunk's context has already been judged; vLLM's step budget is shared by the batch,
so a chunk may be smaller). The unpruned reference comes from the first engine (dense when it is
among the modes).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import harness, report

DEFAULT_MODEL = report.REPO / ".cache" / "SmolLM2-135M-Instruct"
METHODS = ("kvzap-mlp", "kvzap-linear", "knorm", "random", "window")
PREFILL_MODES = ("dense", "chunked")  # the plugin's kv_pruning "prefill" option
CHUNK_TOKENS = 256  # max_num_batched_tokens of the chunked-prefill engines
FRACTIONS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
PASSKEY_LENS = (500, 1000, 2000, 4000)
FACTS_LENS = (500, 1000, 2000)
CHAT_TOKENS = 64
ANSWER_TOKENS = 16

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")  # fmt: skip
NAMES = ("Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas")
THINGS = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "city": ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Sydney"),
    "animal": ("cat", "horse", "owl", "dolphin", "tiger", "rabbit", "eagle", "wolf"),
    "fruit": ("apple", "mango", "cherry", "banana", "peach", "lemon", "grape", "plum"),
}
DOC_MODULES = ("json", "csv", "argparse", "statistics", "heapq", "itertools", "random", "string",
               "collections", "logging", "textwrap", "pickle", "zipfile", "unittest", "sqlite3",
               "email", "decimal", "fractions", "sched", "queue")  # fmt: skip
CHAT_ASKS = (
    "Summarise the text above in three sentences.",
    "What is the module described above used for? Explain to a beginner.",
    "Write a short list of the main ideas in the text above.",
    "Explain the most important function or class described above.",
)


@dataclass
class Case:
    task: str  # passkey | facts | chat
    length: int  # target context tokens
    prompt: list[int]
    answer: str = ""  # passkey / facts: the expected string
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


def module_docs() -> list[str]:
    import importlib

    docs = []
    for name in DOC_MODULES:
        doc = (importlib.import_module(name).__doc__ or "").strip()
        if len(doc) > 400:
            docs.append(" ".join(doc.split()))
    return docs


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
        return_dict=False,
    )  # fmt: skip


def fit_text(tokenizer, make, length: int) -> str:
    """The text ``make(n)`` (n repeats / sentences) whose chat prompt is closest to ``length``."""
    lo, hi = 1, 4 * length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(chat_ids(tokenizer, make(mid))) <= length:
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


def passkey_case(tokenizer, length: int, rng: random.Random) -> Case:
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.1, 0.8)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    ask = "What is the pass key? Answer with the number only."

    def make(n: int) -> str:
        at = int(n * depth)
        return ("There is important info hidden inside a lot of irrelevant text. Find it and "
                "memorise it. " + FILLER * at + needle + FILLER * (n - at) + "\n\n" + ask)  # fmt: skip

    text = fit_text(tokenizer, make, length)
    return Case("passkey", length, chat_ids(tokenizer, text), key, {"depth": round(depth, 2)})


def facts_cases(tokenizer, length: int, rng: random.Random, docs: list[str]) -> list[Case]:
    names = rng.sample(NAMES, 4)
    things = rng.sample(sorted(THINGS), 4)
    facts = [(n, t, rng.choice(THINGS[t])) for n, t in zip(names, things)]
    sentences = [s.strip() + "." for d in docs for s in d.split(". ") if len(s) > 20]
    start = rng.randrange(len(sentences))
    cases = []
    for name, thing, value in facts:

        def make(n: int, name=name, thing=thing) -> str:
            body = [sentences[(start + i) % len(sentences)] for i in range(n)]
            for j, (fn, ft, fv) in enumerate(facts):  # spread evenly, in order
                body.insert(int(len(body) * (j + 0.5) / len(facts)) + j,
                            f"{fn}'s favourite {ft} is {fv}.")  # fmt: skip
            return (" ".join(body) + f"\n\nQuestion: what is {name}'s favourite {thing}? "
                    "Answer with one word.")  # fmt: skip

        text = fit_text(tokenizer, make, length)
        cases.append(Case("facts", length, chat_ids(tokenizer, text), value,
                          {"name": name, "thing": thing}))  # fmt: skip
    return cases


def chat_cases(tokenizer, docs: list[str], count: int, offset: int) -> list[Case]:
    cases = []
    for i in range(count):
        passage = " ".join(docs[(offset + 2 * i + j) % len(docs)] for j in range(2))
        text = passage + "\n\n" + CHAT_ASKS[i % len(CHAT_ASKS)]
        ids = chat_ids(tokenizer, text)
        cases.append(Case("chat", len(ids), ids, "", {"ask": CHAT_ASKS[i % len(CHAT_ASKS)]}))
    return cases


def build_cases(tokenizer, seed: int, quick: bool) -> list[Case]:
    rng = random.Random(seed)
    docs = module_docs()
    passkey_lens = PASSKEY_LENS[:2] if quick else PASSKEY_LENS
    facts_lens = FACTS_LENS[:1] if quick else FACTS_LENS
    cases = [passkey_case(tokenizer, n, rng) for n in passkey_lens for _ in range(2)]
    for n in facts_lens:
        cases += facts_cases(tokenizer, n, rng, docs)
    cases += chat_cases(tokenizer, docs, 2 if quick else 4, seed % len(docs))
    return cases


def is_correct(case: Case, text: str) -> bool:
    return case.answer.lower() in text.lower()


# --------------------------------------------------------------------------------------------------
# Calibration (offline, transformers, on contexts of the same tasks with another seed)
# --------------------------------------------------------------------------------------------------


def kv_tokens(case: Case) -> int:
    """Tokens whose KV a request of ``case`` holds at its end (prompt + answer)."""
    return len(case.prompt) + (CHAT_TOKENS if case.task == "chat" else ANSWER_TOKENS)


def judged_share(cases: list[Case], window: int) -> float:
    """Mean over requests of the share of their KV pairs that leave the window."""
    shares = [max(0, kv_tokens(c) - window) / kv_tokens(c) for c in cases]
    return sum(shares) / len(shares)


def calibrate(method: str, fraction: float, scores, share: float, cases: list[Case],
              sinks: int) -> dict:  # fmt: skip
    """Options whose pruned fraction is about ``fraction``: a per-request threshold (a quantile of
    the calibration scores), or the window size of the ``window`` baseline (from the lengths of the
    evaluation ``cases``, which is all it depends on)."""
    if method == "window":  # keeps sinks + window of each request: mean of min(1, kept / length)
        lengths = [kv_tokens(c) for c in cases]

        def kept(w: int) -> float:
            return sum(min(1.0, (w + sinks) / n) for n in lengths) / len(lengths)

        lo, hi = 1, max(lengths)
        while lo < hi:  # the smallest window that keeps at least 1 - fraction
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if kept(mid) < 1 - fraction else (lo, mid)
        return {"window": lo}
    return harness.threshold_options(method, fraction, scores, share)


# --------------------------------------------------------------------------------------------------
# Through vLLM
# --------------------------------------------------------------------------------------------------


def series_name(method: str, prefill: str) -> str:
    """The key of a method's rows: ``kvzap-mlp`` (dense prefill) or ``kvzap-mlp chunked``."""
    return method if prefill == "dense" else f"{method} {prefill}"


def engine_options(pruning: dict, prefill: str, chunk_tokens: int) -> tuple[dict, dict]:
    """(kv_pruning options, extra LLM arguments) of one prefill mode: dense engines keep vLLM's
    defaults; chunked ones add ``prefill: chunked`` and split prompts into small chunks."""
    if prefill == "dense":
        return pruning, {}
    if prefill not in PREFILL_MODES:
        raise ValueError(f"unknown prefill {prefill!r}; choose from {', '.join(PREFILL_MODES)}")
    return ({**pruning, "prefill": prefill},
            {"enable_chunked_prefill": True, "max_num_batched_tokens": chunk_tokens})  # fmt: skip


def engine_args(args, pruning: dict | None, prefill: str = "dense") -> dict:
    from benchmarks.forcing import ForcedTokens

    extra = {}
    if pruning:
        pruning, extra = engine_options(pruning, prefill, args.chunk_tokens)
    return dict(
        model=str(args.model), dtype=args.dtype, max_model_len=max(PASSKEY_LENS) + 256,
        kv_cache_memory_bytes=args.kv_cache_mib * 2**20, enforce_eager=True, seed=0,
        logits_processors=[ForcedTokens],
        additional_config={"kv_pruning": pruning} if pruning else {}, **extra,
    )  # fmt: skip


def requests_for(cases: list[Case], value, reference: dict | None) -> list[tuple]:
    """(prompt, SamplingParams kwargs, case index, kind) of one pruning level."""
    extra = {} if value is None else {"kv_pruning": value}
    out = []
    for i, c in enumerate(cases):
        n = CHAT_TOKENS if c.task == "chat" else ANSWER_TOKENS
        chat = c.task == "chat"  # its log-probs: the unpruned answer's, in the reference run
        out.append((c.prompt, {"max_tokens": n, "ignore_eos": chat,
                               "logprobs": 0 if chat else None, "extra_args": extra},
                    i, "free"))  # fmt: skip
        if c.task == "chat" and reference is not None:
            forced = reference["tokens"][i]
            out.append((c.prompt, {"max_tokens": len(forced), "ignore_eos": True, "logprobs": 0,
                                   "extra_args": {**extra, "forced_tokens": forced}},
                        i, "forced"))  # fmt: skip
    return out


def run_levels(llm, cases, levels: list, reference: dict | None, stats_path: Path) -> list[dict]:
    """Every level's requests in one batch; per level: outputs, accuracy and measured pruning."""
    from vllm import SamplingParams

    stats_path.unlink(missing_ok=True)
    batch = [(lv, r) for lv in range(len(levels)) for r in requests_for(cases, levels[lv], reference)]
    params = [SamplingParams(temperature=0.0, **r[1]) for _, r in batch]
    outs = llm.generate([{"prompt_token_ids": r[0]} for _, r in batch], params, use_tqdm=True)
    stats = harness.stats_by_id(stats_path, len(outs))
    missing = [o.request_id for o in outs if o.request_id not in stats]
    if missing:
        raise RuntimeError(f"no statistics line for requests {missing[:8]} in {stats_path}")
    results = [{"tokens": {}, "texts": {}, "logprob": {}, "stats": []} for _ in levels]
    for (lv, (_, _, i, kind)), out in zip(batch, outs):
        res, o = results[lv], out.outputs[0]
        if kind == "free":
            res["tokens"][i], res["texts"][i] = list(o.token_ids), o.text
        if o.logprobs and (kind == "forced" or reference is None):
            lps = [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]
            res["logprob"][i] = sum(lps) / len(lps)
        res["stats"].append(stats[out.request_id])
    return [summarise(cases, r, reference) for r in results]


def summarise(cases: list[Case], res: dict, reference: dict | None) -> dict:
    """Scores of one level (``reference`` None: this is the unpruned reference itself)."""
    by_task: dict[str, list[float]] = {"passkey": [], "facts": [], "chat_agreement": []}
    for i, c in enumerate(cases):
        if c.task == "chat":
            ref, got = (reference or res)["tokens"][i], res["tokens"][i]
            by_task["chat_agreement"].append(
                sum(a == b for a, b in zip(ref, got)) / max(1, len(ref)))
        else:
            by_task[c.task].append(float(is_correct(c, res["texts"][i])))
    point = {k: sum(v) / len(v) for k, v in by_task.items() if v}
    if res["logprob"]:
        point["chat_logprob"] = sum(res["logprob"].values()) / len(res["logprob"])
    st = res["stats"]
    if st:
        point["pruned_fraction"] = sum(s["pruned_fraction"] for s in st) / len(st)
        layers = len(st[0]["pruned_fraction_per_layer"])
        point["pruned_fraction_per_layer"] = [
            round(sum(s["pruned_fraction_per_layer"][j] for s in st) / len(st), 4)
            for j in range(layers)]  # fmt: skip
        point["kv_bytes_end_per_request"] = sum(s["resident_kv_bytes_end"] for s in st) / len(st)
        point["kv_bytes_peak_per_request"] = sum(s["resident_kv_bytes_peak"] for s in st) / len(st)
        point["dense_kv_bytes_per_request"] = sum(s["dense_kv_bytes"] for s in st) / len(st)
    else:
        point["pruned_fraction"] = 0.0
    point["tokens"], point["texts"] = res["tokens"], res["texts"]
    return point


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

METRICS = (("passkey", "passkey accuracy"), ("facts", "facts accuracy"),
           ("chat_agreement", "chat: share of the 64 unpruned tokens"),
           ("chat_logprob", "chat: mean log-prob of the unpruned answer"))  # fmt: skip


def peak_kv(p: dict) -> str:
    """A point's peak KV per request as a fraction of its dense KV ("-" where not measured)."""
    if "kv_bytes_peak_per_request" not in p:
        return "-"
    return f"{p['kv_bytes_peak_per_request'] / p['dense_kv_bytes_per_request']:.3f}"


def table(results: dict) -> str:
    """One row per point; the prefill column only when some rows are not dense; peak KV: a
    request's peak resident KV over its dense KV (chunked prefill lowers it)."""
    base, series = results["unpruned"], results["methods"]
    prefills = any(p.get("prefill", "dense") != "dense" for ps in series.values() for p in ps)

    def row(method: str, prefill: str, target: str, p: dict) -> str:
        return (f"{method:>13} " + (f"{prefill:>7} " if prefills else "")
                + f"{target:>6} {p.get('pruned_fraction', 0.0):6.3f} "
                + " ".join(f"{p.get(k, float('nan')):10.3f}" for k, _ in METRICS)
                + f" {peak_kv(p):>7}")  # fmt: skip

    head = (f"{'method':>13} " + (f"{'prefill':>7} " if prefills else "")
            + f"{'target':>6} {'pruned':>6} " + " ".join(f"{k[:10]:>10}" for k, _ in METRICS)
            + f" {'peak KV':>7}")
    rows = [head, "-" * len(head), row("unpruned", "-", "-", {**base, "pruned_fraction": 0.0})]
    for name, points in series.items():
        for p in points:
            prefill = p.get("prefill", "dense")
            method = p.get("method", name.removesuffix(f" {prefill}"))
            rows.append(row(method, prefill, f"{p['target']:.2f}", p))
    text = "\n".join(rows)
    print(text)
    return text


def plot(results: dict, path: Path) -> None:
    plt = report.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    base = results["unpruned"]
    colours: dict[str, str] = {}  # a method's colour; its chunked-prefill rows dashed, squares
    for ax, (key, label) in zip(axes, METRICS):
        for m, points in results["methods"].items():
            method = points[0].get("method", m) if points else m
            chunked = bool(points) and points[0].get("prefill", "dense") != "dense"
            colour = colours.setdefault(method, f"C{len(colours) % 10}")
            pts = sorted([(0.0, base[key])] + [(p["pruned_fraction"], p[key]) for p in points])
            ax.plot(*zip(*pts), "s--" if chunked else "o-", ms=4, label=m, color=colour,
                    lw=2.2 if m.startswith("kvzap") else 1.2)  # fmt: skip
        ax.set(xlabel="KV pairs pruned (measured by the plugin)", title=label, xlim=(0, 1))
        if key != "chat_logprob":
            ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    chunk = (f", chunked prefill: {results['chunk_tokens']} tokens a step"
             if "chunked" in results.get("prefill", ()) else "")  # fmt: skip
    fig.suptitle(f"SmolLM2-135M-Instruct through vLLM + vllm-kvzap (window {results['window']}, "
                 f"{results['dtype']}{chunk})", fontsize=10)  # fmt: skip
    report.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=report.REPO / "benchmarks" / "results" / "quality")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--window", type=int, default=128, help="DMS window (never pruned)")
    ap.add_argument("--sinks", type=int, default=4, help="sink tokens of the window method")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-mib", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill", default="dense",
                    help="the plugin's prefill mode(s), comma-separated: dense, chunked")
    ap.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS,
                    help="max_num_batched_tokens of the chunked-prefill engines")
    ap.add_argument("--name", default="quality", help="output files <name>.json, <name>.png")
    ap.add_argument("--quick", action="store_true", help="2 fractions, short contexts, 2 methods")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    prefills = sorted(set(args.prefill.split(",")), key=lambda x: (
        PREFILL_MODES.index(x) if x in PREFILL_MODES else len(PREFILL_MODES)))  # dense first
    for x in prefills:
        if x not in PREFILL_MODES:
            raise SystemExit(f"unknown prefill {x!r}; choose from {', '.join(PREFILL_MODES)}")
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.quick:
        fractions, methods = [0.5, 0.8], [m for m in methods if m in ("kvzap-mlp", "window")]
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"no model at {args.model}: run `bash tools/setup_env.sh` (it converts it)")
    from transformers import AutoTokenizer

    from vllm_kvzap.scorers import bundled_checkpoint_dir

    surrogates = {}
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m.startswith("kvzap"):
            found = bundled_checkpoint_dir(m.removeprefix("kvzap-"), args.model.name)
            if found is None:
                raise SystemExit(f"{m}: no bundled surrogate for {args.model.name}")
            surrogates[m] = found
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cases = build_cases(tokenizer, args.seed, args.quick)
    calib = build_cases(tokenizer, args.seed + 1000, quick=True)
    share = judged_share(cases, args.window)
    print(f"{len(cases)} cases ({sum(len(c.prompt) for c in cases)} prompt tokens); calibrating "
          f"on {len(calib)} other contexts ...", flush=True)  # fmt: skip
    # k_proj's output is the key before RoPE, which keeps norms: knorm's -||k||
    scores = harness.collect_scores(args.model, surrogates, [c.prompt for c in calib],
                                    knorm_keys="k_proj")  # fmt: skip
    stats_path = args.out / f"{args.name}_stats.jsonl"

    results = {"model": args.model.name, "dtype": args.dtype, "window": args.window,
               "prefill": prefills, "chunk_tokens": args.chunk_tokens,
               "cases": [{"task": c.task, "prompt_tokens": len(c.prompt), "answer": c.answer,
                          **c.info} for c in cases],
               "methods": {}}  # fmt: skip
    reference = None
    for m, prefill in [(m, x) for m in methods for x in prefills]:
        if m == "window":
            continue
        name = series_name(m, prefill)
        pruning = {"method": m, "window": args.window, "stats_path": str(stats_path)}
        if m in surrogates:
            pruning["surrogate"] = str(surrogates[m])
        opts = [calibrate(m, f, scores, share, cases, args.sinks) for f in fractions]
        with harness.engine(**engine_args(args, pruning, prefill)) as llm:
            if reference is None:  # unpruned: the same engine, "none" per request
                reference = results["unpruned"] = run_levels(llm, cases, ["none"], None,
                                                             stats_path)[0]  # fmt: skip
                print(f"unpruned: {_brief(results['unpruned'])}  ({time.perf_counter() - t0:.0f} s)")
            # a "none" level in the same batch: how far bfloat16 batch effects alone move the
            # answers from the reference (run in a batch of its own)
            control, *points = run_levels(llm, cases, ["none", *[o["threshold"] for o in opts]],
                                          reference, stats_path)  # fmt: skip
        results.setdefault("unpruned_in_batch", {})[name] = control
        print(f"{name:>21} unpruned in its batch: {_brief(control)}")
        results["methods"][name] = [{"method": m, "prefill": prefill, "target": f, **o, **p}
                                    for f, o, p in zip(fractions, opts, points)]  # fmt: skip
        for p in results["methods"][name]:
            print(f"{name:>21} target {p['target']:.2f}: {_brief(p)}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    if "window" in methods:
        if reference is None:
            raise SystemExit("the window baseline needs a threshold method first (the reference)")
        for prefill in prefills:
            name = series_name("window", prefill)
            results["methods"][name] = []
            for f in fractions:
                opts = calibrate("window", f, scores, share, cases, args.sinks)
                pruning = {"method": "window", "sinks": args.sinks, "stats_path": str(stats_path),
                           **opts}  # fmt: skip
                with harness.engine(**engine_args(args, pruning, prefill)) as llm:
                    point = run_levels(llm, cases, [None], reference, stats_path)[0]
                results["methods"][name].append(
                    {"method": "window", "prefill": prefill, "target": f, **opts, **point})
                print(f"{name:>21} target {f:.2f}: {_brief(point)}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    stats_path.unlink(missing_ok=True)
    results["table"] = table(results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["command"] = report.command("quality_benchmark", argv)
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    report.save_json(json_path, results)
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path} ({results['seconds']:.0f} s)")
    return 0


def _brief(p: dict) -> str:
    return (f"pruned {p['pruned_fraction']:.3f}  " + "  ".join(
        f"{k} {p[k]:.3f}" for k, _ in METRICS if k in p))


if __name__ == "__main__":
    raise SystemExit(main())
