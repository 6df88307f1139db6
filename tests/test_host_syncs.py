"""Device-to-host reads of the page table (`cache/page_table.py`) per step, counted on a CPU run.

On a GPU every such read stalls the host until the GPU has caught up. Here the page table runs on
the CPU, where its state and the plan's host-side sizes (`StepRows`' cpu tensors) share a device,
so a `__torch_function__` mode (`HostReads`) tells them apart by provenance: `StepRows`' size
tensors, and whatever is computed from host tensors alone (factories called without `device=`,
results of ops whose tensor inputs are all host), are host; everything else (the page state, the
keys, anything moved with `.to(device)`) is device. A read is a call that needs a device value on
the host: `item`, `tolist`, `cpu`, `numpy`, `bool`/`int`/`float`/`index` of a tensor, a factory
sized by a device tensor, boolean-mask indexing, `nonzero`, `unique`, `masked_select`,
`repeat_interleave` without `output_size` (these wait for the GPU on CUDA), and copying a device
tensor into a host one.

Required: at most 2 reads in a steady decoding step (a batch past its prompts, window > 0, some
rows with a token leaving the window, some not yet): its plan and its report; at most 2 in a step
that admits new prompts beside decoding rows; none inside a layer (`write_layer`, the layer's
block table, the kernel's row queries and its call).
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from tests.test_page_table import D, G, H, L, Sim
from vllm_kvzap.attention.rows import attend_layer, row_queries, scatter_rows
from vllm_kvzap.cache.step_plan import StepRows

Tensor = torch.Tensor
READS = {
    Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.__bool__, Tensor.__int__,
    Tensor.__float__, Tensor.__index__, Tensor.nonzero, torch.nonzero, Tensor.unique,
    torch.unique, Tensor.masked_select, torch.masked_select,
}  # fmt: skip
TO_HOST = {Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy}
SIZED = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn,
         torch.randint, torch.linspace}  # fmt: skip


class HostReads(TorchFunctionMode):
    """Counts device-to-host reads (see the module docstring); `log` names each one."""

    def __init__(self, host_roots=()):
        super().__init__()
        self._host: set[int] = set()
        self.log: list[str] = []
        for t in host_roots:
            self._mark(t)

    def _mark(self, t):
        if isinstance(t, Tensor) and id(t) not in self._host:
            self._host.add(id(t))
            weakref.finalize(t, self._host.discard, id(t))

    def is_host(self, t) -> bool:
        return id(t) in self._host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        device = [t for t in tensors if not self.is_host(t)]
        this = args[0] if args and isinstance(args[0], Tensor) else None
        name = getattr(func, "__name__", str(func))
        if func in READS and this is not None and not self.is_host(this):
            self.log.append(name)
        elif func in SIZED and device:
            self.log.append(f"{name} sized by a device tensor")
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0])
            if isinstance(repeats, Tensor) and not self.is_host(repeats):
                self.log.append("repeat_interleave by device counts without output_size")
        elif name in ("__getitem__", "__setitem__"):
            index = args[1] if len(args) > 1 else None
            masks = [t for t in tree_leaves(index)
                     if isinstance(t, Tensor) and t.dtype == torch.bool]  # fmt: skip
            if any(not self.is_host(m) or not self.is_host(this) for m in masks):
                self.log.append(f"{name} with a boolean mask")
            elif name == "__setitem__" and self.is_host(this) and device:
                self.log.append("device values written into a host tensor")
        elif name == "copy_" and this is not None and self.is_host(this) and device:
            self.log.append("copy_ from device to host")
        out = func(*args, **kwargs)
        moves = name == "to" and (
            "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
        )
        if func in TO_HOST:
            out = out.clone() if out is this else out
            for t in tree_leaves(out):
                self._mark(t)
        elif moves:  # host -> device (on this CPU run, `.to` may return its input itself)
            out = out.clone() if out is this else out
        elif (not tensors and "device" not in kwargs) or (tensors and not device):
            for t in tree_leaves(out):
                self._mark(t)
        return out


def rows_of(batch) -> StepRows:
    """batch: (request, num_computed, query_len, is_prefilling)."""
    qlens = torch.tensor([b[2] for b in batch])
    qsl = torch.zeros(len(batch) + 1, dtype=torch.int64)
    qsl[1:] = qlens.cumsum(0)
    return StepRows(
        req_keys=torch.tensor([1 + 3 * b[0] for b in batch]),
        num_computed=torch.tensor([b[1] for b in batch]),
        query_lens=qlens,
        is_prefilling=torch.tensor([b[3] for b in batch]),
        query_start_loc=qsl,
    )


def host_roots(rows: StepRows):
    return (rows.num_computed, rows.query_lens, rows.is_prefilling, rows.query_start_loc)


def step(sim: Sim, batch, count: bool):
    """One step; with `count`, (reads of plan + report, reads inside the layers)."""
    rows = rows_of(batch)
    table = sim.table
    T = int(rows.query_lens.sum())
    g = torch.Generator().manual_seed(T)
    inputs = [(torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g),
               torch.randn(T, H, generator=g)) for _ in range(L)]  # fmt: skip
    query, out = torch.randn(T, H * G, D, generator=g), torch.zeros(T, H * G, D)
    step_reads, layer_reads = HostReads(host_roots(rows)), HostReads()
    with step_reads if count else contextlib.nullcontext():
        plan = table.plan(rows)
    for layer, (key, value, scores) in enumerate(inputs):
        with layer_reads if count else contextlib.nullcontext():
            table.write_layer(plan, layer, key, value, scores, sim.isa)
            plan.block_tables[layer]
            rows_q, out_rows = row_queries(plan, query, out, H)
            scatter_rows(plan, out, out_rows, H)
            attend_layer(table, plan, layer, query, out, D**-0.5, sim.isa)
    with step_reads if count else contextlib.nullcontext():
        table.reports()
    return step_reads.log, layer_reads.log


def test_the_counter_sees_device_reads_and_not_host_ones():
    sim = Sim([10], 1, window=4)
    rows = rows_of([(0, 0, 10, True)])
    counter = HostReads(host_roots(rows))
    with counter:
        int(rows.query_lens.max())  # host: not a read
        n = rows.num_computed + 1
        bool((n > 0).any())  # host
        on_device = n.to(sim.table.device)
        int(sim.table.rows.num_pages.sum())  # 1
        on_device.tolist()  # 2
        sim.table.rows.num_pages[sim.table.rows.num_pages > 0]  # 3: boolean mask
        torch.arange(on_device[0])  # 4: sized by a device value
        sim.table.pool.slot_scores[0, 0].item()  # 5
        torch.repeat_interleave(on_device, on_device)  # 6
        torch.repeat_interleave(on_device, on_device, output_size=1)  # static: not a read
    assert len(counter.log) == 6, counter.log


@pytest.mark.parametrize("window", [8, 24])
def test_steady_decoding_reads_at_most_twice_and_never_inside_a_layer(window):
    prompts = [5, 12, 40, 70]  # with window 24: two rows still inside it, two past it
    sim = Sim(prompts, 30, window=window, seed=1, layout=(16, "vec16"))
    step(sim, [(r, 0, n, True) for r, n in enumerate(prompts)], count=False)
    for c in range(3):  # compaction, then steady decoding
        batch = [(r, n + c, 1, False) for r, n in enumerate(prompts)]
        step_log, layer_log = step(sim, batch, count=c > 0)
        if c:
            assert len(step_log) <= 2, step_log
            assert step_log, "the report is a read: the counter missed it"
            assert not layer_log, layer_log
    leaving = [n + 2 >= window for n in prompts]
    assert any(leaving) and (window == 8 or not all(leaving))


def test_admitting_prompts_beside_decoding_rows_reads_at_most_twice():
    sim = Sim([40, 30, 20], 30, window=8, seed=2, layout=(16, "vec16"))
    step(sim, [(0, 0, 40, True)], count=False)
    step(sim, [(0, 40, 1, False)], count=False)  # compaction
    step_log, layer_log = step(sim, [(0, 41, 1, False), (1, 0, 30, True)], count=True)
    assert len(step_log) <= 2 and not layer_log, (step_log, layer_log)
    step_log, layer_log = step(
        sim, [(0, 42, 1, False), (1, 30, 1, False), (2, 0, 20, True)], count=True
    )  # request 1 compacts beside a new prompt: compaction steps may read more
    assert not layer_log, layer_log
