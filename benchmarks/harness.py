"""The shared benchmark harness: timing, machine ceilings, peak memory, environment record,
and the runner that measures every provider of every case and keeps every number.

An op module (``bench_<op>.py``) describes *what* to measure as an :class:`OpBench`: its cases
(one shape, dtype and mode each, with the work one call does) and its providers (eager, torch
native, torch.compile, llama_ext), each of which turns a case's inputs into a closure to time.
This module decides *how* to measure, identically for every op:

- CPU: Python's ``timeit`` with all of torch's threads, samples of at least ~1 ms each after a
  warm-up call, median and p20/p80 over the samples. The providers of a case are sampled
  interleaved, in ``CPU_ROUNDS`` rounds that each take a share of every provider's samples, so
  that a shared VM's slow and fast spells (which halve or double a kernel's speed for seconds at
  a time) fall on every provider alike.
- A time budget per (case, provider): a provider whose call, after its warm-up, takes more than
  1/SAMPLED_CALLS of it (eager bf16 attention where the CPU emulates bf16 matmuls) gets that one
  timed call instead of a sampling run, which costs at least SAMPLED_CALLS calls. It is marked
  ``single_call`` in the JSON and with ``*`` in the tables, so that a run finishes on any CPU.
  The warm-up call itself does not decide: under ``torch.compile`` with a cold cache it compiles
  for seconds.
- CUDA: CUDA events around each call (``CudaClock``); before each, L2 is evicted by reading a
  buffer twice its size (clean lines: ``triton.testing.do_bench`` zeroes one, whose dirty lines
  the timed call then writes back) and the GPU is held while the host queues the call.
- Throughput from the minimum work a call must do (bytes every implementation has to move,
  or FLOPs), so every provider of a case is scored on the same amount of work.
- Ceilings measured in the same run, before and after the ops, the best of several rounds:
  copy bandwidth (``dst.copy_(src)``, bytes read plus written; CPU at the 16 MB headline size,
  CUDA far beyond L2) and a large matmul per dtype. CPU cases whose data streams from DRAM (a
  decode step's cache in a model of many layers) are judged against a copy that does too
  (``dram_copy``: buffers far beyond any L3), measured only in runs that have such cases. A
  reduced-precision dtype's matmul ceiling is the best of its own rate and fp32's (a kernel may
  widen to fp32 where the CPU emulates bf16/fp16 matmuls; there its own rate comes from one call
  at a quarter of the size, since the full size would take a minute). A case faster than its
  ceiling is flagged, not shown as a fraction.
- CPU bandwidth cases also sample the copy in the same interleaved rounds as their providers:
  the ceiling is the best copy sample of the run, so on a VM whose memory bandwidth drifts with
  its neighbours' load it may come from a faster spell than the case's; the fraction of the
  same-round copy (medians of the same rounds) compares like with like. Both are reported.
- Peak memory of one call above what was live before it: CUDA ``max_memory_allocated``; CPU
  the larger of the largest total of live allocations in a profiler memory trace (the calling
  thread's) and the resident set's high-water growth (every thread's), one call each.
"""
import ctypes
import datetime
import math
import os
import platform
import subprocess
import sys
import time
import timeit
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .report import PROFILED_CALLS

# Kineto logs every profiler start and stop to stderr; the CPU peak-memory trace starts one per
# measurement. Read at the first profiler use, so setting it here is early enough.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

MB = 1 << 20
# On the 2-core CPU machine a fresh tensor of 32 MB or more is mmap'ed by glibc on every call
# and pays ~13 ms of page faults, whatever the kernel; 16 MB pays nothing. CPU cases whose
# largest output exceeds this are reported separately and not used to judge kernels.
CPU_HEADLINE_MAX_OUTPUT_BYTES = 16 * MB

# Each of a CPU DRAM copy's two buffers: 8x the 32 MB L3 of the benchmark's machines, so that neither
# stays in cache between calls.
CPU_DRAM_COPY_BYTES = 256 * MB

