"""The one benchmark harness every benchmarks/*.py script uses (docs/benchmarks.md, "Method").

- All arms of a case run in one process, interleaved A B C A B C ..., after a warm-up; each sample
  times enough calls to last >= `min_sample_s`; the reported time is the median sample.
- Memory: on GPU the peak bytes allocated by the measured call over what was allocated before it.
  On CPU the growth of the peak resident set size during the measured call, measured in a fresh
  subprocess of the same script (after the timing, which keeps the default allocator): the peak is
  reset through /proc/self/clear_refs right before the call, and that process runs with a fixed
  glibc mmap threshold (MALLOC_MMAP_THRESHOLD_) so every large tensor is its own mapping, returned
  to the OS when freed, and the previous arm's memory never hides this arm's. (The fixed threshold
  would also make every large allocation page-fault afresh, which is why timing runs without it.)
- Ratios are reported against the project's arm ("elr-ext"): speedup = other arm's time / ours.
- Output: a printed table, JSON and a PNG plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OURS = "elr-ext"
_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
_MEMORY_ONLY = "ELR_BENCH_MEMORY_ONLY"


@dataclasses.dataclass
class Case:
    """One benchmark case: a label, its parameters, and a function building the arms for a mode
    ("fwd" or "fwd+bwd"): {arm name: zero-argument callable that runs one iteration}."""

    label: str
    params: dict
    build_arms: Callable[[str], Dict[str, Callable[[], None]]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib() -> tuple:
    status = open("/proc/self/status").read()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return hwm, rss


def peak_memory_bytes(fn: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory one call of `fn` adds on top of what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return None
    _, rss_before = _rss_kib()
    fn()
    hwm, _ = _rss_kib()
    return max(0, hwm - rss_before) * 1024


def cpu_memory_subprocess() -> dict:
    """Run this script again with the same arguments in memory-only mode (see the top)."""
    env = dict(os.environ, **{_MEMORY_ONLY: "1", _MMAP_ENV: "65536"})
    res = subprocess.run([sys.executable] + sys.argv, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"memory subprocess failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(res.stdout.strip().splitlines()[-1])


def process_memory_bytes() -> tuple:
    """(peak RSS, current RSS) of this process in bytes (Linux /proc; peak = VmHWM)."""
    hwm, rss = _rss_kib()
    return hwm * 1024, rss * 1024


def run_fresh(args: List[str], memory: bool = False, timeout: float | None = None, tries: int = 1) -> dict:
    """Run `python args...` in a fresh process and return the JSON object it prints on its last stdout
    line ({} after printing the error if it fails). memory=True: with the fixed mmap threshold of the
    memory runs (see the top), for scripts that measure one arm per process (benchmarks/train_step.py).
    tries > 1: for a process that plans, run again when torch kills it (elr_ext.plan.run_plan_process)."""
    from elr_ext.plan import run_plan_process  # here: scripts set their environment before elr_ext loads

    env = dict(os.environ, **({_MMAP_ENV: "65536"} if memory else {}))
    try:
        res = run_plan_process([sys.executable] + list(args), tries=tries, env=env, capture_output=True, text=True,
                               timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"fresh process timed out after {timeout} s: {' '.join(args)}", file=sys.stderr)
        return {}
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        print(f"fresh process failed ({' '.join(args)}):\n{res.stderr[-3000:]}", file=sys.stderr)
        return {}
    return json.loads(lines[-1])


def time_arms(arms: Dict[str, Callable[[], None]], device: torch.device, repeats: int, min_sample_s: float) -> dict:
    """Median seconds per call of each arm, timed interleaved."""
    for fn in arms.values():  # warm-up: compilation, allocator, caches
        fn()
        fn()
    _sync(device)
    calls = {}
    for name, fn in arms.items():  # calls per sample so that a sample lasts >= min_sample_s
        start = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - start, 1e-7)
        calls[name] = max(1, int(min_sample_s / once))
    samples = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so that a reader (or a run cut
    off mid-write) never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(name: str, cases: List[Case], device: torch.device, dtype: torch.dtype, modes=("fwd", "fwd+bwd"),
        repeats: int = 15, min_sample_s: float = 0.02, out_dir: str = RESULTS_DIR, tag: str = "") -> dict:
    """Time and measure every arm of every case; print the table; write JSON and PNG."""
    if os.environ.get(_MEMORY_ONLY):  # the CPU memory subprocess: measure, print JSON, stop
        memory = {}
        for case in cases:
            for mode in modes:
                torch._dynamo.reset()
                for arm, fn in case.build_arms(mode).items():
                    fn()
                    fn()
                    memory[f"{case.label}|{mode}|{arm}"] = peak_memory_bytes(fn, device)
        print(json.dumps(memory))
        sys.exit(0)
    rows = []
    for case in cases:
        for mode in modes:
            torch._dynamo.reset()  # a fresh compile per case (docs/benchmarks.md)
            arms = case.build_arms(mode)
            times = time_arms(arms, device, repeats, min_sample_s)
            for arm, fn in arms.items():
                rows.append({
                    "case": case.label, "params": case.params, "mode": mode, "arm": arm,
                    "median_ms": times[arm] * 1e3,
                    "peak_mem_bytes": peak_memory_bytes(fn, device) if device.type == "cuda" else None,
                })
            del arms
            ours = times.get(OURS)
            line = "  ".join(f"{a}={t * 1e3:.3f}ms" + (f" ({t / ours:.2f}x)" if ours and a != OURS else "")
                             for a, t in times.items())
            print(f"[{name}] {case.label} {mode}: {line}", flush=True)
    if device.type == "cpu":
        memory = cpu_memory_subprocess()
        for row in rows:
            row["peak_mem_bytes"] = memory.get(f"{row['case']}|{row['mode']}|{row['arm']}")
    for row in rows:
        ours = next((r for r in rows if r["case"] == row["case"] and r["mode"] == row["mode"] and r["arm"] == OURS), None)
        row["speedup_of_ours"] = ours and row["median_ms"] / ours["median_ms"]
    result = {
        "benchmark": name, "device": device_name(device), "device_type": device.type, "dtype": str(dtype),
        "torch": torch.__version__, "python": platform.python_version(), "repeats": repeats,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows,
    }
    print_table(result)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}_{device.type}_{str(dtype).replace('torch.', '')}{tag}")
    with open(stem + ".json.tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    plot(result, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['benchmark']} on {result['device']} ({result['dtype']}, torch {result['torch']}); "
          f"'vs ours' = arm time / {OURS} time (higher: {OURS} faster)")
    header = f"{'case':34s} {'mode':8s} {'arm':26s} {'median ms':>10s} {'vs ours':>8s} {'peak MiB':>9s}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        ratio = f"{r['speedup_of_ours']:.2f}x" if r["speedup_of_ours"] else "-"
        print(f"{r['case']:34s} {r['mode']:8s} {r['arm']:26s} {r['median_ms']:10.3f} {ratio:>8s} {mem:>9s}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["arm"] != OURS and r["speedup_of_ours"]]
    groups = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4.5))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        values = [next((r["speedup_of_ours"] for r in rows if (r["case"], r["mode"]) == g and r["arm"] == arm), 0)
                  for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=f"vs {arm}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(f"speedup of {OURS} (x)")
    ax.set_title(f"{result['benchmark']}: {result['device']}, {result['dtype']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def parse_args(description: str, argv=None, extra=()) -> argparse.Namespace:
    """The flags every benchmark script takes, plus `extra` (flag, help) switches."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), float16 / bfloat16 (GPU default: both)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--only", default=None, metavar="REGEX", help="run only the cases whose label matches")
    for flag, help_text in extra:  # script-specific switches
        parser.add_argument(flag, action="store_true", help=help_text)
    return parser.parse_args(argv)


def dtypes_for(args: argparse.Namespace) -> List[torch.dtype]:
    if args.dtype:
        return [getattr(torch, args.dtype)]
    return [torch.float16, torch.bfloat16] if args.device.startswith("cuda") else [torch.float32]
