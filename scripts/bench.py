"""Benchmark bnexp against torch: our batch-norm layer vs torch.nn.BatchNorm1d, and the
training loop vs a pytorch/examples-style DataLoader pipeline.

    python scripts/bench.py                                  # layer and training tables, 2 threads
    python scripts/bench.py --sections training              # training throughput, logging cost, peak RSS
    python scripts/bench.py --sections probes                # what probe.every=100 and norm=custom_noisy cost
    python scripts/bench.py --threads 1 --out outputs/bench.json
    python scripts/bench.py --no-compile                     # skip the torch.compile rows (seconds a shape)
    python scripts/bench.py --quick --out /tmp/bench.json    # tiny sizes, few repeats (smoke test)
    python scripts/bench.py --sections layer --steady-malloc # freed memory stays mapped: no page faults
    python scripts/bench.py --sections norms                 # LayerNorm, GroupNorm, BatchRenorm1d vs torch's
    python scripts/bench.py --sections threads load --repeats 3   # threads under load: quiet machine, many minutes
    python scripts/bench.py --sections sweep                 # experiment=convergence: batched vs joblib launcher
    python scripts/bench.py --sections sweep --quick         # the same, tiny budgets (smoke test)
    python scripts/bench.py --sections device --threads 1    # on a GPU: graphs / no graphs / CPU, default run

Each section is a function `bench_<name>(args) -> list of row dicts`, registered in
SECTIONS; main() runs the sections asked for, prints one table per section and the
machine, and with --out writes {"machine": {...}, "<section>": [rows...]} as JSON.

Timing: torch.utils.benchmark (which synchronizes CUDA), native and custom interleaved
within every repeat so that load from other processes hits both alike; a time is the
median over repeats, a ratio the median of the per-repeat custom/native ratios. Ratios
< 1 mean ours is faster. On a shared machine rerun when the load average (printed) is high.

Page faults: glibc's malloc hands large blocks (MBs) back to the kernel when they are freed
and the next allocation of that size touches fresh pages: a large share of a large-shape
step, native's as much as ours, varying with the order of earlier allocations, so runs differ
widely (docs/results/measurements.md#bench-script). The layer rows count minor faults per call;
--steady-malloc sets mallopt so freed memory stays mapped, which leaves only the compute.

Threads under load (not in the default sections: they need a quiet machine and take minutes).
`threads`: the MLP's training step at growing work per op, 1 vs 2 threads, alone and beside a
CPU-bound competitor (a single-threaded Python busy loop), with passive and spinning OpenMP
waits; it prints the smallest work from which 2 threads keep up with 1 beside the competitor,
next to bnexp.run.runtime.THREADS_CROSSOVER_MACS (what `threads=auto` switches at). `load`: whole
default runs through scripts/train.py (train_steps_per_s from summary.json) alone, beside the
busy loop, and two started together, for threads=2 as before (spinning), 1, 2 and auto.
Both are the 2-core case; on a bigger machine `taskset -c 0,1 python scripts/bench.py ...`
gives them (and their busy loop) two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils import benchmark

from bnexp.nn import compiled
from bnexp.nn.compiled import CompiledBatchNorm1d
from bnexp.layers import BatchNorm1d
from bnexp.nn.batch_renorm import BatchRenorm1d
from bnexp.nn.group_norm import GroupNorm
from bnexp.nn.layer_norm import LayerNorm
from bnexp.nn.norm_autograd import autograd_forward
from bnexp.run.runtime import available_cores, wait_policy

LAYER_SHAPES = [(60, 100), (256, 100), (1024, 512), (4096, 1024)]  # (batch, features)
QUICK_SHAPES = [(8, 4), (32, 16)]


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": available_cores(),  # this process's affinity (taskset, cgroups)
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "openmp_wait": wait_policy(),  # of this process; the threads and load sections set their own
    }
    return info


# ----------------------------------------------------------------------------- timing


def time_us(fn, threads: int, min_run_time: float) -> tuple[float, float]:
    """Median time of one fn() call in microseconds, and the minor page faults per call."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    calls = measurement.number_per_run * len(measurement.raw_times)  # ignores the calibration calls
    return measurement.median * 1e6, faults / calls


def compare(native, custom, args) -> dict:
    """Interleaved timings of two callables: medians and the median paired ratio."""
    native(), custom()  # warm-up: first-call allocations and lazy initialization
    pairs = []
    for _ in range(args.repeats):
        pairs.append((time_us(native, args.threads, args.min_time), time_us(custom, args.threads, args.min_time)))
    return {
        "native_us": statistics.median(a for (a, _), _ in pairs),
        "custom_us": statistics.median(b for _, (b, _) in pairs),
        "ratio": statistics.median(b / a for (a, _), (b, _) in pairs),
        "native_faults": statistics.median(f for (_, f), _ in pairs),
        "custom_faults": statistics.median(f for _, (_, f) in pairs),
    }