UNIT_SCALE = {"GB/s": 1e9, "TFLOP/s": 1e12, "tokens/s": 1.0}
# Rounds of each ceiling measurement; a round is a whole sampling run, the best round counts.
CEILING_ROUNDS = 3
# Which measured ceiling a throughput unit is compared with.
UNIT_CEILING = {"GB/s": "copy", "TFLOP/s": "matmul"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def short_error(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception, for tables and JSON."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class RunConfig:
    device: str
    dtypes: List[torch.dtype]
    full: bool = False
    smoke: bool = False  # tiny sizes and short timing, for the test suite
    sizes: Optional[List[int]] = None  # explicit sizes instead of the sweep (--size)
    min_run_time: float = 0.3  # seconds of samples per (case, provider) on CPU
    cuda_rep_ms: int = 100  # the measuring time per (case, provider) on CUDA
    budget_s: float = 3.0  # a provider whose call takes over budget_s / SAMPLED_CALLS gets one timed call
    kernel_times: bool = False  # CUDA: each llama_ext result's kernels (kernel_times)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass
class Case:
    """One measured point: an op in one mode, dtype and size.

    ``work`` is what one call must do, in the unit's numerator (bytes for GB/s, FLOPs for
    TFLOP/s, tokens for tokens/s); ``size`` is the sweep variable plotted on the x axis.
    """

    mode: str
    dtype: torch.dtype
    size: int
    label: str
    unit: str
    work: float
    out_bytes: int
    params: Dict[str, Any] = field(default_factory=dict)
    # The measured ceiling it is judged against ("copy", "dram_copy" or "matmul"); None: its unit's
    # (UNIT_CEILING).
    ceiling_kind: Optional[str] = None

    @property
    def ceiling(self) -> Optional[str]:
        return self.ceiling_kind or UNIT_CEILING.get(self.unit)


@dataclass
class Provider:
    """``build(case, inputs)`` returns the closure to time; its return value is compared with
    eager's to record the largest difference. ``skip_reason`` marks a provider that cannot run
    at all here (missing library, kernel not built for this device)."""

    name: str
    build: Optional[Callable[[Case, Any], Callable[[], Any]]]
    source: str = ""
    skip_reason: Optional[str] = None


@dataclass
class OpBench:
    """An op's benchmark. The provider named "eager" comes first: the others' speedups and
    output differences are taken against it."""

    name: str
    title: str
    size_name: str  # what Case.size counts, for the plot's x axis
    cases: List[Case]
    providers: List[Provider]
    make_inputs: Optional[Callable[[Case], Any]]
    skip_reason: Optional[str] = None
    notes: List[str] = field(default_factory=list)


# ---- timing ---------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _quantiles(samples: List[float]) -> Dict[str, float]:
    ordered = sorted(samples)

    def pick(q):  # linear interpolation between order statistics
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"median_ms": pick(0.5) * 1e3, "p20_ms": pick(0.2) * 1e3, "p80_ms": pick(0.8) * 1e3,
            "min_ms": ordered[0] * 1e3}


# Rounds of interleaved CPU sampling (time_cpu_interleaved).
CPU_ROUNDS = 5


def time_cpu_interleaved(fns: Dict[str, Callable[[], Any]], min_run_time: float,
                         budget_s: float = math.inf) -> Dict[str, Dict[str, Any]]:
    """Times each of fns (warmed up by the caller) as time_cpu does, but in CPU_ROUNDS rounds
    that each take a share of every fn's samples in turn. The first sample and each round's share
    come after one untimed call: the other fns ran in between, and may have evicted its data or
    reset state it shares with them (e.g. dynamo's caches, which a compiled provider then
    refills in its next call).

    The clock is Python's ``timeit.Timer`` (perf_counter, garbage collection paused), the loop
    ``torch.utils.benchmark.Timer`` wraps: its ``timeit`` makes two untimed calls before every
    sample, three calls where one is timed."""
    plans = {}
    for name, fn in fns.items():
        timer = timeit.Timer(fn)
        fn()
        first = timer.timeit(1)  # a sample too
        number = max(1, int(1e-3 / max(first, 1e-9)))  # samples of >= ~1 ms: timer overhead vanishes
        # At least 3 samples, more up to min_run_time, fewer (down to 2) to stay within the budget.
        n_samples = int(min(100, max(3, min_run_time / (first * number)), max(2, budget_s / (first * number))))
        plans[name] = (timer, fn, number, n_samples, [first] if number == 1 else [])
    for r in range(CPU_ROUNDS):
        for timer, fn, number, n_samples, samples in plans.values():
            share = math.ceil((n_samples - len(samples)) / (CPU_ROUNDS - r))
            if share:
                fn()
                samples += [timer.timeit(number) / number for _ in range(share)]
    return {name: dict(_quantiles(samples), samples=n_samples, calls_per_sample=number,
                       method=f"timeit, providers interleaved in {CPU_ROUNDS} rounds, an untimed call before each")
            for name, (_, _, number, n_samples, samples) in plans.items()}


def time_cpu(fn: Callable[[], Any], min_run_time: float, budget_s: float = math.inf) -> Dict[str, Any]:
    return time_cpu_interleaved({"fn": fn}, min_run_time, budget_s)["fn"]


class CudaClock:
    """Times calls on one CUDA device with events around each call. Before each call it evicts L2
    by reading a buffer twice L2's size, then holds the GPU (torch.cuda._sleep) for longer than the
    host takes to queue the call, so that the timed span holds the call's kernels back to back and
    no host time.

    Reading leaves L2 full of clean lines. Zeroing a buffer, as triton.testing.do_bench flushes,
    leaves it full of dirty ones, which the timed call then writes back to DRAM: up to L2's size
    (50-60 MB on Hopper) of extra traffic, a large share of a call that moves tens of MB (a decode
    step at batch 1) and a bias against every working set small next to the copy ceiling's."""

    def __init__(self, device: str):
        self.device = device
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * MB) or 64 * MB
        self.buffer = torch.ones(2 * l2 // 4, dtype=torch.float32, device=device)
        self.sink = torch.empty((), dtype=torch.float32, device=device)
        cycles = 1 << 20
        self.cycles_per_ms = cycles / self.span_ms(lambda: torch.cuda._sleep(cycles))
        self.evict_ms = min(self.span_ms(self.evict) for _ in range(3))

    def span_ms(self, fn: Callable[[], Any]) -> float:
        start, end = self.event(), self.event()
        start.record()
        fn()
        end.record()
        self.synchronize()
        return max(start.elapsed_time(end), 1e-3)

    def evict(self):
        torch.sum(self.buffer, dim=0, out=self.sink)

    def hold(self, ms: float):
        torch.cuda._sleep(max(1, int(ms * self.cycles_per_ms)))

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def synchronize(self):
        torch.cuda.synchronize(self.device)


_CUDA_CLOCKS: Dict[str, CudaClock] = {}


def cuda_clock(device: str) -> CudaClock:
    if device not in _CUDA_CLOCKS:
        _CUDA_CLOCKS[device] = CudaClock(device)
    return _CUDA_CLOCKS[device]


CUDA_WARMUP_MS = 25  # the calls before a CUDA timing: at least this long, and at least one


def hold_for(fn: Callable[[], Any], clock: "CudaClock") -> float:
    """How long to hold the GPU before a call of fn so that the host queues all of it meanwhile:
    1.5x the host time of one call, measured from an idle GPU, plus 20 us."""
    clock.synchronize()
    begin = time.perf_counter()
    fn()
    host_ms = (time.perf_counter() - begin) * 1e3  # queueing the call: its kernels run later
    clock.synchronize()
    return 1.5 * host_ms + 0.02


def time_cuda(fn: Callable[[], Any], device: str, rep_ms: int, clock: Optional[CudaClock] = None) -> Dict[str, Any]:
    """Median, p20/p80 and minimum of one call over about rep_ms of calls (at least 10 samples,
    however slow the call), each from a cold L2 (CudaClock)."""
    clock = clock or cuda_clock(device)
    call_ms = clock.span_ms(fn)
    for _ in range(min(100, max(1, math.ceil(CUDA_WARMUP_MS / call_ms)))):
        fn()
    hold_ms = hold_for(fn, clock)
    n = int(min(1000, max(10, rep_ms / (call_ms + clock.evict_ms + hold_ms))))
    pairs = [(clock.event(), clock.event()) for _ in range(n)]
    for start, end in pairs:
        clock.evict()
        clock.hold(hold_ms)
        start.record()
        fn()
        end.record()
    clock.synchronize()
    samples = [start.elapsed_time(end) * 1e-3 for start, end in pairs]
    return dict(_quantiles(samples), samples=n,
                method="CUDA events, L2 evicted by a read of twice its size before each call, the GPU held "
                       "while the host queues the call")


def kernel_name(name: str) -> str:
    """A profiled kernel's function name without namespaces, template arguments and parameters."""
    name = name.replace("(anonymous namespace)", "").split("(")[0].split("<")[0]
    return name.split("::")[-1].replace("void ", "").strip()


def calls_between_markers(spans: List[Any], markers: set) -> List[List[Any]]:
    """Splits kernels (name, start_us, end_us), in any order, into the calls they belong to: the
    runs between marker kernels (those of the preamble before each call) in start order. What
    precedes the first marker, and a run without kernels, is no call."""
    calls: List[List[Any]] = []
    current = None
    for span in sorted(spans, key=lambda s: s[1]):
        if span[0] in markers:
            if current:
                calls.append(current)
            current = []
        elif current is not None:
            current.append(span)
    if current:
        calls.append(current)
    return calls


def call_kernels(calls: List[List[Any]]) -> Dict[str, Any]:
    """Per kernel name, launches and mean device time per call, slowest first; and the median over
    the calls of their kernels' span, first start to last end (the sum of the kernels' times
    plus the gaps between them, less any overlap)."""
    if not calls:
        raise RuntimeError("the profile holds no kernels between the preamble's: the call launched none")
    totals: Dict[str, List[float]] = {}
    for call in calls:
        for name, start, end in call:
            entry = totals.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += end - start
    n = len(calls)
    rows = [{"kernel": name, "launches": launches / n, "us": us / n} for name, (launches, us) in totals.items()]
    spans = sorted(max(end for _, _, end in call) - min(start for _, start, _ in call) for call in calls)
    return {"kernels": sorted(rows, key=lambda row: -row["us"]), "span_us": spans[len(spans) // 2], "calls": n}


def kernel_times(fn: Callable[[], Any], device: str = "cuda", calls: int = PROFILED_CALLS, activity: str = "CUDA",
                 preamble: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    """The kernels of one call of fn (call_kernels), from torch.profiler over `calls` calls, each
    after the preamble: on CUDA by default the timer's own (an L2 eviction, then the GPU held
    while the host queues the call), so that the kernels' times are those of the timed calls and
    the span holds no host time. The preamble's kernels, named from a profile of it alone, mark
    where each call begins, so fn must not launch a kernel of theirs. activity: the profiler
    activity and event device type (CPU: the top-level aten ops, for tests on a machine without a
    GPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device_type = getattr(DeviceType, activity)
    sync = torch.cuda.synchronize if activity == "CUDA" else (lambda: None)
    if preamble is None:
        clock = cuda_clock(device)
        hold_ms = 2 * hold_for(fn, clock)  # the profiler slows the host's launches

        def preamble():
            clock.evict()
            clock.hold(hold_ms)

    def profiled(body):
        with profile(activities=[getattr(ProfilerActivity, activity)]) as prof:
            body()
            sync()
        top_level = activity != "CPU"  # kernels nest in nothing; aten ops nest in their callers
        return [(kernel_name(e.name), e.time_range.start, e.time_range.end) for e in prof.events()
                if e.device_type == device_type and (top_level or e.cpu_parent is None)]

    markers = {name for name, _, _ in profiled(preamble)}

    def body():
        for _ in range(calls):
            preamble()
            fn()
    return call_kernels(calls_between_markers(profiled(body), markers))


def time_fn(fn: Callable[[], Any], cfg: RunConfig) -> Dict[str, Any]:
    if cfg.is_cuda:
        return time_cuda(fn, cfg.device, cfg.cuda_rep_ms)
    return time_cpu(fn, cfg.min_run_time, cfg.budget_s)


# The fewest calls a sampled provider makes after its warm-up: two samples, each after an untimed
# call, and the peak-memory call.
SAMPLED_CALLS = 5


def time_one_call(fn: Callable[[], Any], device: str) -> Dict[str, Any]:
    """One timed call, for a provider over its budget: every statistic is that call."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    ms = (time.perf_counter() - start) * 1e3
    return dict(median_ms=ms, p20_ms=ms, p80_ms=ms, min_ms=ms, samples=1, calls_per_sample=1,
                method="one timed call", single_call=True)


# ---- peak memory ----------------------------------------------------------------------------


def _cpu_peak_from_profiler(fn: Callable[[], Any]) -> int:
    """Largest sum of live allocations made during one call, from the profiler's memory trace
    (allocations are positive events, frees negative). It sees the calling thread's allocations
    only: ATen's OpenMP worker threads run without the profiler's thread-local state."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} missing from /proc/self/status")


def _malloc_trim() -> None:
    """Returns the C heap's free pages to the OS (glibc), so that memory a call reuses from
    earlier calls is faulted in again and counts in its resident growth; a no-op elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cpu_peak_from_rss(fn: Callable[[], Any]) -> int:
    """Growth of the resident set's high-water mark over one call (Linux: writing 5 to
    clear_refs resets VmHWM), every thread's allocations included. Underestimates when the call
    reuses freed memory that the heap kept resident; the heap is trimmed first."""
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kb("VmRSS")
    fn()
    return max(0, _rss_kb("VmHWM") - before) * 1024


def peak_memory(fn: Callable[[], Any], device: str) -> Dict[str, Any]:
    """The memory one call of fn adds at its peak. CPU: the larger of two lower bounds, the
    profiler's trace (exact, but blind to worker threads) and the resident growth (every
    thread, at page grain), from one call each (1x2048 32/8 x 128 attention on 1 thread, where
    both see everything: equal within 0-3%, but for SDPA's bf16 backward, 10-20% more resident)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"peak_mem_bytes": torch.cuda.max_memory_allocated() - before,
                "peak_mem_method": "torch.cuda.max_memory_allocated"}
    found = {}
    try:
        found["profiler memory trace"] = _cpu_peak_from_profiler(fn)
    except Exception:  # profiler internals differ across torch versions
        pass
    try:
        found["resident growth"] = _cpu_peak_from_rss(fn)
    except OSError:  # no /proc (not Linux)
        pass
    if not found:
        return {"peak_mem_bytes": None, "peak_mem_method": "neither the profiler nor /proc/self/status"}
    method = max(found, key=found.get)
    return {"peak_mem_bytes": found[method], "peak_mem_method": method}


# ---- ceilings -------------------------------------------------------------------------------


def copy_call(cfg: RunConfig, kind: str = "copy"):
    """(dst.copy_(src) with its first call made, bytes of each tensor): the copy ceiling's call,
    also sampled beside CPU bandwidth cases. CPU: the headline output size (preallocated, so no
    page faults), so that the copy and the judged cases see the same cache behaviour, or for
    ``dram_copy`` CPU_DRAM_COPY_BYTES. CUDA: far beyond L2, both kinds."""
    if cfg.smoke:
        nbytes = 4 * MB
    elif cfg.is_cuda:
        nbytes = 1024 * MB
    else:
        nbytes = CPU_DRAM_COPY_BYTES if kind == "dram_copy" else CPU_HEADLINE_MAX_OUTPUT_BYTES
    src = torch.randn(nbytes // 4, device=cfg.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return (lambda: dst.copy_(src)), nbytes


class Ceilings:
    """Copy bandwidth and per-dtype matmul rate of this machine. ``measure()`` runs at the start
    and at the end of a run; each time every ceiling takes the best of CEILING_ROUNDS sampling
    rounds, and keeps the best over both times: other processes can only make a measured
    ceiling lower than the machine's, never higher. The DRAM copy is measured first by
    ``prepare()``, for an op that has cases judged against it, and again by every later
    ``measure()``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.copy: Optional[Dict[str, Any]] = None
        self.dram_copy: Optional[Dict[str, Any]] = None
        self.matmul: Dict[str, Dict[str, Any]] = {}  # per dtype, its own math

    def _best(self, previous: Optional[Dict[str, Any]], fn: Callable[[], Any], work: float, unit_scale: float,
              **what) -> Dict[str, Any]:
        best = previous
        for _ in range(CEILING_ROUNDS):
            t = time_fn(fn, self.cfg)
            rate = work / (t["min_ms"] * 1e-3) / unit_scale
            if best is None or rate > best["rate"]:
                best = dict(t, rate=rate, **what)
        return best

    def _measure_copy(self, kind: str = "copy") -> None:
        fn, nbytes = copy_call(self.cfg, kind)
        setattr(self, kind, self._best(getattr(self, kind), fn, 2 * nbytes, 1e9, bytes=2 * nbytes, unit="GB/s",
                                       what=f"dst.copy_(src), {nbytes // MB} MB each, bytes read + written, best sample"))

    def _measure_matmul(self, dtype: torch.dtype) -> None:
        cfg = self.cfg
        key = dtype_name(dtype)
        n = 256 if cfg.smoke else (8192 if cfg.is_cuda else 2048)
        if dtype in (torch.float16, torch.bfloat16) and not cfg.is_cuda and self._emulated(dtype, n // 4):
            return
        a = torch.randn(n, n, device=cfg.device).to(dtype)
        b = torch.randn(n, n, device=cfg.device).to(dtype)
        self.matmul[key] = self._best(self.matmul.get(key), lambda: torch.mm(a, b), 2 * n**3, 1e12, n=n,
                                      unit="TFLOP/s", what=f"torch.mm {n}x{n}x{n} in {key}, best sample")

    def _emulated(self, dtype: torch.dtype, n: int) -> bool:
        """Whether this CPU runs dtype's matmul at under half the float32 rate (emulated: e.g. bf16
        at ~1 GFLOP/s on AVX2, where the full-size measurement alone would take a minute), judged
        from one call at size n; if so, that call is the dtype's own rate. Its ceiling is then
        float32's (``matmul_tflops``), so nothing is lost by not measuring it at full size."""
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm-up
        t = time_one_call(lambda: torch.mm(a, b), self.cfg.device)
        rate = 2 * n**3 / (t["min_ms"] * 1e-3) / 1e12
        if rate >= 0.5 * self.matmul["float32"]["rate"]:
            return False
        key = dtype_name(dtype)
        if key not in self.matmul or rate > self.matmul[key]["rate"]:
            self.matmul[key] = dict(t, rate=rate, n=n, unit="TFLOP/s", what=(
                f"torch.mm {n}x{n}x{n} in {key}, one call: under half the float32 rate (emulated), "
                "not measured at full size"))
        return True

    def measure(self, dtypes) -> None:
        """(Re)measures the copy ceiling and the matmul ceilings of fp32 (first: a reduced dtype's
        ceiling includes it) and of dtypes, keeping each one's best so far."""
        self._measure_copy()
        if self.dram_copy is not None:
            self._measure_copy("dram_copy")
        for dtype in dict.fromkeys([torch.float32, *dtypes]):
            self._measure_matmul(dtype)

    def prepare(self, cases) -> None:
        """Measures the DRAM copy if one of the cases is judged against it and it was not yet."""
        if self.dram_copy is None and any(case.ceiling == "dram_copy" for case in cases):
            self._measure_copy("dram_copy")

    def matmul_tflops(self, dtype: torch.dtype) -> Optional[float]:
        """The best matmul rate for dtype's math: its own, or for bf16/fp16 fp32's if higher."""
        rates = [self.matmul[k]["rate"] for k in (dtype_name(dtype), "float32")
                 if k in self.matmul and (k == dtype_name(dtype) or dtype in (torch.bfloat16, torch.float16))]
        return max(rates) if rates else None

    def rate(self, kind: Optional[str], dtype: torch.dtype) -> Optional[float]:
        """The ceiling of that kind for dtype's case, None where not measured (or no kind)."""
        if kind in ("copy", "dram_copy"):
            measured = getattr(self, kind)
            return measured["rate"] if measured else None
        if kind == "matmul":
            return self.matmul_tflops(dtype)
        return None

    def as_dict(self) -> Dict[str, Any]:
        return {"copy": self.copy, "dram_copy": self.dram_copy, "matmul": self.matmul}


def apply_ceilings(op: Dict[str, Any], ceilings: Ceilings) -> None:
    """Sets each case's ceiling and every result's fraction of it from the ceilings as they stand
    (called again after the final measurement). A result above its ceiling gets no fraction and
    ``above_ceiling``: either the ceiling was measured under load or the work count is wrong."""
    for case in op.get("cases", []):
        ceiling = ceilings.rate(case["ceiling_kind"], getattr(torch, case["dtype"]))
        case["ceiling"] = ceiling
        for r in case["results"].values():
            if r["status"] != "ok":
                continue
            above = bool(ceiling) and r["throughput"] > ceiling
            r["above_ceiling"] = above
            r["fraction_of_ceiling"] = r["throughput"] / ceiling if ceiling and not above else None


# ---- environment ----------------------------------------------------------------------------


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first CPU's model name, with its x86 family and model numbers where cpuinfo has them:
    a hypervisor may show only a brand ("AMD EPYC"), and Zen 4 (family 25) and Zen 5 (family 26)
    differ in their vector units, so the numbers are what tells the benchmark tables apart."""
    fields: Dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block only
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


THP_MODE_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"  # e.g. "always [madvise] never"


def cpu_pages() -> Dict[str, Any]:
    """The pages torch's CPU tensors get: the kernel's transparent-huge-page mode and torch's own
    THP_MEM_ALLOC_ENABLE, with which a tensor of 2 MB or more asks for 2 MB pages where the mode
    is `madvise`. Decode reads its cache from DRAM faster on them (benchmarks/RESULTS.md), so the
    tables record which pages the caches had."""
    try:
        with open(THP_MODE_PATH) as f:
            text = f.read()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        mode = None
    requested = os.environ.get("THP_MEM_ALLOC_ENABLE")
    huge = mode == "always" or (mode == "madvise" and requested == "1")
    return dict(thp_mode=mode, thp_mem_alloc_enable=requested, huge_pages=huge)


def _version(module_name: str) -> Optional[str]:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    return getattr(module, "__version__", "unknown")


# `--cpu-isa LEVEL` makes this machine stand in for a CPU with no more than a llama_ext CPU level:
# llama_ext's kernels run at that level, and so do the libraries the other providers run on:
# torch's own kernels and inductor's generated code (ATEN_CPU_CAPABILITY), MKL's fp32 matmuls
# (MKL_ENABLE_INSTRUCTIONS) and oneDNN's bf16 matmuls (ONEDNN_MAX_CPU_ISA). Each library reads
# its variable once, when first used, so the run starts a fresh process with them set
# (cli.main). Caches, clocks and memory stay this machine's. amx_bf16 is every level: no limit.
CPU_ISA_LIMITS: Dict[str, Dict[str, str]] = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx512_bf16": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512_E4",
                    "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "amx_bf16": {},
}
# Set in the process that runs under a limit: the level it was asked for.
CPU_ISA_ENV = "LLAMA_EXT_BENCH_CPU_ISA"


def cpu_isa_environment(level: str) -> Dict[str, str]:
    """The variables a process limited to `level` starts with (llama_ext's own included).

    A limited process also compiles into its own inductor cache: inductor does not key its
    cached code on ATEN_CPU_CAPABILITY, and a run reusing code compiled under another level
    gave NaN, or corrupted the heap and aborted (torch 2.14)."""
    import llama_ext
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env = dict(CPU_ISA_LIMITS[level], **{llama_ext._cpu_kernels.ENV_VAR: level, CPU_ISA_ENV: level})
    if CPU_ISA_LIMITS[level]:
        base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"cpu-isa-{level}")
    return env


def environment(device: str) -> Dict[str, Any]:
    import llama_ext

    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu_model(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # torch's own kernels
        "llama_ext_cpu_capability": llama_ext.cpu_capability(),  # the ISA level of llama_ext's CPU kernels
        # decode against a contiguous cache on the key-major tiles (llama_ext/_cpu_kernels.py)
        "llama_ext_cpu_key_major_decode": llama_ext._cpu_kernels.KEY_MAJOR_DECODE,
        "cpu_levels": [name for name, missing in llama_ext._cpu_kernels.levels().items() if missing is None],
        # --cpu-isa: the level every library was limited to, and how (None: no limit).
        "cpu_isa_limit": os.environ.get(CPU_ISA_ENV),
        "cpu_isa_limit_env": {k: os.environ[k] for k in CPU_ISA_LIMITS["default"] if k in os.environ} or None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "llama_ext": getattr(llama_ext, "__version__", None),
        "llama_ext_cuda_kernels": llama_ext.cuda_kernels_built(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env.update(cuda_capability=f"{props.major}.{props.minor}", gpu_memory_gb=round(props.total_memory / 1e9, 1),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        env["cpu_pages"] = cpu_pages()
    return env


def load_warning(env: Dict[str, Any]) -> Optional[str]:
    load = env.get("load_average_at_start")
    cpus = env.get("logical_cpus") or 1
    if env["device"] == "cpu" and load and load[0] > 0.5 * cpus:
        return (f"1-minute load average {load[0]:.1f} on {cpus} CPUs at start: other processes compete "
                f"for the cores, so CPU timings are pessimistic and noisy")
    return None


# ---- runner ---------------------------------------------------------------------------------


def _tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def max_abs_diff(actual, expected) -> Optional[float]:
    a, e = _tensors(actual), _tensors(expected)
    if not a or len(a) != len(e) or any(x.shape != y.shape for x, y in zip(a, e)):
        return None
    return max(((x.float() - y.float()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, e))


def is_headline(case: Case, cfg: RunConfig) -> bool:
    """The page-fault cost of a fresh large CPU output skews memory-bound ops only: a few ms
    are noise against attention's hundreds."""
    return cfg.is_cuda or case.unit != "GB/s" or case.out_bytes <= CPU_HEADLINE_MAX_OUTPUT_BYTES


def _warm_up(provider: Provider, case: Case, inputs, cfg: RunConfig):
    """Builds the provider's call and makes its first call (which compiles, autotunes and
    allocates): (fn, out, one timed call when a call takes over 1/SAMPLED_CALLS of the budget,
    else None), or raises. A slow warm-up call is followed by a second call, which decides: the
    warm-up may have spent its time compiling."""
    fn = provider.build(case, inputs)
    synchronize(cfg.device)
    start = time.perf_counter()
    out = fn()
    synchronize(cfg.device)
    call_limit_s = cfg.budget_s / SAMPLED_CALLS
    if time.perf_counter() - start <= call_limit_s:
        return fn, out, None
    timing = time_one_call(fn, cfg.device)
    if timing["median_ms"] * 1e-3 <= call_limit_s:
        return fn, out, None
    return fn, out, dict(timing, method=f"one call (a call takes over 1/{SAMPLED_CALLS} of the time budget)")


def _result(fn, out, case: Case, timing, memory, eager_out) -> Dict[str, Any]:
    seconds = timing["median_ms"] * 1e-3
    return {"status": "ok", **getattr(fn, "details", {}), **timing,
            "throughput": case.work / seconds / UNIT_SCALE[case.unit], **memory,
            "max_abs_diff_vs_eager": max_abs_diff(out, eager_out) if eager_out is not None else None}


# The interleaved key of the same-round copy (no provider's name starts with a NUL).
SAME_ROUND_COPY = "\0copy"


def _measure_case(providers, case: Case, inputs, cfg: RunConfig) -> Dict[str, Any]:
    """Every provider's result for one case. A provider over its budget gets one timed call;
    on CPU the others are sampled interleaved (time_cpu_interleaved), with the copy among them
    in bandwidth cases, on CUDA one after another."""
    results, warm, eager_out = {}, {}, None
    for provider in providers:
        if provider.skip_reason:
            results[provider.name] = {"status": "skipped", "reason": provider.skip_reason}
            continue
        try:
            fn, out, one_call = _warm_up(provider, case, inputs, cfg)
            if one_call:
                memory = {"peak_mem_bytes": None, "peak_mem_method": "not measured (over the time budget)"}
                results[provider.name] = _result(fn, out, case, one_call, memory, eager_out)
            else:
                warm[provider.name] = (fn, out)
                results[provider.name] = None  # keeps the providers' order
        except Exception as exc:  # a provider that cannot run this case is a result, not a crash
            results[provider.name] = {"status": "n/a", "reason": short_error(exc)}
            out = None
        finally:
            if cfg.is_cuda:
                torch.cuda.empty_cache()
        if provider.name == "eager":
            eager_out = out
    copy_bytes = None  # the same-round copy's bytes, where it runs
    if cfg.is_cuda:
        timings = {name: time_cuda(fn, cfg.device, cfg.cuda_rep_ms) for name, (fn, _) in warm.items()}
    else:
        fns = {name: fn for name, (fn, _) in warm.items()}
        if case.unit == "GB/s" and fns:
            fns[SAME_ROUND_COPY], nbytes = copy_call(cfg, case.ceiling)
            copy_bytes = 2 * nbytes  # read + written, as the ceiling counts them
        timings = time_cpu_interleaved(fns, cfg.min_run_time, cfg.budget_s)
        if copy_bytes:
            copy_rate = copy_bytes / (timings.pop(SAME_ROUND_COPY)["median_ms"] * 1e-3) / UNIT_SCALE["GB/s"]
    for name, (fn, out) in warm.items():
        try:
            memory = peak_memory(fn, cfg.device)
        except Exception as exc:
            results[name] = {"status": "n/a", "reason": short_error(exc)}
            continue
        finally:
            if cfg.is_cuda:
                torch.cuda.empty_cache()
        results[name] = _result(fn, out, case, dict(timings[name], single_call=False), memory,
                                eager_out if name != "eager" else None)
        if cfg.is_cuda and cfg.kernel_times and name.startswith("llama_ext"):
            try:
                profile = kernel_times(fn, cfg.device)
                results[name].update(kernels=profile["kernels"], kernel_span_us=profile["span_us"])
            except Exception as exc:  # the breakdown is an extra: its failure is noted, not fatal
                results[name]["kernels_error"] = short_error(exc)
        if copy_bytes:
            results[name].update(copy_same_rounds=copy_rate,
                                 fraction_of_copy_same_rounds=results[name]["throughput"] / copy_rate)
    return results


def run_op(bench: OpBench, cfg: RunConfig, ceilings: Ceilings, progress: bool = True) -> Dict[str, Any]:
    """Measures every provider on every case; returns the op's JSON record, its fractions of
    the ceilings as measured so far (apply_ceilings updates them)."""
    record: Dict[str, Any] = {
        "op": bench.name, "title": bench.title, "size_name": bench.size_name, "notes": bench.notes,
        "providers": {p.name: {"source": p.source, "skip_reason": p.skip_reason} for p in bench.providers},
    }
    if bench.skip_reason:
        return dict(record, status="skipped", reason=bench.skip_reason, cases=[])
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are all tqdm gives
        def tqdm(cases, **_):
            return cases

    ceilings.prepare(bench.cases)
    cases = []
    for case in tqdm(bench.cases, desc=bench.name, unit="case", leave=False, disable=not progress or cfg.smoke):
        inputs = bench.make_inputs(case)
        results = _measure_case(bench.providers, case, inputs, cfg)
        eager_ms = results.get("eager", {}).get("median_ms")
        for r in results.values():
            if r["status"] == "ok":
                r["speedup_vs_eager"] = eager_ms / r["median_ms"] if eager_ms else None
        del inputs
        cases.append({
            "mode": case.mode, "dtype": dtype_name(case.dtype), "size": case.size, "label": case.label,
            "unit": case.unit, "work": case.work, "out_bytes": case.out_bytes, "headline": is_headline(case, cfg),
            "ceiling": None, "ceiling_kind": case.ceiling, "params": case.params,
            "results": results,
        })
    op = dict(record, status="ok", cases=cases)
    apply_ceilings(op, ceilings)
    return op

