"""The step profiler of the throughput benchmark: perf_counter timers around named functions of
the plugin and of vLLM, by category, in a child process with an in-process engine.

What is timed (`PROFILE_CATEGORIES`, "module:qualname") is exclusive time: a timed function nested
in another is charged to its own category only. Functions that do not exist (the code moves) are
skipped with a printed note. `PROFILE_TOTALS` gives the step total (`EngineCore.step`), so "rest" =
step - scoring handoff - bookkeeping - attention, for the plugin and for plain vLLM alike; steps
where every scheduled request decodes one token are told apart (`SCHEDULE_TARGET`). A profiling
pass (`run_profile`) runs `python -m benchmarks.profiling JOB` and returns its per-phase split.
`top_level_ops` counts the tensor ops a call issues (torch's profiler).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks.harness import describe_engine, drive, engine, engine_kwargs, run_child

# What to time, by category ("module:qualname"). Exclusive time: when a timed function
# runs inside another timed function, its time is charged to its own category and taken out of
# the outer one (so e.g. the attention kernel called from a bookkeeping function counts as
# attention). Entries listed under "rest" are timed only to carve vLLM's own work out of a plugin
# function that wraps it. Missing modules/functions are skipped with a note.
PROFILE_CATEGORIES: dict[str, list[str]] = {
    # The surrogate itself runs inside the compiled model graph (`PruningRuntime.graph_scores`
    # is called only while vLLM traces the model; wrapping it would put a timer into the traced
    # code), so its time is part of the model's forward ("rest" / model exec) and cannot be
    # timed by wrapping. What is timed here is the hand-off: the custom op's impl that stores a
    # layer's scores and the backend taking them (+ mask mode's keep flags).
    "scoring": [
        "vllm_kvzap.attention.runtime:PruningRuntime.save_scores",
        "vllm_kvzap.attention.runtime:PruningRuntime.layer_scores",
        "vllm_kvzap.attention.runtime:PruningRuntime.keep_flags",  # mask mode
    ],
    "bookkeeping": [
        # paged mode's page table (DESIGN.md section 8): the step's plan, the layer's writes and
        # moves, releases and reports
        "vllm_kvzap.cache.page_table:PageTable.plan",
        "vllm_kvzap.cache.page_table:PageTable.write_layer",
        "vllm_kvzap.cache.page_table:PageTable.release",
        "vllm_kvzap.cache.page_table:PageTable.finish_step",
        "vllm_kvzap.cache.page_table:PageTable.reports",
        "vllm_kvzap.cache.page_table:PageTable.finished_counts",
        # the KV connector's worker side (releases finished requests, per-step reports)
        "vllm_kvzap.connector:KVzapPruningConnector.bind_connector_metadata",
        "vllm_kvzap.connector:KVzapPruningConnector.build_connector_worker_meta",
        # scheduler-side accounting
        "vllm_kvzap.cache.manager:KVzapBlockManager.get_num_blocks_to_allocate",
        "vllm_kvzap.cache.manager:KVzapBlockManager.allocate_new_blocks",
        "vllm_kvzap.cache.manager:KVzapBlockManager.apply_report",
        "vllm_kvzap.cache.manager:KVzapBlockManager.free",
        # the plugin's metadata builder (vLLM's own build, which it calls, is carved out below)
        "vllm_kvzap.attention.cpu_backend:KVzapCPUAttentionMetadataBuilder.build",
        "vllm_kvzap.attention.cuda_backend:KVzapTritonAttentionMetadataBuilder.build",
    ],
    "attention": [
        # rows + vLLM's CPU kernel (`vllm_kvzap.attention.rows`), wrapped where the backend
        # looks it up (its `from ... import attend_layer` copy)
        "vllm_kvzap.attention.cpu_backend:attend_layer",
        "vllm_kvzap.kernels.paged_attention:paged_attention_masked_torch",  # mask mode
        # vLLM's CPU attention: plain vLLM's backend, and the kernel ops wherever called from
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
        "vllm._custom_ops:cpu_attention_with_kv_cache",
        "vllm._custom_ops:cpu_attn_get_scheduler_metadata",
        # the CUDA path (host-side times only: kernels run asynchronously on a GPU)
        "vllm_kvzap.attention.cuda_backend:attend_layer_triton",
        "vllm.v1.attention.backends.triton_attn:TritonAttentionImpl.forward",
    ],
    "rest": [
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.build",
        "vllm.v1.attention.backends.triton_attn:TritonAttentionMetadataBuilder.build",
    ],
}
SPLIT_CATEGORIES = ("scoring", "bookkeeping", "attention")
# Totals (inclusive time, outermost call only): the engine step, and the model runner inside it.
PROFILE_TOTALS: dict[str, list[str]] = {
    "step": [
        "vllm.v1.engine.core:EngineCore.step",
        "vllm.v1.engine.core:EngineCore.step_with_batch_queue",
    ],
    "model_execute": [
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
    ],
}
SCHEDULE_TARGET = "vllm.v1.core.sched.scheduler:Scheduler.schedule"  # to tell decode-only steps


class Timers:
    """perf_counter timers around named functions: exclusive time per target, inclusive per
    totals group (outermost call only)."""

    def __init__(self):
        self.local = threading.local()
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.group_inclusive: dict[str, float] = defaultdict(float)

    def _state(self):
        if not hasattr(self.local, "stack"):
            self.local.stack, self.local.depth = [], defaultdict(int)
        return self.local.stack, self.local.depth

    def wrap(self, target: str, fn, group: str | None = None):
        timers = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack, depth = timers._state()
            stack.append(0.0)
            if group:
                depth[group] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                child = stack.pop()
                timers.exclusive[target] += dt - child
                timers.calls[target] += 1
                if stack:
                    stack[-1] += dt
                if group:
                    depth[group] -= 1
                    if depth[group] == 0:
                        timers.group_inclusive[group] += dt

        timed.__benchmark_timed__ = True
        return timed


def _resolve(target: str):
    module_name, _, qualname = target.partition(":")
    module = importlib.import_module(module_name)
    owner, parts = module, qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return module, owner, parts[-1]


def patch_target(target: str, make_wrapper) -> str | None:
    """Replace the function named `target` by make_wrapper(fn); returns a note if skipped."""
    try:
        module, owner, name = _resolve(target)
    except Exception as e:  # noqa: BLE001 - any import failure means "not there (now)"
        return f"{target}: not importable ({type(e).__name__}: {e})"
    try:
        raw = inspect.getattr_static(owner, name)
    except AttributeError:
        return f"{target}: no such function"
    if isinstance(raw, staticmethod):
        new = staticmethod(make_wrapper(raw.__func__))
    elif isinstance(raw, classmethod):
        new = classmethod(make_wrapper(raw.__func__))
    elif callable(raw):
        if getattr(raw, "__benchmark_timed__", False):
            return f"{target}: already timed (listed twice?)"
        new = make_wrapper(raw)
    else:
        return f"{target}: not a function ({type(raw).__name__})"
    setattr(owner, name, new)
    if owner is module:  # also rebind `from module import fn` copies in loaded modules
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or mod is module or not mod_name.startswith(("vllm", "benchmarks")):
                continue
            for attr, value in list(getattr(mod, "__dict__", {}).items()):
                if value is raw:
                    setattr(mod, attr, new)
    return None


def install_profiling(timers: Timers) -> tuple[list[str], list[str]]:
    notes, timed = [], []
    for targets in PROFILE_CATEGORIES.values():
        for target in targets:
            note = patch_target(target, lambda fn, t=target: timers.wrap(t, fn))
            (notes.append(note) if note else timed.append(target))
    for group, targets in PROFILE_TOTALS.items():
        for target in targets:
            note = patch_target(target, lambda fn, t=target, g=group: timers.wrap(t, fn, g))
            (notes.append(note) if note else timed.append(target))
    return notes, timed


def profile_child(job_path: str) -> None:
    """Runs in a child process with VLLM_ENABLE_V1_MULTIPROCESSING=0; the parent prints its
    notes (functions not found), once per run."""
    job = json.loads(Path(job_path).read_text())
    timers = Timers()
    notes, timed = install_profiling(timers)
    last_schedule: dict = {}

    def capture(fn):
        @functools.wraps(fn)
        def schedule(*args, **kwargs):
            out = fn(*args, **kwargs)
            counts = list(getattr(out, "num_scheduled_tokens", {}).values())
            last_schedule["decode_only"] = bool(counts) and all(c == 1 for c in counts)
            last_schedule["num_tokens"] = sum(counts)
            return out

        schedule.__benchmark_timed__ = True
        return schedule

    note = patch_target(SCHEDULE_TARGET, capture)
    if note:
        notes.append(f"{note} (decode-only steps cannot be told apart)")

    category_of = {t: c for c, ts in PROFILE_CATEGORIES.items() for t in ts}

    def snapshot() -> dict[str, float]:
        snap = {c: 0.0 for c in (*SPLIT_CATEGORIES, "rest_timed")}
        for target, seconds in list(timers.exclusive.items()):
            cat = category_of.get(target)
            if cat in SPLIT_CATEGORIES:
                snap[cat] += seconds
            elif cat == "rest":
                snap["rest_timed"] += seconds
        for group in PROFILE_TOTALS:
            snap[group] = timers.group_inclusive.get(group, 0.0)
        return snap

    per_step: list[dict] = []  # one entry per engine step that ran something
    state = {"before": None, "t": None}

    t0 = time.perf_counter()
    with engine(**job["engine"], distributed_executor_backend="uni") as llm:
        startup = time.perf_counter() - t0
        engine_config = describe_engine(llm)
        state["before"], state["t"] = snapshot(), time.perf_counter()

        def on_step(outs):
            now, after = time.perf_counter(), snapshot()
            delta = {k: after[k] - state["before"].get(k, 0.0) for k in after}
            delta["client_step"] = now - state["t"]
            state["before"], state["t"] = after, now
            last = dict(last_schedule)
            last_schedule.clear()
            if not last.get("num_tokens") and not delta.get("step"):
                return  # nothing ran
            delta["decode_only"] = bool(last.get("decode_only"))
            per_step.append(delta)

        result, _ = drive(llm, job["prompts"], job["output_lens"], on_step=on_step)
    out = dict(result, startup_s=startup, engine_config=engine_config, notes=notes, timed=timed,
               steps={"all": len(per_step), "decode": sum(d["decode_only"] for d in per_step)},
               phases={})  # fmt: skip
    for phase in ("all", "decode"):
        rows = [d for d in per_step if phase == "all" or d["decode_only"]]
        if not rows:
            continue
        n = len(rows)
        source = "step" if any(d.get("step") for d in rows) else "client_step"
        totals = [d[source] for d in rows]
        total = sum(totals)
        split = {c: sum(d.get(c, 0.0) for d in rows) for c in SPLIT_CATEGORIES}
        split["rest"] = total - sum(split.values())
        ordered = sorted(totals)
        out["phases"][phase] = dict(
            steps=n,
            step_total_s=total,
            step_total_source="EngineCore.step" if source == "step" else "LLMEngine.step",
            ms_per_step=1000 * total / n,
            median_ms_per_step=1000 * ordered[n // 2],
            p90_ms_per_step=1000 * ordered[min(n - 1, int(0.9 * n))],
            model_execute_ms_per_step=1000 * sum(d.get("model_execute", 0.0) for d in rows) / n,
            split_ms_per_step={c: 1000 * v / n for c, v in split.items()},
            split_share={c: v / total if total else 0.0 for c, v in split.items()},
        )
    # the step times in order (ms), to see warm-up or noise
    out["step_ms"] = [round(1000 * d.get("step", d["client_step"]), 3) for d in per_step]
    Path(job["result_path"]).write_text(json.dumps(out, indent=2))


_printed_notes: set[str] = set()


def run_profile(paths, wl, label, pruning, args, tmp: Path) -> dict:
    """A profiling pass of config `label` on a shorter version of workload `wl` (its
    `profile` overrides), in a child process; its notes are printed once per run."""
    n = wl["profile"].get("num_requests", wl["num_requests"])
    index = len(list(tmp.glob("job_*.json")))
    job = dict(
        engine=engine_kwargs(paths, wl, pruning, args),
        prompts=wl["prompts"][:n],
        output_lens=wl["output_lens"][:n],
        result_path=str(tmp / f"profile_{index}.json"),
    )
    job_path = tmp / f"job_{index}.json"
    job_path.write_text(json.dumps(job))
    print(f"  profiling {label} ({n} requests, in-process engine) ...", flush=True)
    t0 = time.perf_counter()
    status, out = run_child(["benchmarks.profiling", str(job_path)], job["result_path"])
    if out is None:
        print(f"    profiling FAILED (child exit status {status})", flush=True)
        return dict(num_requests=n, error=f"profiling child exited with status {status}")
    out.update(num_requests=n, wall_s=time.perf_counter() - t0)
    for note in out.get("notes", []):
        if note not in _printed_notes:
            _printed_notes.add(note)
            print(f"    profile: skipped {note}", flush=True)
    ph = out.get("phases", {}).get("all")
    if ph:
        print(f"    {ph['steps']} steps, {ph['ms_per_step']:.2f} ms/step (median "
              f"{ph['median_ms_per_step']:.2f})", flush=True)  # fmt: skip
    return out


def top_level_ops(fn) -> Counter:
    """The tensor ops (`aten::`, outermost only) one call of `fn` issues, by name."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return Counter(e.name for e in prof.events()
                   if e.name.startswith("aten::") and e.cpu_parent is None)  # fmt: skip


if __name__ == "__main__":  # the profiling pass's child process: python -m benchmarks.profiling JOB
    profile_child(sys.argv[1])