def steady_malloc() -> str:
    """Keep freed memory mapped (glibc): no page faults from re-allocating large blocks.

    M_MMAP_THRESHOLD at its 32 MB maximum serves blocks up to that size from the heap, and
    a huge M_TRIM_THRESHOLD never returns the heap's top to the kernel. Process-wide and for
    good: call it before anything is timed.
    """
    import ctypes
    import ctypes.util

    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if mallopt is None or not (mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("error: --steady-malloc needs glibc's mallopt (Linux), which is missing or refused")
    return "steady (mallopt: mmap threshold 32 MB, no trimming)"


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(sizes)


# ----------------------------------------------------------------------------- layer section


def train_step(layer, x, upstream):
    """One training-mode forward + backward; grads returned, not accumulated into .grad."""
    def step():
        output = layer(x)
        return torch.autograd.grad(output, [x, layer.weight, layer.bias], upstream)
    return step


def eval_step(layer, x):
    """One evaluation-mode forward, as inference runs it (no autograd graph)."""
    def step():
        with torch.no_grad():
            return layer(x)
    return step


def layer_row(shape, device, args) -> dict:
    """Train fwd+bwd, eval fwd, compile and saved-bytes numbers for one input shape."""
    print(f"layer {device} {tuple(shape)} ...", file=sys.stderr, flush=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 50 + 10).to(device).requires_grad_()
    upstream = torch.randn(shape, generator=gen).to(device)
    native = torch.nn.BatchNorm1d(shape[1], device=device)
    custom = BatchNorm1d(shape[1], device=device)
    row = {"device": device, "shape": list(shape)}
    train = compare(train_step(native, x, upstream), train_step(custom, x, upstream), args)
    row.update({f"train_{k}": v for k, v in train.items()})
    native.eval(), custom.eval()
    evaluation = compare(eval_step(native, x), eval_step(custom, x), args)
    row.update({f"eval_{k}": v for k, v in evaluation.items()})
    native.train(), custom.train()
    row["saved_bytes_native"] = saved_bytes(lambda: native(x))
    row["saved_bytes_custom"] = saved_bytes(lambda: custom(x))
    if args.compile:
        row.update(compile_numbers(native, x, upstream, args))
    return row


def compile_numbers(native, x, upstream, args) -> dict:
    """CompiledBatchNorm1d against native, compile warm-up excluded.

    The compile cache is reset first so that every shape gets its own static-shape kernels,
    as a training run with a fixed batch size would. Shapes under 65,536 values run the
    eager layer here too (that is what CompiledBatchNorm1d does with them).
    """
    compiled.reset()
    layer = CompiledBatchNorm1d(x.shape[1], device=x.device)
    step = train_step(layer, x, upstream)
    for _ in range(3):  # compile forward and backward, then settle
        step()
    timed = compare(train_step(native, x, upstream), step, args)
    return {"compile_train_us": timed["custom_us"], "compile_ratio": timed["ratio"],
            "compile_native_us": timed["native_us"], "compile_native_faults": timed["native_faults"],
            "compile_faults": timed["custom_faults"], "saved_bytes_compiled": saved_bytes(lambda: layer(x))}


def bench_layer(args) -> list[dict]:
    """The layer section: one row per (device, shape)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = QUICK_SHAPES if args.quick else LAYER_SHAPES
    return [layer_row(shape, device, args) for device in devices for shape in shapes]


LAYER_COLUMNS = [
    ("device", "device", "{}"),
    ("shape", "shape", "{}"),
    ("train_native_us", "train native us", "{:.1f}"),
    ("train_custom_us", "train custom us", "{:.1f}"),
    ("train_ratio", "train ratio", "{:.2f}"),
    ("train_native_faults", "faults/call native", "{:.0f}"),
    ("train_custom_faults", "faults/call custom", "{:.0f}"),
    ("eval_native_us", "eval native us", "{:.1f}"),
    ("eval_custom_us", "eval custom us", "{:.1f}"),
    ("eval_ratio", "eval ratio", "{:.2f}"),
    ("compile_train_us", "compiled train us", "{:.1f}"),
    ("compile_ratio", "compiled ratio", "{:.2f}"),
    ("compile_faults", "faults/call compiled", "{:.0f}"),
    ("saved_bytes_native", "saved B native", "{}"),
    ("saved_bytes_custom", "saved B custom", "{}"),
    ("saved_bytes_compiled", "saved B compiled", "{}"),
]

# ----------------------------------------------------------------------------- norms section
# the other normalizations (bnexp/nn/layer_norm.py, group_norm.py, batch_renorm.py) in the layer section's style: training forward + backward,
# ours against torch's (BatchRenorm1d, which torch lacks: against nn.BatchNorm1d and our
# BatchNorm1d), and our analytic backward against the same forward formulas under plain
# autograd: the measurement that decided each layer keeps its analytic backward.

NORM_SHAPES = [(60, 100), (1024, 512)]  # the harness's batch, and a larger one (batch, features)
NORM_GROUPS = 4  # GroupNorm rows: 4 groups, of 25 channels at 100 features


def autograd_train_step(layer, x, upstream):
    """train_step with the layer's forward formulas under plain autograd instead of its analytic backward."""
    def step():
        output = autograd_forward(layer, x)
        return torch.autograd.grad(output, [x, layer.weight, layer.bias], upstream)
    return step


def norm_rows(shape, device, args) -> list[dict]:
    """One row per normalization at one input shape: ours / torch's, and analytic / autograd."""
    print(f"norms {device} {tuple(shape)} ...", file=sys.stderr, flush=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 50 + 10).to(device).requires_grad_()
    upstream = torch.randn(shape, generator=gen).to(device)
    features = shape[1]
    layers = [  # (ours, torch's, our BatchNorm1d or None)
        (LayerNorm(features, device=device), torch.nn.LayerNorm(features, device=device), None),
        (GroupNorm(NORM_GROUPS, features, device=device), torch.nn.GroupNorm(NORM_GROUPS, features, device=device),
         None),
        # r_max = 3, d_max = 5 from the first step (the schedule's limits change values, not ops)
        (BatchRenorm1d(features, hold_steps=0, warmup_steps=0, device=device),
         torch.nn.BatchNorm1d(features, device=device), BatchNorm1d(features, device=device)),
    ]
    rows = []
    for ours, native, our_bn in layers:
        row = {"layer": type(ours).__name__, "device": device, "shape": list(shape),
               "native": f"nn.{type(native).__name__}"}
        timed = compare(train_step(native, x, upstream), train_step(ours, x, upstream), args)
        row.update({f"train_{k}": timed[k] for k in ("native_us", "custom_us", "ratio")})
        if our_bn is not None:
            timed = compare(train_step(our_bn, x, upstream), train_step(ours, x, upstream), args)
            row.update(bn_us=timed["native_us"], bn_ratio=timed["ratio"])
        timed = compare(autograd_train_step(ours, x, upstream), train_step(ours, x, upstream), args)
        row.update(autograd_us=timed["native_us"], analytic_ratio=timed["ratio"])
        rows.append(row)
    return rows


def bench_norms(args) -> list[dict]:
    """The norms section: per (device, shape), one row per normalization."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = QUICK_SHAPES if args.quick else NORM_SHAPES
    return [row for device in devices for shape in shapes for row in norm_rows(shape, device, args)]


NORM_COLUMNS = [
    ("layer", "layer", "{}"),
    ("device", "device", "{}"),
    ("shape", "shape", "{}"),
    ("native", "torch's", "{}"),
    ("train_native_us", "train torch us", "{:.1f}"),
    ("train_custom_us", "train ours us", "{:.1f}"),
    ("train_ratio", "ours / torch", "{:.2f}"),
    ("bn_us", "our BatchNorm1d us", "{:.1f}"),
    ("bn_ratio", "ours / our BN", "{:.2f}"),
    ("autograd_us", "plain autograd us", "{:.1f}"),
    ("analytic_ratio", "analytic / autograd", "{:.2f}"),
]

# ----------------------------------------------------------------------------- training


def _compose(overrides: list[str]):
    """The harness's own validated config, composed as scripts/train.py composes it."""
    from bnexp.config import to_config
    from bnexp.jobs.hydra_setup import compose

    return to_config(compose(overrides))


def harness_run(norm: str, steps: int, eval_every: int, tensorboard: bool = True, extra=(),
                device: str = "cpu") -> dict:
    """One bnexp.run.loop.train run with the default MLP and batch 60; its summary.json."""
    import tempfile

    from bnexp.run.loop import train

    cfg = _compose([f"norm={norm}", f"train.steps={steps}", f"train.eval_every={eval_every}",
                    f"train.tensorboard={str(tensorboard).lower()}", f"train.checkpoint_every={steps}",
                    f"device={device}", *extra])
    with tempfile.TemporaryDirectory() as run_dir:
        return train(cfg, Path(run_dir), progress="quiet")


def dataloader_steps_per_s(steps: int) -> float:
    """The pytorch/examples pipeline on the same model: torchvision MNIST + ToTensor + Normalize,
    DataLoader(batch_size=60, shuffle=True), one step per batch; steps per second of training."""
    import time

    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from bnexp.config import PROJECT_ROOT
    from bnexp.run.fetch import ensure_mnist
    from bnexp.nn.model import MLP, init_weights

    root = Path(os.environ.get("BNEXP_DATA", PROJECT_ROOT / "data"))
    ensure_mnist(root)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = datasets.MNIST(str(root), train=True, download=False, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=60, shuffle=True)
    model = MLP([100, 100, 100], "sigmoid", "native")
    init_weights(model, 0.1, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x.flatten(1)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the examples script reads the loss every log interval; we are generous: one sync
    return steps / (time.perf_counter() - start)


def peak_rss_mb(overrides: list[str]) -> float:
    """Peak resident memory of one `scripts/train.py` run in a fresh process (ru_maxrss of the child)."""
    import resource
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        script = Path(__file__).resolve().parent / "train.py"
        subprocess.run([sys.executable, str(script), *overrides, f"hydra.run.dir={run_dir}", "device=cpu"],
                       check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux


def bench_training(args) -> list[dict]:
    """Training steps/s, interleaved repeats, medians: the harness with each norm (evaluation
    excluded, as summary.json counts it), a DataLoader pipeline, and the cost of logging: the
    same run with 6 evaluations with and without TensorBoard output (wall clock: per-step
    losses, scalars, histograms, percentiles); and the peak RSS of a default run."""
    torch.set_num_threads(args.threads)
    steps = 200 if args.quick else 3000
    loader_steps = 50 if args.quick else 1000
    keys = ("custom", "native", "none", "dataloader", "logged", "unlogged")
    runs: dict[str, list[float]] = {k: [] for k in keys}
    for repeat in range(args.repeats):
        norms = ("custom", "native", "none") if repeat % 2 == 0 else ("none", "native", "custom")
        for norm in norms:  # alternating order: a drift in machine speed hits both alike
            runs[norm].append(harness_run(norm, steps, eval_every=steps)["train_steps_per_s"])
        runs["dataloader"].append(dataloader_steps_per_s(loader_steps))
        # the same loop and the same 6 evaluations; only the TensorBoard output differs. Their
        # order alternates too, so that going first or second in a repeat hits both alike.
        for tensorboard in ((True, False) if repeat % 2 == 0 else (False, True)):
            run = harness_run("custom", steps, eval_every=max(1, steps // 6), tensorboard=tensorboard)
            runs["logged" if tensorboard else "unlogged"].append(steps / run["wall_s"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    names = {"custom": "harness, norm=custom", "native": "harness, norm=native", "none": "harness, norm=none",
             "dataloader": "DataLoader pipeline, native BN",
             "logged": "custom, 6 evals, full TensorBoard logging, wall",
             "unlogged": "custom, 6 evals, train.tensorboard=false, wall"}
    rows = [{"what": names[k], "steps_per_s": round(med[k], 1)} for k in keys]
    rows += [
        paired("custom / native (target >= 0.9)", runs["custom"], runs["native"], 3),
        paired("harness native / DataLoader (target >= 5)", runs["native"], runs["dataloader"], 2),
        paired("full logging / logging off (cost <= 10%)", runs["logged"], runs["unlogged"], 3),
    ]
    run = ["experiment=smoke"] if args.quick else []
    rows.append({"what": "peak RSS of a " + ("smoke" if args.quick else "default") + " run (MiB)",
                 "ratio": round(peak_rss_mb(run), 1)})
    return rows


DEVICE_WAYS = {"GPU, CUDA graphs": ("cuda", ["train.cuda_graphs=on"]),
               "GPU, no graphs": ("cuda", ["train.cuda_graphs=off"]),
               "CPU": ("cpu", [])}


def bench_device(args) -> list[dict]:
    """The default run (batch 60, 3 x 100, 8 evaluations) with each of none, custom and native on
    the GPU with its steps replayed as CUDA graphs, on the GPU without, and on this machine's CPU
    (with --threads threads; 1 is what threads=auto gives this MLP): training steps/s as
    summary.json counts them and the run's wall time, interleaved repeats, medians, and the
    speed issue's ratios. Without a GPU, one row saying so."""
    if not torch.cuda.is_available():
        return [{"what": "no CUDA GPU on this machine: nothing to measure (run it where torch sees one)"}]
    torch.set_num_threads(args.threads)
    steps = 200 if args.quick else 4000
    rows = []
    for norm in ("none", "custom", "native"):
        rates: dict[str, list[float]] = {way: [] for way in DEVICE_WAYS}
        walls: dict[str, list[float]] = {way: [] for way in DEVICE_WAYS}
        for repeat in range(args.repeats):
            ways = list(DEVICE_WAYS) if repeat % 2 == 0 else list(DEVICE_WAYS)[::-1]
            for way in ways:
                device, extra = DEVICE_WAYS[way]
                summary = harness_run(norm, steps, eval_every=max(1, steps // 8), device=device, extra=extra)
                rates[way].append(summary["train_steps_per_s"])
                walls[way].append(summary["wall_s"])
        rows += [{"what": f"norm={norm}, {way}", "steps_per_s": round(statistics.median(rates[way]), 1),
                  "wall_s": round(statistics.median(walls[way]), 2)} for way in DEVICE_WAYS]
        rows.append(paired(f"norm={norm}: graphs / no graphs, steps/s (target >= 10)",
                           rates["GPU, CUDA graphs"], rates["GPU, no graphs"], 2))
        rows.append(paired(f"norm={norm}: graphs / CPU, steps/s (target >= 5)",
                           rates["GPU, CUDA graphs"], rates["CPU"], 2))
        rows.append(paired(f"norm={norm}: CPU / graphs, wall time of the whole run",
                           walls["CPU"], walls["GPU, CUDA graphs"], 2))
    return rows


DEVICE_COLUMNS = [("what", "what", "{}"), ("steps_per_s", "steps/s", "{:.1f}"), ("wall_s", "wall s", "{:.2f}"),
                  ("ratio", "ratio", "{}"), ("range", "range over repeats", "{}")]


def paired(what: str, a: list[float], b: list[float], digits: int) -> dict:
    """The median of the per-repeat ratios a/b, and their range across repeats."""
    ratios = [x / y for x, y in zip(a, b)]
    return {"what": what, "ratio": round(statistics.median(ratios), digits),
            "range": f"{min(ratios):.{digits}f}-{max(ratios):.{digits}f}"}


PROBE_EVERY = 100  # the default probe schedule: conf/experiment/santurkar.yaml


def bench_probes(args) -> list[dict]:
    """What the why-measurements cost (bnexp/run/probes.py, bnexp/nn/noise.py): the default MLP with
    norm=custom, probes off vs probe.every=100 (landscape + ICS), and norm=custom_noisy vs custom,
    as training steps/s (probe time included, as summary.json counts it), interleaved repeats."""
    torch.set_num_threads(args.threads)
    steps, every = (200, 20) if args.quick else (3000, PROBE_EVERY)
    runs: dict[str, list[float]] = {"off": [], "probed": [], "noisy": []}
    for repeat in range(args.repeats):
        order = ("off", "probed", "noisy") if repeat % 2 == 0 else ("noisy", "probed", "off")
        for what in order:  # alternating order: a drift in machine speed hits all alike
            norm = "custom_noisy" if what == "noisy" else "custom"
            extra = [f"probe.every={every}"] if what == "probed" else []
            runs[what].append(harness_run(norm, steps, eval_every=steps, extra=extra)["train_steps_per_s"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    names = {"off": "custom, probes off", "probed": f"custom, probe.every={every} (landscape + ICS)",
             "noisy": "custom_noisy, probes off"}
    rows = [{"what": names[k], "steps_per_s": round(med[k], 1)} for k in runs]
    return rows + [
        paired(f"probes off / probe.every={every}: run time with probes (target <= 1.15)",
               runs["off"], runs["probed"], 3),
        paired("custom / custom_noisy: run time of the noisy variant", runs["off"], runs["noisy"], 3),
    ]


TRAINING_COLUMNS = [
    ("what", "what", "{}"),
    ("steps_per_s", "steps/s", "{:.1f}"),
    ("ratio", "ratio / value", "{}"),
    ("range", "range over repeats", "{}"),
]


# ----------------------------------------------------------------------------- threads under load
#
# Both sections need what one process cannot do to itself: another busy process beside it, and
# an OpenMP wait policy, which OpenMP reads once when torch loads it. So they start processes:
# the competitor is a single-threaded Python busy loop (one core's worth of CPU-bound work).

CROSSOVER_SHAPES = [(60, 100), (60, 256), (1024, 100), (256, 256), (256, 512), (1024, 512), (1024, 1024)]
QUICK_CROSSOVER_SHAPES = [(60, 100), (256, 256)]  # (batch, width of the 3 hidden layers)
WAIT_POLICIES = {  # environment of a measured process: how torch's idle OpenMP threads wait
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # what scripts/train.py sets: threads sleep at once
    "spin": {"GOMP_SPINCOUNT": "300000"},  # libgomp's own default (~3 ms of spinning), as before
}


@contextmanager
def busy_loop(on: bool = True):
    """The competitor: a single-threaded Python busy loop in a subprocess while the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def policy_env(policy: str, base: dict | None = None) -> dict:
    """This process's environment with one wait policy and nothing else that sets one."""
    env = {k: v for k, v in (base or os.environ).items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **WAIT_POLICIES[policy]}


def mlp_steps_per_s(batch: int, width: int, threads: int, min_time: float) -> float:
    """Training steps/s of bnexp's MLP (3 hidden layers of `width`, norm=custom, SGD) on one fixed
    random batch: the step's ops without the batch gathering, for at least min_time and 5 steps."""
    import time

    import torch.nn.functional as F

    from bnexp.nn.model import MLP

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    model = MLP([width] * 3, "sigmoid", "custom")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(batch, 784, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: first-call allocations
        step()
    steps, start = 0, time.perf_counter()
    while steps < 5 or time.perf_counter() - start < min_time:
        step()
        steps += 1
    return steps / (time.perf_counter() - start)


def crossover_worker(shapes, repeats: int, min_time: float) -> list[dict]:
    """In the measured process: medians over interleaved repeats of 1 and 2 threads, per shape."""
    rows = []
    for batch, width in shapes:
        runs = {1: [], 2: []}
        for repeat in range(repeats):
            for threads in ((1, 2) if repeat % 2 == 0 else (2, 1)):
                runs[threads].append(mlp_steps_per_s(batch, width, threads, min_time))
        rows.append({"t1": statistics.median(runs[1]), "t2": statistics.median(runs[2])})
    return rows


def crossover_process(shapes, policy: str, busy: bool, args) -> list[dict]:
    """crossover_worker in a fresh process with this wait policy, beside a busy loop or not."""
    # the worker is this file's function: load it by path (runpy), without touching sys.path
    code = ("import json, runpy, sys; bench = runpy.run_path(sys.argv[1]); "
            "print(json.dumps(bench['crossover_worker'](json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))))")
    argv = [sys.executable, "-c", code, str(Path(__file__).resolve()), json.dumps(shapes),
            str(args.repeats), str(args.min_time)]
    print(f"threads: {policy} wait, {'beside a busy loop' if busy else 'alone'} ...", file=sys.stderr, flush=True)
    with busy_loop(busy):
        out = subprocess.run(argv, env=policy_env(policy), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_threads(args) -> list[dict]:
    """The crossover: steps/s of the MLP step at growing work per op with 1 and 2 threads,
    alone and beside one busy loop, under both wait policies; and the smallest measured work
    from which 2 threads keep up with 1 beside the busy loop (what `threads=auto` switches at)."""
    from bnexp.run.runtime import THREADS_CROSSOVER_MACS, choose_threads, work_per_op

    shapes = QUICK_CROSSOVER_SHAPES if args.quick else CROSSOVER_SHAPES
    rows = []
    for policy in WAIT_POLICIES:
        idle = crossover_process(shapes, policy, False, args)
        busy = crossover_process(shapes, policy, True, args)
        for (batch, width), a, b in zip(shapes, idle, busy):
            work = work_per_op([width] * 3, batch)
            rows.append({"policy": policy, "shape": f"{batch} x {width}", "work_m": work / 1e6,
                         "idle_1": a["t1"], "idle_2": a["t2"], "idle_gain": a["t2"] / a["t1"],
                         "busy_1": b["t1"], "busy_2": b["t2"], "busy_gain": b["t2"] / b["t1"],
                         "auto": choose_threads("auto", work, 2).threads})
    passive = sorted((r for r in rows if r["policy"] == "passive"), key=lambda r: r["work_m"])
    for where, key in (("alone", "idle_gain"), ("beside a busy loop", "busy_gain")):
        rows.append({"policy": "passive", "shape": f"measured crossover, {where}",
                     "work_m": crossover(passive, key)})
    rows.append({"policy": "passive", "shape": "bnexp.run.runtime crossover", "work_m": THREADS_CROSSOVER_MACS / 1e6})
    return rows


def crossover(rows: list[dict], gain: str) -> float | None:
    """The smallest work per op (M) from which 2 threads are at least as fast as 1 at every
    larger shape measured; None when they never are."""
    paying = [r["work_m"] for i, r in enumerate(rows) if all(s[gain] >= 1 for s in rows[i:])]
    return paying[0] if paying else None


THREADS_COLUMNS = [
    ("policy", "wait", "{}"),
    ("shape", "batch x width", "{}"),
    ("work_m", "M multiply-adds/op", "{:.1f}"),
    ("idle_1", "alone 1t steps/s", "{:.1f}"),
    ("idle_2", "alone 2t", "{:.1f}"),
    ("idle_gain", "2t/1t alone", "{:.2f}"),
    ("busy_1", "busy 1t", "{:.1f}"),
    ("busy_2", "busy 2t", "{:.1f}"),
    ("busy_gain", "2t/1t busy", "{:.2f}"),
    ("auto", "auto on 2 cores", "{}"),
]

LOAD_SETTINGS = [  # (label, threads=..., wait policy)
    ("2, spin (the old default)", "2", "spin"),
    ("1", "1", "passive"),
    ("2", "2", "passive"),
    ("auto", "auto", "passive"),
]


def start_run(threads: str, policy: str, steps: int, run_dir: Path) -> subprocess.Popen:
    """A default `scripts/train.py` run (without TensorBoard output) in its own process."""
    script = Path(__file__).resolve().parent / "train.py"
    overrides = [f"threads={threads}", f"train.steps={steps}", f"train.eval_every={steps}",
                 f"train.checkpoint_every={steps}", "train.tensorboard=false", "device=cpu",
                 f"hydra.run.dir={run_dir}"]
    return subprocess.Popen([sys.executable, str(script), *overrides], env=policy_env(policy),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def runs_together(threads: str, policy: str, steps: int, count: int, busy: bool) -> list[dict]:
    """`count` default runs started at once (beside a busy loop or not): steps/s and threads of each."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, busy_loop(busy):
        dirs = [Path(tmp) / f"run{i}" for i in range(count)]
        procs = [start_run(threads, policy, steps, d) for d in dirs]
        errors = [proc.communicate()[1] for proc in procs]  # all finish before any failure is raised
        for proc, err in zip(procs, errors):
            if proc.returncode != 0:
                raise SystemExit(f"error: a load-section run failed ({proc.returncode}):\n{err}")
        results = []
        for d in dirs:
            summary = json.loads((d / "summary.json").read_text())
            line = next(s for s in (d / "train.log").read_text().splitlines() if "torch threads:" in s)
            results.append({"steps_per_s": summary["train_steps_per_s"],
                            "threads": line.split("torch threads:", 1)[1].strip()})
        return results


def bench_load(args) -> list[dict]:
    """Default runs (scripts/train.py, 784-100-100-100-10, batch 60) alone, beside one busy loop,
    and two started together, for each threads setting; medians over interleaved repeats.
    A run's steps/s is summary.json's train_steps_per_s (evaluation excluded)."""
    steps = args.load_steps or (60 if args.quick else 2000)
    # --quick: the old default and auto only (each setting is four processes of a few seconds)
    settings = [LOAD_SETTINGS[0], LOAD_SETTINGS[-1]] if args.quick else LOAD_SETTINGS
    cells = {label: {"alone": [], "busy": [], "pair": []} for label, _, _ in settings}
    used = {}
    for repeat in range(args.repeats):
        order = settings if repeat % 2 == 0 else settings[::-1]
        for label, threads, policy in order:  # alternating order: a drift in machine speed hits all alike
            print(f"load: threads={label} (repeat {repeat + 1}) ...", file=sys.stderr, flush=True)
            alone = runs_together(threads, policy, steps, 1, busy=False)[0]
            used[label] = alone["threads"]
            cells[label]["alone"].append(alone["steps_per_s"])
            cells[label]["busy"].append(runs_together(threads, policy, steps, 1, busy=True)[0]["steps_per_s"])
            pair = runs_together(threads, policy, steps, 2, busy=False)
            cells[label]["pair"].append(statistics.mean(r["steps_per_s"] for r in pair))
    before = statistics.median(cells[settings[0][0]]["alone"])
    rows = []
    for label, _, policy in settings:
        med = {k: statistics.median(v) for k, v in cells[label].items()}
        rows.append({"threads": label, "wait": policy, "alone": med["alone"], "vs_before": med["alone"] / before,
                     "busy": med["busy"], "busy_kept": med["busy"] / med["alone"],
                     "pair": med["pair"], "pair_kept": med["pair"] / med["alone"],
                     "steps": steps, "log": used[label]})
    return rows


LOAD_COLUMNS = [
    ("threads", "threads", "{}"),
    ("wait", "wait", "{}"),
    ("alone", "alone steps/s", "{:.0f}"),
    ("vs_before", "vs old default", "{:.2f}"),
    ("busy", "beside a busy loop", "{:.0f}"),
    ("busy_kept", "kept", "{:.0%}"),
    ("pair", "two together, each", "{:.0f}"),
    ("pair_kept", "kept", "{:.0%}"),
    ("log", "torch threads: (the run's log)", "{}"),
]


# ----------------------------------------------------------------------------- sweep

# the sweep every published sweep figure measured: the convergence preset as it was before it
# grew to 10 seeds and log-spaced evaluations (75 runs, evaluations every 100 steps), so that
# figures from before and after that change compare
BENCH_SWEEP_SHAPE = ["seed=range(5)", "train.eval_schedule=linear"]
SWEEP_KS = (1, 5, 15, 25, 75)  # members per group for the model-steps/s curve
QUICK_SWEEP = ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=40", "optim.lr=0.1,1.0", "seed=0",
               "model.widths=[32,32]"]  # 6 small runs


# the sweeps compared: experiment=convergence with its own joblib (one job per core), and with the
# batched launcher under the preset's n_jobs=-1 (one group process per core, groups sized to
# fill every round, bnexp.jobs.groups.balanced_cap), and in one
# process with every core; then both again evaluating every 1,000 steps instead of every 100,
# where evaluation (full validation and test sets, which no launcher makes cheaper per run)
# takes a smaller share of a run
SWEEP_LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib"],
    "batched": ["hydra/launcher=batched"],
    "batched, n_jobs=1": ["hydra/launcher=batched", "hydra.launcher.n_jobs=1"],
    # on a GPU: one group process per norm, the three groups of 25 sharing the device at once
    "batched, n_jobs=3": ["hydra/launcher=batched", "hydra.launcher.n_jobs=3"],
    "joblib, eval_every=1000": ["hydra/launcher=joblib", "train.eval_every=1000"],
    "batched, eval_every=1000": ["hydra/launcher=batched", "train.eval_every=1000"],
}
SWEEP_PAIRS = [("joblib", "batched"), ("joblib", "batched, n_jobs=1"), ("joblib", "batched, n_jobs=3"),
               ("joblib, eval_every=1000", "batched, eval_every=1000")]  # (baseline, batched)


def sweep_wall_s(launcher: list[str], extra: list[str]) -> tuple[float, int]:
    """Wall time of `scripts/train.py -m experiment=convergence` with one launcher, from start to
    exit (process start, data loading, training, evaluation, logging: what a user waits for),
    and the number of runs that completed."""
    import subprocess
    import tempfile
    import time

    script = Path(__file__).resolve().parent / "train.py"
    with tempfile.TemporaryDirectory() as sweep:
        start = time.perf_counter()
        given = {o.split("=")[0] for o in extra}  # --quick's own seed wins
        shape = [o for o in BENCH_SWEEP_SHAPE if o.split("=")[0] not in given]
        result = subprocess.run([sys.executable, str(script), "-m", "experiment=convergence", *shape,
                                 *launcher, f"hydra.sweep.dir={sweep}", *extra], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"error: the sweep with {' '.join(launcher)} failed:\n{result.stderr[-2000:]}")
        done = sum(json.loads(p.read_text())["status"] == "completed" for p in Path(sweep).glob("*/summary.json"))
    return wall, done


def group_model_steps_per_s(k: int, steps: int, device: str) -> float:
    """Training throughput of one group of k convergence runs (norm=custom, five learning rates,
    seeds 0..): model-steps per second of training time, evaluation excluded (one at the end).
    k = 1 is the solo path itself, the baseline."""
    import tempfile

    from bnexp.run.loop import MemberSpec, train_group

    lrs = (0.1, 0.3, 1.0, 3.0, 10.0)
    cfgs = [_compose(["experiment=convergence", "norm=custom", f"optim.lr={lrs[i % 5]}", f"seed={i // 5}",
                      f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
                      "train.tensorboard=false", f"device={device}"]) for i in range(k)]
    with tempfile.TemporaryDirectory() as root:
        outcomes = train_group([MemberSpec(c, Path(root) / str(i)) for i, c in enumerate(cfgs)])
    return k * outcomes[0].summary["train_steps_per_s"]


def sweep_multiply_adds(runs: int = 75, steps: int = 4000, evals: int = 41, batch: int = 60,
                        widths: tuple[int, ...] = (100, 100, 100), val: int = 10_000, test: int = 10_000) -> int:
    """The matrix multiply-adds the bench's convergence sweep must do, whatever runs it: per run,
    `steps` training steps (each layer's forward product, its weight gradient, and the input
    gradient of every layer but the first, whose input needs none) and `evals` passes over the
    validation split plus one over the test set (forward only). Norms, activations, the loss and
    the optimizer's elementwise work are left out, so the time it implies is a lower bound."""
    sizes = [784, *widths, 10]
    forward = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))  # per image
    train = batch * (3 * forward - sizes[0] * sizes[1])
    return runs * (steps * train + (evals * val + test) * forward)


def gemm_rate(threads: int = 1, repeats: int = 5) -> float:
    """This machine's float32 matmul rate (multiply-adds/s) on the sweep's largest product, a
    group's first layer in evaluation ((10,000 x 784) @ (784 x 1,300)), best of `repeats`:
    what one core sustains on the most favourable shape the sweep has."""
    import time

    torch.set_num_threads(threads)
    a, b = torch.randn(10_000, 784), torch.randn(784, 1_300)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 10_000 * 784 * 1_300 / best


def sweep_bound_rows(joblib_wall: float | None, cores: int) -> list[dict]:
    """How fast the sweep could be at all on this CPU: its multiply-adds at the best matmul rate
    on every core, and the joblib / that ratio, the most any launcher could reach here."""
    macs, rate = sweep_multiply_adds(), gemm_rate()
    least = macs / (rate * cores)
    rows = [{"what": "float32 matmul, 1 thread, (10,000 x 784) @ (784 x 1,300): G multiply-adds/s",
             "ratio": round(rate / 1e9, 1)},
            {"what": f"the sweep's {macs / 1e12:.2f} T matrix multiply-adds at that rate on {cores} cores: "
                     "least wall time of any float32 run of it", "wall_s": round(least, 1)}]
    if joblib_wall is not None:
        rows.append({"what": "joblib / that least time: the most any launcher could reach on this machine",
                     "ratio": round(joblib_wall / least, 2)})
    return rows


def bench_sweep(args) -> list[dict]:
    """experiment=convergence through each of SWEEP_LAUNCHERS (--quick: joblib and batched, tiny
    budgets; or those named by --sweep-launchers), their order rotating per repeat, every run on
    --sweep-device; then the model-steps/s curve of one group for K = 1, 5, 15, 25, 75 on that
    device (with --threads CPU threads)."""
    extra = [*(QUICK_SWEEP if args.quick else []), f"device={args.sweep_device}"]
    names = args.sweep_launchers or (["joblib", "batched"] if args.quick else
                                     [name for name in SWEEP_LAUNCHERS if name != "batched, n_jobs=3"])
    walls: dict[str, list[float]] = {name: [] for name in names}
    runs = {}
    for repeat in range(args.sweep_repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            print(f"sweep: {name} (repeat {repeat + 1}) ...", file=sys.stderr, flush=True)
            wall, runs[name] = sweep_wall_s(SWEEP_LAUNCHERS[name], extra)
            walls[name].append(wall)
            print(f"sweep: {name} took {wall:.1f} s, {runs[name]} runs completed", file=sys.stderr, flush=True)
    rows = [{"what": f"experiment=convergence, {name} ({runs[name]} runs completed)",
             "wall_s": round(statistics.median(walls[name]), 1)} for name in names]
    rows += [paired(f"{base} / {name} wall time (target >= 2.5, aim 4)", walls[base], walls[name], 2)
             for base, name in SWEEP_PAIRS if base in walls and name in walls]
    if args.sweep_device == "cpu" and not args.quick:
        joblib = statistics.median(walls["joblib"]) if walls.get("joblib") else None
        rows += sweep_bound_rows(joblib, available_cores())
    torch.set_num_threads(args.threads)
    steps = 20 if args.quick else 300
    device, base = args.sweep_device, None
    for k in SWEEP_KS[:2] if args.quick else SWEEP_KS:  # --quick: K = 1 and 5
        print(f"group of {k} on {device} ...", file=sys.stderr, flush=True)
        rate = group_model_steps_per_s(k, steps, device)
        base = base or rate
        rows.append({"what": f"{device}: group of K={k}", "model_steps_per_s": round(rate, 1),
                     "ratio": round(rate / base, 2)})
    return rows


SWEEP_COLUMNS = [
    ("what", "what", "{}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("model_steps_per_s", "model-steps/s", "{:.1f}"),
    ("ratio", "ratio", "{}"),
    ("range", "range over repeats", "{}"),
]


def bench_stack(args) -> list[dict]:
    """K members' training step (forward + backward, no update) two ways: the stacked model
    (bnexp/nn/stacked.py: batched matmuls, each norm stacked from its registry entry) and
    torch.func's ensembling (stack_module_state + functional_call under vmap); ms per step,
    interleaved repeats, medians. The default MLP, batch 60, K = 13 (a convergence group)."""
    import copy
    import time

    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    from bnexp.config import NormConfig
    from bnexp.nn.model import MLP, init_weights
    from bnexp.nn.registry import stacked_model
    from bnexp.nn.stacked import member_losses

    torch.set_num_threads(args.threads)
    K, B, steps = 13, 60, 20 if args.quick else 200
    rows = []
    for norm in ("none", "custom", "native"):
        models = []
        for seed in range(K):
            model = MLP([100, 100, 100], "sigmoid", norm)
            init_weights(model, 0.1, torch.Generator().manual_seed(seed))
            models.append(model)
        stacked = stacked_model(K, models[0], NormConfig(name=norm))
        for k, model in enumerate(models):
            stacked.load_member(k, model)
        x, y = torch.randn(K, B, 784), torch.randint(0, 10, (K, B))
        params, buffers = stack_module_state(models)
        params = {name: t.detach().requires_grad_() for name, t in params.items()}
        base = copy.deepcopy(models[0]).to("meta")
        one = vmap(lambda p, b, xx, yy: F.cross_entropy(functional_call(base, (p, b), (xx,)), yy))
        ways = {"stacked": lambda: member_losses(stacked, x, y).sum().backward(),
                "vmap": lambda: one(params, buffers, x, y).sum().backward()}
        times: dict[str, list[float]] = {w: [] for w in ways}
        error = None
        for _ in range(args.repeats):
            for way, step in ways.items():
                if way not in times:  # it failed in an earlier repeat
                    continue
                try:
                    step()  # warm-up
                    start = time.perf_counter()
                    for _ in range(steps):
                        step()
                    times[way].append((time.perf_counter() - start) / steps * 1e3)
                except RuntimeError as exc:  # our layer's autograd.Function has no vmap rule
                    error = str(exc).split(".")[0]
                    times.pop(way)
        med = {w: statistics.median(v) for w, v in times.items()}
        rows.append({"what": f"norm={norm}, stacked model", "ms_per_step": round(med["stacked"], 2)})
        if "vmap" in med:
            rows.append({"what": f"norm={norm}, torch.func vmap", "ms_per_step": round(med["vmap"], 2),
                         "ratio": f"{med['vmap'] / med['stacked']:.2f}x the stacked model's time"})
        else:
            rows.append({"what": f"norm={norm}, torch.func vmap", "ratio": f"fails: {error}"})
    return rows


STACK_COLUMNS = [("what", "what", "{}"), ("ms_per_step", "ms/step", "{}"), ("ratio", "vmap / stacked", "{}")]


SECTIONS = {"layer": (bench_layer, LAYER_COLUMNS), "norms": (bench_norms, NORM_COLUMNS),
            "training": (bench_training, TRAINING_COLUMNS),
            "threads": (bench_threads, THREADS_COLUMNS), "load": (bench_load, LOAD_COLUMNS),
            "probes": (bench_probes, TRAINING_COLUMNS),
            "sweep": (bench_sweep, SWEEP_COLUMNS), "stack": (bench_stack, STACK_COLUMNS),
            "device": (bench_device, DEVICE_COLUMNS)}


# ----------------------------------------------------------------------------- output


def format_table(rows: list[dict], columns) -> str:
    """A plain-text table: one line per row, only the columns some row has."""
    columns = [c for c in columns if any(c[0] in row for row in rows)]
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7; quick 2)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per timing (default 0.2; quick 0.01)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke test")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                        help="skip the torch.compile rows (each large shape compiles for seconds)")
    # training first: its harness timings are the most sensitive to what the process did before
    # (the layer section allocates GBs and compiles kernels)
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=["training", "probes", "layer", "norms"])
    parser.add_argument("--sweep-repeats", type=int, default=1,
                        help="repeats of the two convergence sweeps (sweep section; each pair takes minutes)")
    parser.add_argument("--sweep-device", choices=["cpu", "cuda"], default="cpu",
                        help="where the sweep section's runs and its K curve train (default cpu)")
    parser.add_argument("--sweep-launchers", nargs="+", choices=sorted(SWEEP_LAUNCHERS), metavar="NAME",
                        help="the sweep section's launcher rows, in this order (default: all but "
                             "'batched, n_jobs=3', which is for a GPU); one of: " + "; ".join(SWEEP_LAUNCHERS))
    parser.add_argument("--steady-malloc", action="store_true",
                        help="keep freed memory mapped (glibc mallopt): times without page faults")
    parser.add_argument("--load-steps", type=int, default=None,
                        help="training steps of each run in the load section (default 2000; quick 60)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.min_time is None:
        args.min_time = 0.01 if args.quick else 0.2
    if args.compile is None:
        args.compile = not args.quick
    if args.threads < 1 or args.repeats < 1 or args.min_time <= 0 or args.sweep_repeats < 1:
        parser.error(f"--threads and --repeats must be >= 1 and --min-time > 0, --sweep-repeats >= 1 "
                     f"(got {args.threads}, {args.repeats}, {args.min_time}, {args.sweep_repeats})")
    if args.sweep_device == "cuda" and not torch.cuda.is_available():
        parser.error("--sweep-device cuda: torch sees no CUDA GPU on this machine (allowed here: cpu)")
    if args.load_steps is not None and args.load_steps < 1:
        parser.error(f"--load-steps must be >= 1 (got {args.load_steps})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = steady_malloc() if args.steady_malloc else "glibc default"
    results = {"machine": {**machine_info(args.threads), "malloc": malloc}}
    for name in args.sections:
        bench, columns = SECTIONS[name]
        results[name] = bench(args)
        print(f"\n## {name}\n\n{format_table(results[name], columns)}")
    results["machine"]["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print("\nmachine: " + ", ".join(f"{k}={v}" for k, v in results["machine"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
