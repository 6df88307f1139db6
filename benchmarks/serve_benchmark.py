"""Serving: `vllm-kvzap serve` driven by vLLM's own `bench serve` client, plain vLLM vs KVzap.

What a user measures: for each config in order, a server (`vllm-kvzap serve MODEL`, vLLM's CLI
plus the plugin's `--kv-pruning*` flags; `vllm` itself fails on the CPU build) on a free
loopback port, then `vllm-kvzap bench serve --backend vllm --dataset-name random` (every request
`--input-len` random tokens + `--output-len` generated ones, `--ignore-eos`, all sent at once:
`--request-rate inf`, same prompts for every config: `--seed 0`), then a scrape of the server's
`/metrics` (preemptions: `vllm:num_preemptions_total`; pruned fraction: the plugin's
`vllm:kv_pruning_pruned_pairs_total / vllm:kv_pruning_kv_pairs_total`, summed over engines), then
shutdown (SIGINT to the server's process group, then SIGKILL; also on Ctrl-C or an error).

Every server: `--dtype bfloat16`, `--seed 0`, `--max-model-len` input + output + 256, and a KV
budget `--kv-cache-memory-bytes` that holds `--dense-requests` (9) whole requests unpruned (bytes
per token from the model's config.json: layers x KV heads x head dim x 2 (K, V) x 2 bytes,
requests rounded up to vLLM's CPU block of 128 tokens); everything else is vLLM's default.
Configs (`--configs`, comma-separated names; the default list takes `--thresholds`):

- `plain`: no `--kv-pruning` flag;
- `plain-ample`: the same with memory for every request at once (what memory alone can buy);
- `kvzap t=T dense`: `--kv-pruning kvzap-mlp --kv-pruning-threshold T` (the bundled surrogate of
  SmolLM2; on this workload T=-4 prunes p~0.48 of the pairs, T=-2.5 p~0.70);
- `kvzap t=T chunked`: the same with `--kv-pruning-prefill chunked`.

    python -m benchmarks.serve_benchmark [--quick] [--configs NAME,NAME] [--thresholds=-4,-2.5]
        [--num-prompts 32] [--dense-requests 9] [--model .cache/SmolLM2-135M-Instruct]
        [--out benchmarks/results/serve]

On 2 quiet cores each server takes 1.5-3 minutes to start (it compiles the model) and each
client run 1-2.5 minutes: the five defaults took 24 minutes. Run nothing else meanwhile: beside
other engine runs (load average 8-30) the plugin's decode steps were 7-9x slower and it measured
0.2-0.4x plain vLLM, while plain vLLM measured nearly the same under that load (the plugin's step
has many more small ops; threads contending for the cores hurt them most: not profiled). The
load average around each client run is saved. `--quick` (8 prompts of 256 + 32 tokens, memory
for 3 requests; ~4 min a config) checks that the script works. Saves vLLM's result JSON per config (`<config>.json`),
`serve.json` (configs, commands, settings, metrics, the plugin's git state), the printed table
(`serve.txt`) and `serve.png` (`serve_quick.*` and `quick_<config>.json` with `--quick`) under
`--out`; server and client logs go to `--out`/logs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks import harness, report

REPO = report.REPO
CLI = str(Path(sys.executable).parent / "vllm-kvzap")
DEFAULT_MODEL = ".cache/SmolLM2-135M-Instruct"
BLOCK = 128  # vLLM's CPU default block size
DTYPE = "bfloat16"
PRUNED, PAIRS = "vllm:kv_pruning_pruned_pairs_total", "vllm:kv_pruning_kv_pairs_total"
PREEMPTIONS, FRACTION_GAUGE = "vllm:num_preemptions_total", "vllm:kv_pruning_pruned_fraction"
CACHE_INFO = ("engine", "block_size", "num_gpu_blocks", "kv_cache_size_tokens",
              "kv_cache_max_concurrency", "enable_prefix_caching")  # fmt: skip
RESULT_KEYS = (
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput", "max_concurrent_requests",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
    "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
)  # fmt: skip


def config_flags(name: str) -> tuple[list[str], bool]:
    """(the server's --kv-pruning* flags, ample memory) of a config name."""
    if name in ("plain", "plain-ample"):
        return [], name == "plain-ample"
    m = re.fullmatch(r"kvzap t=(\S+)(?: (dense|chunked))?", name)
    if not m:
        raise SystemExit(f"unknown config {name!r}: plain, plain-ample, 'kvzap t=T [chunked]'")
    flags = ["--kv-pruning", "kvzap-mlp", f"--kv-pruning-threshold={m.group(1)}"]
    if m.group(2) == "chunked":  # dense prefill is the plugin's default
        flags += ["--kv-pruning-prefill", "chunked"]
    return flags, False


def scrape(text: str) -> dict:
    """Summary of a /metrics page: every sample summed over its label sets (engines)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    cache_info, gauge = [], []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
            if s.name == "vllm:cache_config_info":
                cache_info.append({k: s.labels.get(k) for k in CACHE_INFO})
            elif s.name == FRACTION_GAUGE:
                gauge.append(s.value)
    pairs, get = totals.get(PAIRS), totals.get
    return {"preemptions": get(PREEMPTIONS), "pruned_pairs": get(PRUNED), "kv_pairs": pairs,
            "pruned_fraction": get(PRUNED, 0.0) / pairs if pairs else None,
            "pruned_fraction_gauge": gauge,  # per engine: the plugin's own ratio
            "prefix_cache_hits": get("vllm:prefix_cache_hits_total"),
            "prompt_tokens": get("vllm:prompt_tokens_total"),
            "generation_tokens": get("vllm:generation_tokens_total"),
            "cache_config_info": cache_info}  # fmt: skip


def derive(rows: list[dict]) -> None:
    """x plain (output tok/s over plain's) and, for pruned configs, 1/(1-p)."""
    plain = next((r for r in rows if r["config"] == "plain" and r.get("output_throughput")), None)
    for r in rows:
        if plain and r.get("output_throughput"):
            r["x_plain"] = r["output_throughput"] / plain["output_throughput"]
        p = r.get("pruned_fraction")
        if p is not None and r["config"].startswith("kvzap") and p < 1:
            r["ideal_gain"] = 1 / (1 - p)


def table(rows: list[dict]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    head = (f"{'config':<22} {'out tok/s':>9} {'x plain':>7} {'TTFT mean/med ms':>17} "
            f"{'TPOT mean/med ms':>17} {'pruned':>6} {'preempt':>7} {'1/(1-p)':>7}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:<22} error: {r['error']}")
            continue
        ttft = f"{f(r.get('mean_ttft_ms'), '.0f')}/{f(r.get('median_ttft_ms'), '.0f')}"
        tpot = f"{f(r.get('mean_tpot_ms'), '.1f')}/{f(r.get('median_tpot_ms'), '.1f')}"
        lines.append(
            f"{r['config']:<22} {f(r.get('output_throughput'), '.1f'):>9} "
            f"{f(r.get('x_plain'), '.2f'):>7} {ttft:>17} {tpot:>17} "
            f"{f(r.get('pruned_fraction'), '.3f'):>6} {f(r.get('preemptions'), '.0f'):>7} "
            f"{f(r.get('ideal_gain'), '.2f'):>7}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = report.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4.2))
    names = [r["config"] for r in rows]
    vals = [r.get("output_throughput") or 0 for r in rows]
    colors = ["tab:gray" if n.startswith("plain") else "tab:blue" for n in names]
    ax.bar(range(len(rows)), vals, 0.6, color=colors)
    for i, r in enumerate(rows):
        note = f"{vals[i]:.0f}"
        if r.get("pruned_fraction") is not None:
            note += f"\np={r['pruned_fraction']:.2f}"
        if r.get("preemptions") is not None:
            note += f"\npreempt {r['preemptions']:.0f}"
        ax.text(i, vals[i], note, ha="center", va="bottom", fontsize=7)
    for name, style in (("plain", "--"), ("plain-ample", ":")):
        level = next((r.get("output_throughput") for r in rows if r["config"] == name), None)
        if level:
            ax.axhline(level, color="k", lw=0.8, ls=style, label=f"{name} {level:.0f} tok/s")
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("output tok/s")
    ax.set_ylim(0, max(vals + [1]) * 1.3)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")
    report.save_figure(fig, path, dpi=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def wait_healthy(proc, base: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); log {log}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s; log {log}:\n{tail(log)}")


def stop(proc) -> None:
    """SIGINT to the server's process group (its engine processes too), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # leftovers of the group (engine core processes)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_config(name: str, args, kv_bytes: int, prefix: str) -> dict:
    flags, _ = config_flags(name)
    slug = prefix + re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server_log, bench_log = logs / f"{slug}.server.log", logs / f"{slug}.bench.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [CLI, "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
             "--dtype", DTYPE, "--seed", "0", "--max-model-len", str(args.max_model_len),
             "--kv-cache-memory-bytes", str(kv_bytes), "--disable-uvicorn-access-log",
             *flags]  # fmt: skip
    bench = [CLI, "bench", "serve", "--backend", "vllm", "--base-url", base,
             "--model", args.model, "--tokenizer", args.model, "--dataset-name", "random",
             "--random-input-len", str(args.input_len), "--random-output-len",
             str(args.output_len), "--random-range-ratio", "0", "--num-prompts",
             str(args.num_prompts), "--ignore-eos", "--temperature", "0", "--seed", "0",
             "--request-rate", "inf",
             "--percentile-metrics", "ttft,tpot,itl,e2el", "--disable-tqdm", "--save-result",
             "--result-dir", str(args.out), "--result-filename", f"{slug}.json"]  # fmt: skip
    row = {"config": name, "server_command": serve, "bench_command": bench,
           "kv_cache_memory_bytes": kv_bytes, "server_log": str(server_log)}  # fmt: skip
    print(f"\n=== {name}: {' '.join(serve)}", flush=True)
    t0 = time.monotonic()
    with open(server_log, "w") as log:
        proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)  # fmt: skip
    try:
        wait_healthy(proc, base, server_log, args.startup_timeout)
        row["startup_s"] = time.monotonic() - t0
        print(f"healthy after {row['startup_s']:.0f} s; bench: {' '.join(bench)}", flush=True)
        t1, load = time.monotonic(), os.getloadavg()[0]
        with open(bench_log, "w") as log:
            done = subprocess.run(bench, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                  check=False)  # fmt: skip
        row["bench_s"] = time.monotonic() - t1
        row["load_avg_1m"] = [load, os.getloadavg()[0]]  # others' load skews the timings
        if done.returncode != 0:
            raise RuntimeError(f"bench serve failed ({done.returncode}); log {bench_log}:\n"
                               f"{tail(bench_log)}")  # fmt: skip
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
            row.update(scrape(resp.read().decode()))
    except (RuntimeError, OSError, ValueError) as e:  # the next config still runs
        print(f"{name}: {e}", flush=True)
        row["error"] = str(e).splitlines()[0]
        return row
    finally:
        stop(proc)
        row["total_s"] = time.monotonic() - t0
    result = json.loads((args.out / f"{slug}.json").read_text())
    row.update({k: result.get(k) for k in RESULT_KEYS}, result_file=str(args.out / f"{slug}.json"))
    settings = re.search(r"non-default args: (.*)", server_log.read_text(errors="replace"))
    row["server_non_default_args"] = settings.group(1) if settings else None
    if result.get("failed"):
        print(f"{name}: {result['failed']} requests failed; first error: "
              f"{next(e for e in result.get('errors', []) if e)!r}")  # fmt: skip
    print(f"{name}: {row['output_throughput']:.1f} output tok/s, bench {row['bench_s']:.0f} s, "
          f"total {row['total_s']:.0f} s, load average {row['load_avg_1m'][0]:.1f} -> "
          f"{row['load_avg_1m'][1]:.1f}", flush=True)  # fmt: skip
    return row


def provenance() -> dict:
    def run(*cmd):
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        return done.stdout.strip()

    return {  # the plugin's code as the servers load it
        "vllm": run(sys.executable, "-c", "import vllm; print(vllm.__version__)"),
        "git_commit": run("git", "rev-parse", "HEAD"),
        "git_uncommitted": run("git", "status", "--porcelain", "--", "vllm_kvzap").splitlines(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", help="comma-separated names (default: plain, plain-ample, "
                        "kvzap t=T dense per threshold, kvzap t=LAST chunked)")  # fmt: skip
    parser.add_argument("--thresholds", default="-4,-2.5", help="write --thresholds=-4,-2.5")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    for flag in ("--num-prompts", "--input-len", "--output-len"):
        parser.add_argument(flag, type=int, help="32, 1024, 256 (--quick: 8, 256, 32)")
    parser.add_argument("--dense-requests", type=int, help="KV budget in whole requests: 9 (3)")
    parser.add_argument("--quick", action="store_true", help="8 prompts of 256 + 32 tokens")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    args = parser.parse_args(argv)
    defaults = (8, 256, 32, 3) if args.quick else (32, 1024, 256, 9)
    for key, value in zip(("num_prompts", "input_len", "output_len", "dense_requests"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    ts = [t.strip() for t in args.thresholds.split(",") if t.strip()]
    configs = ([c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else
               ["plain", "plain-ample", *(f"kvzap t={t} dense" for t in ts),
                f"kvzap t={ts[-1]} chunked"])  # fmt: skip
    for name in configs:
        config_flags(name)  # unknown names fail before any server starts
    if Path(args.model).exists():  # the server's model name; the client sends the same
        args.model = str(Path(args.model).resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    args.max_model_len = args.input_len + args.output_len + 256
    per_token = harness.kv_bytes_per_token(harness.model_shape(Path(args.model)), DTYPE)
    per_request = harness.dense_kv_bytes(args.input_len + args.output_len, BLOCK, per_token)
    budget = args.dense_requests * per_request
    ample = per_request * max(args.num_prompts + 1, 16 * args.dense_requests)
    suffix, prefix = ("_quick", "quick_") if args.quick else ("", "")
    settings = {
        "model": args.model, "dtype": DTYPE, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len,
        "max_model_len": args.max_model_len, "seed": 0, "temperature": 0, "request_rate": "inf",
        "kv_bytes_per_token": per_token, "block_tokens_assumed": BLOCK,
        "dense_requests": args.dense_requests, "kv_cache_memory_bytes": budget,
        "ample_kv_cache_memory_bytes": ample,
    }  # fmt: skip
    print(f"KV budget {budget / 2**20:.1f} MiB ({args.dense_requests} dense requests of "
          f"{args.input_len}+{args.output_len} tokens, {per_token} B/token); ample "
          f"{ample / 2**20:.0f} MiB; configs: {configs}")  # fmt: skip

    rows, t0, prov = [], time.monotonic(), provenance()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    for name in configs:
        rows.append(run_config(name, args, ample if config_flags(name)[1] else budget, prefix))
    derive(rows)
    text = table(rows)
    print("\n" + text)
    out = args.out / f"serve{suffix}.json"
    report.save_json(out, {"settings": settings, "configs": configs, **prov, "results": rows,
                           "wall_s": time.monotonic() - t0})  # fmt: skip
    (args.out / f"serve{suffix}.txt").write_text(text + "\n")
    title = (f"vllm-kvzap serve + vllm bench serve: {args.num_prompts} x ({args.input_len} + "
             f"{args.output_len}) tokens, KV budget {args.dense_requests} dense requests")  # fmt: skip
    plot(rows, args.out / f"serve{suffix}.png", title)
    print(f"saved {out}, serve{suffix}.txt and serve{suffix}.png")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
