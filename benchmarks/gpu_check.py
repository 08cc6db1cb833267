"""One run that makes a short GPU loan count: correctness, determinism, speed, planner, dispatch table.

    python benchmarks/gpu_check.py                # one CUDA GPU: stages 1-7, inside 9 minutes on an H100/H200
    python benchmarks/gpu_check.py --dry-run      # stages 1-3 on the CPU backends, small shapes (what CI runs)
    python benchmarks/gpu_check.py --dry-run --stages 6   # the CPU planner against peak RSS, tiny shapes

Stages (each in its own try/except: a failure is recorded in the JSON and the next stage runs):
  1 environment   versions, elr_ext.build_info(), the device's name, SMs, capability and measured copy
                  bandwidth (device-to-device, bytes read + written per second)
  2 correctness   every op x backend x dtype (fp32, fp16, bf16) at Stable Diffusion's shapes and at
                  odd ones: the outputs and every input's gradient against the fp64 reference by the
                  tolerance rule (elr_ext/testing.py), and which backend each call really dispatched to
  3 determinism   two identical forward+backward calls compared bitwise
  4 performance   fwd and fwd+bwd median times per backend with peak memory; FDN's effective GB/s
                  against the copy bandwidth; the Kronecker and low-rank ops against the dense layer
                  (cuBLAS F.linear / cuDNN F.conv2d of the same base); the top kernels of a profiler trace
  5 triton        registers and spills of every Triton kernel as compiled for this card
  6 planner       elr_ext.plan's peak memory of benchmarks/train_step.py's Stage II step (the tiny config
                  at batch 2, SD 2.1 at 512 px batch 1; the baseline and elr arms; bf16 autocast) for this
                  card (its name mapped to an elr_ext.plan.DEVICES entry, recorded with how it matched)
                  against torch.cuda.max_memory_allocated of the same step, and the relative error
                  (planned - measured) / measured, recorded as it comes out. Plans and measurements run in
                  fresh train_step.py processes, side by side (a process that planned can abort in
                  torch's teardown: docs/planning.md); a plan killed by a signal is run again. With
                  --dry-run: the CPU planner against peak RSS on tiny shapes.
  7 dispatch      the GPU_DISPATCH table (elr_ext/backends.py) these numbers imply, printed

Output: benchmarks/results/gpu_<card>.json, rewritten after every stage (and every few seconds inside
the long ones) so that a run cut off still leaves its results, and gpu_<card>.md, a summary. With
--dry-run: gpu_dryrun_cpu.{json,md} in --out (default: a fresh temporary folder, printed).

What it needs: elr_ext built (installed or in place) with the card's arch (sm_90 for an H100/H200:
ELR_EXT_CUDA_ARCHS=9.0) against the Python and torch that run it, and triton for the triton backend;
it compiles nothing but Triton's kernels; stage 6 needs diffusers (SD 2.1's UNet, random weights).
A backend that cannot run (a binary built for another torch or arch) is reported with its reason and
the others still run. --budget (default 520 s from the start) bounds the run: past it the remaining
cases of stages 2-4 are skipped and marked so. When stage 6 runs, its last --plan-reserve seconds
(100) are kept for it: stages 2-4 share the rest (stage 2 stops taking new cases at 45 % of it,
stage 3 at 55 %, so that timing keeps its share), and stage 6 skips, with the reason, each check
whose estimated time is more than what is left; a process still running at the end of the budget
is killed and recorded so.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # an in-place build, not installed
import fdn as fdn_bench  # noqa: E402
import harness  # noqa: E402
import kron_gemm  # noqa: E402
import lowrank_proj as lowrank_bench  # noqa: E402

import elr_ext  # noqa: E402
from elr_ext import backends, reference  # noqa: E402
from elr_ext.plan import PLAN_TRIES, crash_signal  # noqa: E402
from elr_ext.testing import compare_to_ref  # noqa: E402

F64 = torch.float64
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GPU_BACKENDS = ("cuda", "triton", "torch")
# the backends GPU_DISPATCH chooses between; torch (the reference) is timed for context only
DISPATCH_CANDIDATES = ("cuda", "triton")
# GPU_DISPATCH key -> the ops whose times decide it, and the ops whose correctness it needs (its choice
# also runs the conv adapter's backward)
DISPATCH_TIMED = {"fdn": ("fdn",), "kron_lora": ("kron_lora_linear",), "lowrank_proj": ("lowrank_proj",)}
DISPATCH_CORRECT = {"fdn": ("fdn",), "kron_lora": ("kron_lora_linear", "kron_lora_conv2d"),
                    "lowrank_proj": ("lowrank_proj",)}
STAGE_SHARE = {"correctness": 0.45, "determinism": 0.55}  # fraction of --budget each may run up to
PROFILE_ITERATIONS = 3
TOP_KERNELS = 8


# --------------------------------------------------------------------------------------- cases
@dataclasses.dataclass
class OpCase:
    """One op at one shape. `make` draws the fp64 inputs {name: tensor} on a device; `ours` calls the
    elr_ext op, `ref` the reference (fp64 ground truth, and in the test dtype the same-dtype arm unless
    `same` is given), each returning a tuple of outputs named `outs`. `grads`: the inputs whose
    gradients stage 2 checks; `time_grads`: those stage 4 takes (the frozen base excluded). `dense`:
    inputs -> (fn, leaves) of the dense layer the op is measured against. `bytes_moved`: inputs ->
    {mode: bytes} for an effective-bandwidth figure."""

    op: str
    label: str
    params: dict
    make: Callable[[torch.device], Dict[str, torch.Tensor]]
    ours: Callable[[dict], tuple]
    ref: Callable[[dict], tuple]
    outs: List[str]
    grads: List[str]
    same: Optional[Callable[[dict], tuple]] = None
    time_grads: Optional[List[str]] = None
    dense: Optional[Callable[[dict], tuple]] = None
    bytes_moved: Optional[Callable[[dict], dict]] = None
    sd: bool = False
    timed: bool = True


def _randn(shape, device, scale=1.0, offset=0.0):
    return torch.randn(shape, dtype=F64, device=device) * scale + offset


def fdn_case(shape, groups, activation, broadcast, sd) -> OpCase:
    n, c, h, w = shape
    aff = (n, c, 1, 1) if broadcast else tuple(shape)

    def make(device):  # an offset mean exercises the two-pass statistics
        return {"z": _randn(shape, device, 3.0, 1.5), "gamma": _randn(aff, device, 0.5),
                "beta": _randn(aff, device, 0.5)}

    def call(fn):
        return lambda t: (fn(t["z"], t["gamma"], t["beta"], num_groups=groups, activation=activation),)

    def bytes_moved(t):
        size = t["z"].element_size()
        z, g = t["z"].numel(), t["gamma"].numel()
        fwd = 2 * z + 2 * g  # read z, gamma, beta; write out
        # backward: read dout, z, gamma (and beta for SiLU); write dz, dgamma, dbeta (a full-size dbeta
        # without activation is dout itself, handed on)
        dbeta_written = activation is not None or broadcast
        bwd = 2 * z + g + (g if activation else 0) + g + (g if dbeta_written else 0)
        return {"fwd": fwd * size, "fwd+bwd": (fwd + bwd) * size}

    label = f"{list(shape)} G={groups} {activation or 'none'} {'[N,C,1,1]' if broadcast else 'full'}"
    return OpCase("fdn", label, {"shape": list(shape), "groups": groups, "activation": activation,
                                 "affine": "broadcast" if broadcast else "full"},
                  make, call(elr_ext.fdn), call(reference.fdn), ["out"], ["z", "gamma", "beta"],
                  same=call(reference.fdn_eager), bytes_moved=bytes_moved, sd=sd)


def _kron_factors(device, T, a1, a2, b1, b2, r):
    return {"A": _randn((T, a1, a2), device, a2 ** -0.5), "U": _randn((T, b1, r), device, r ** -0.5),
            "V": _randn((T, r, b2), device, b2 ** -0.5)}


def kron_linear_case(T, a1, a2, b1, b2, r, tokens, base, sd, label=None) -> OpCase:
    d_in, d_out = a2 * b2, a1 * b1
    scale = 0.75

    def make(device):
        t = {"x": _randn((tokens, d_in), device), **_kron_factors(device, T, a1, a2, b1, b2, r)}
        if base:
            t["weight"] = _randn((d_out, d_in), device, d_in ** -0.5)
            t["bias"] = _randn((d_out,), device)
        return t

    def call(fn):
        return lambda t: (fn(t["x"], t["A"], t["U"], t["V"], t.get("weight"), t.get("bias"), scale),)

    def dense(t):  # the frozen base layer alone: what the adapter adds to
        return (lambda: (F.linear(t["x"], t["weight"], t["bias"]),)), [t["x"]]

    grads = ["x", "A", "U", "V"] + (["weight", "bias"] if base else [])
    label = label or f"{d_in}->{d_out} M={tokens} T={T} A[{a1},{a2}] r={r}{' +base' if base else ''}"
    return OpCase("kron_lora_linear", label, {"d_in": d_in, "d_out": d_out, "tokens": tokens, "T": T, "a1": a1,
                                              "a2": a2, "b1": b1, "b2": b2, "rank": r, "base": base},
                  make, call(elr_ext.kron_lora_linear), call(reference.kron_lora_linear), ["y"], grads,
                  time_grads=["x", "A", "U", "V"], dense=dense if base else None, sd=sd)


def kron_delta_case(T, a1, a2, b1, b2, r, sd) -> OpCase:
    def call(fn):
        return lambda t: (fn(t["A"], t["U"], t["V"]),)

    label = f"dW [{a1 * b1}, {a2 * b2}] T={T} A[{a1},{a2}] r={r}"
    return OpCase("kron_delta", label, {"T": T, "a1": a1, "a2": a2, "b1": b1, "b2": b2, "rank": r},
                  lambda device: _kron_factors(device, T, a1, a2, b1, b2, r), call(elr_ext.kron_delta),
                  call(reference.kron_delta), ["dW"], ["A", "U", "V"], sd=sd, timed=False)


def kron_conv_case(channels, side, batch, T, r, sd) -> OpCase:
    """A 3x3 conv (padding 1) with eq. 9's factors on its weight viewed [out, in*9], the base frozen
    (which is what selects the rank-space backward on wide layers)."""
    a = T
    d_in = channels * 9
    scale = 0.75

    def make(device):
        return {"x": _randn((batch, channels, side, side), device),
                **_kron_factors(device, T, a, a, channels // a, d_in // a, r),
                "weight": _randn((channels, channels, 3, 3), device, d_in ** -0.5),
                "bias": _randn((channels,), device)}

    def ours(t):
        return (elr_ext.kron_lora_conv2d(t["x"], t["A"], t["U"], t["V"], t["weight"], t["bias"], scale, padding=1),)

    def ref(t):
        weight = t["weight"] + scale * reference.kron_delta(t["A"], t["U"], t["V"]).view_as(t["weight"])
        return (F.conv2d(t["x"], weight, t["bias"], padding=1),)

    def dense(t):
        return (lambda: (F.conv2d(t["x"], t["weight"], t["bias"], padding=1),)), [t["x"]]

    label = f"conv3x3 {channels}ch {side}x{side} b{batch} T={T} r={r}"
    return OpCase("kron_lora_conv2d", label, {"channels": channels, "side": side, "batch": batch, "T": T, "rank": r},
                  make, ours, ref, ["y"], ["x", "A", "U", "V", "bias"], time_grads=["x", "A", "U", "V"], dense=dense,
                  sd=sd)


def lowrank_case(kind, d_in, outs, ranks, tokens, with_bias, sd) -> OpCase:
    K = len(outs)

    def make(device):
        t = {"x": _randn((tokens, d_in), device)}
        t.update({f"down{j}": _randn((r, d_in), device, d_in ** -0.5) for j, r in enumerate(ranks)})
        t.update({f"up{j}": _randn((o, r), device, r ** -0.5) for j, (o, r) in enumerate(zip(outs, ranks))})
        t.update({f"bias{j}": _randn((o,), device) for j, (o, b) in enumerate(zip(outs, with_bias)) if b})
        return t

    def call(fn):
        return lambda t: tuple(fn(t["x"], [t[f"down{j}"] for j in range(K)], [t[f"up{j}"] for j in range(K)],
                                  [t.get(f"bias{j}") for j in range(K)]))

    def dense(t):  # the teacher's K dense layers W_j = A_j B_j, trained: the cost the student replaces
        weights = [(t[f"up{j}"] @ t[f"down{j}"]).detach().requires_grad_() for j in range(K)]
        def run():
            return tuple(F.linear(t["x"], W, t.get(f"bias{j}")) for j, W in enumerate(weights))
        return run, [t["x"], *weights]

    names = ["x"] + [f"down{j}" for j in range(K)] + [f"up{j}" for j in range(K)] \
        + [f"bias{j}" for j in range(K) if with_bias[j]]
    label = f"{kind} K={K} {d_in}->{'/'.join(map(str, sorted(set(outs))))} M={tokens} r={'/'.join(map(str, ranks))}" \
        + (" +bias" if any(with_bias) else "")
    return OpCase("lowrank_proj", label, {"kind": kind, "K": K, "d_in": d_in, "outs": list(outs),
                                          "ranks": list(ranks), "tokens": tokens, "biases": list(with_bias)},
                  make, call(elr_ext.lowrank_proj), call(reference.lowrank_proj), [f"y{j}" for j in range(K)], names,
                  dense=dense, sd=sd)


def sd_cases() -> List[OpCase]:
    """Stable Diffusion's shapes at 512 px, from the per-op benchmarks' case lists."""
    cases = [fdn_case(s, fdn_bench.GROUPS, act, broadcast, True)
             for s in fdn_bench.SD_SHAPES for act in (None, "silu") for broadcast in (False, True)]
    for (d_in, d_out), tokens, n, r in kron_gemm.SUBSET:
        if (n, r) == (4, 8):  # eq. 9's factors: A [n, n, n], U [n, d_out/n, r], V [n, r, d_in/n], n = T
            cases.append(kron_linear_case(n, n, n, d_out // n, d_in // n, r, tokens, True, True))
    # the balanced split of 320 = 16 x 20 (peft's and LyCORIS's factorisation) at SD's widest level
    cases.append(kron_linear_case(4, 16, 16, 20, 20, 8, 2 * 4096, True, True))
    for channels, side, batch in kron_gemm.CONV:
        if channels * side == 320 * 64:  # the 512 px levels (latent 64 at 320 channels)
            cases.append(kron_conv_case(channels, side, batch, 4, 8, True))
            cases.append(kron_delta_case(4, 4, 4, channels // 4, channels * 9 // 4, 8, True))
    for kind, d, d_in, tokens, divisor in lowrank_bench.grid():
        if divisor == 4:  # rank d/4
            K = 3 if kind == "self" else 2
            cases.append(lowrank_case(kind, d_in, [d] * K, [d // divisor] * K, tokens, [False] * K, True))
    return cases


def odd_cases() -> List[OpCase]:
    """Small shapes where indexing bugs live: one token, prime token counts, channels and widths that
    are not multiples of 8, a group of one channel, 1x1 spatial, factors beyond Triton's fused path."""
    return [
        fdn_case((1, 12, 7, 5), 4, None, False, False),
        fdn_case((2, 36, 1, 1), 6, "silu", True, False),
        fdn_case((3, 96, 13, 11), 32, "silu", False, False),
        fdn_case((1, 20, 25, 40), 20, None, True, False),  # one channel per group, 1000 pixels
        kron_linear_case(4, 4, 4, 5, 7, 8, 7, True, False),
        kron_linear_case(2, 3, 5, 7, 9, 3, 1000, True, False),
        kron_linear_case(4, 4, 4, 80, 80, 8, 1, True, False),
        kron_linear_case(3, 2, 2, 9, 9, 5, 7, False, False),
        kron_linear_case(8, 2, 2, 10, 10, 20, 33, True, False),  # T*r = 160: beyond Triton's fused path
        kron_delta_case(2, 3, 5, 7, 9, 3, False),
        kron_conv_case(12, 7, 1, 4, 4, False),  # narrow: the weight-gradient backward
        kron_conv_case(100, 5, 3, 4, 1, False),  # wide enough for the rank-space backward
        lowrank_case("self", 36, [36] * 3, [9] * 3, 7, [True] * 3, False),
        lowrank_case("cross-kv", 44, [20] * 2, [5] * 2, 1, [True, False], False),
        lowrank_case("mixed", 44, [20, 36, 12], [5, 1, 6], 1000, [True, False, True], False),
    ]


def round_robin(cases: List[OpCase]) -> List[OpCase]:
    """Interleave the ops, so that a run cut short by the budget has covered every op."""
    by_op: dict = {}
    for case in cases:
        by_op.setdefault(case.op, []).append(case)
    queues = list(by_op.values())
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


# ---------------------------------------------------------------------------------- running a case
@contextlib.contextmanager
def recorded_dispatch():
    """Every backend elr_ext.backends.select hands out inside the block: a requested backend that
    cannot run an op falls back to another, and a check must know which one it judged."""
    seen: list = []
    original = backends.select

    def select(*args, **kwargs):
        choice = original(*args, **kwargs)
        seen.append(choice)
        return choice

    backends.select = select
    try:
        yield seen
    finally:
        backends.select = original


def _leaves(inputs64: dict, dtype, grad_names) -> dict:
    return {name: t.detach().to(dtype).requires_grad_(name in grad_names) for name, t in inputs64.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(case: OpCase, backend: Optional[str], t: dict, grad_outs=None, grad_names=None):
    """(outputs, gradients of `grad_names`) of one call on `backend` (None: the reference), backward
    included in the forced backend; grad_outs None: drawn here, rounded to the outputs' dtype."""
    grad_names = case.grads if grad_names is None else grad_names
    with elr_ext.use_backend(backend) if backend else contextlib.nullcontext():
        outs = (case.ours if backend else case.ref)(t)
        if grad_outs is None:
            grad_outs = [torch.randn(o.shape, dtype=F64, device=o.device).to(o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, [t[n] for n in grad_names], grad_outs)
    return [o.detach() for o in outs], list(grads), grad_outs


def check_case(case: OpCase, backend: str, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Outputs and every gradient of `case` on `backend` in `dtype` against the fp64 reference."""
    entry = {"op": case.op, "case": case.label, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
    start = time.perf_counter()
    try:
        torch.manual_seed(seed)
        inputs64 = case.make(device)
        ours_in = _leaves(inputs64, dtype, case.grads)
        with warnings.catch_warnings(record=True) as caught, recorded_dispatch() as seen:
            warnings.simplefilter("always")
            outs, grads, grad_outs = forward_backward(case, backend, ours_in)
            _sync(device)
        ref_in = _leaves({n: t.detach() for n, t in ours_in.items()}, F64, case.grads)  # the same rounded values
        ref_outs, ref_grads, _ = forward_backward(case, None, ref_in, [g.double() for g in grad_outs])
        same_in = _leaves(ours_in, dtype, case.grads)
        same_case = dataclasses.replace(case, ref=case.same or case.ref)
        same_outs, same_grads, _ = forward_backward(same_case, None, same_in, grad_outs)
        _sync(device)
        names = case.outs + [f"d{n}" for n in case.grads]
        checks = {}
        for name, got, want, same in zip(names, outs + grads, ref_outs + ref_grads, same_outs + same_grads,
                                         strict=True):
            checks[name] = compare_to_ref(got, want, same, name)
        failed = [c["message"] for c in checks.values() if not c["ok"]]
        dispatched = sorted(set(seen))
        if failed:
            status = "failed"
        elif seen and backend not in dispatched:
            status = "fallback"  # numerically fine, but the requested backend never ran this op
        else:
            status = "passed"
        entry.update(status=status, passed=status == "passed", dispatched=dispatched, failed=failed,
                     checks={n: {k: c[k] for k in ("ok", "err", "bound", "eager_err")} for n, c in checks.items()},
                     warnings=sorted({str(w.message) for w in caught})[:5])
    except Exception as exc:  # recorded; the next case runs
        entry.update(status="error", passed=False, error=f"{type(exc).__name__}: {exc}",
                     traceback=traceback.format_exc()[-2000:])
    entry["seconds"] = round(time.perf_counter() - start, 4)
    return entry


def determinism_case(case: OpCase, backend: str, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Two identical forward+backward calls on the same inputs, compared bitwise."""
    entry = {"op": case.op, "case": case.label, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
    try:
        torch.manual_seed(seed)
        t = _leaves(case.make(device), dtype, case.grads)
        with warnings.catch_warnings(), recorded_dispatch() as seen:
            warnings.simplefilter("ignore")
            first = forward_backward(case, backend, t)
            second = forward_backward(case, backend, t, first[2])
            _sync(device)
        names = case.outs + [f"d{n}" for n in case.grads]
        differs = [n for n, a, b in zip(names, first[0] + first[1], second[0] + second[1], strict=True)
                   if not torch.equal(a, b)]
        entry.update(bitwise=not differs, differs=differs, dispatched=sorted(set(seen)))
    except Exception as exc:
        entry.update(bitwise=None, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:])
    return entry


# ------------------------------------------------------------------------------------- the report
class Budget:
    """Seconds since the start against --budget; a stage may stop taking new work at its share.
    `reserve`: the last seconds of the budget, kept for stage 6 (the planner check): the shares of
    stages 2-4 are of `seconds - reserve`, and stage 6 may run to the end (`remaining()`)."""

    def __init__(self, seconds: float, reserve: float = 0.0):
        self.seconds, self.reserve, self.start = seconds, reserve, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def spent(self, share: float = 1.0) -> bool:
        return self.elapsed() >= share * (self.seconds - self.reserve)

    def reason(self, share: float = 1.0) -> str:
        kept = f", the last {self.reserve:.0f} s kept for stage 6" if self.reserve else ""
        return (f"skipped: time budget ({share * (self.seconds - self.reserve):.0f} s of --budget "
                f"{self.seconds:.0f} s{kept}) spent")


class Report:
    """The JSON (and Markdown summary) of one run, rewritten whole after every stage."""

    def __init__(self, json_path: str, data: dict):
        self.json_path, self.md_path, self.data = json_path, json_path[:-len(".json")] + ".md", data
        self._last_save = 0.0

    def save(self) -> None:
        harness.write_atomic(self.json_path, json.dumps(self.data, indent=1, default=str))
        try:
            harness.write_atomic(self.md_path, markdown(self.data))
        except Exception as exc:  # the summary is a convenience; the JSON is the record
            self.data.setdefault("markdown_error", f"{type(exc).__name__}: {exc}")
        self._last_save = time.monotonic()

    def checkpoint(self, every_s: float = 10.0) -> None:
        if time.monotonic() - self._last_save >= every_s:
            self.save()


def run_stage(report: Report, number: int, name: str, fn: Callable[[dict], None]) -> dict:
    """Run one stage: fn(result) fills `result` as it goes (saved by report.checkpoint()); an exception
    is recorded and the run goes on."""
    stage = {"stage": number, "status": "running", "result": {}}
    report.data.setdefault("stages", {})[name] = stage
    start = time.perf_counter()
    print(f"== stage {number}: {name}", flush=True)
    try:
        fn(stage["result"])
        stage["status"] = "ok"
    except Exception as exc:
        stage.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
        print(f"   stage {number} ({name}) failed: {stage['error']}", flush=True)
    stage["seconds"] = round(time.perf_counter() - start, 3)
    report.save()
    return stage


# ------------------------------------------------------------------------------------------ stages
def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def stage_environment(result: dict, device: torch.device, copy_bytes: int) -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"unavailable: {exc}"
    result.update({
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "triton": triton_version,
        "cpu_threads": torch.get_num_threads(), "build_info": elr_ext.build_info(),
        "available_backends": elr_ext.available_backends(device.type),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("ELR_EXT_", "TRITON_", "CUDA_VISIBLE"))},
    })
    dev = {"type": device.type, "name": harness.device_name(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev.update(capability=list(torch.cuda.get_device_capability(device)), sms=props.multi_processor_count,
                   total_memory_bytes=props.total_memory, l2_cache_bytes=getattr(props, "L2_cache_size", None),
                   driver_cuda=torch.version.cuda)
    result["device"] = dev
    dev["copy_bytes"] = copy_bytes
    dev["copy_bandwidth_gbps"] = fdn_bench.copy_bandwidth_gbps(device, copy_bytes)
    print(f"   {dev['name']}: backends {result['available_backends']}, copy {dev['copy_bandwidth_gbps']:.0f} GB/s",
          flush=True)


def stage_correctness(result, report, cases, backends_, dtypes, device, seed, budget) -> None:
    entries = result.setdefault("entries", [])
    skipped = result.setdefault("skipped", [])
    for i, case in enumerate(cases):
        if budget.spent(STAGE_SHARE["correctness"]):
            skipped.append({"op": case.op, "case": case.label, "reason": budget.reason(STAGE_SHARE["correctness"])})
            continue
        for dtype in dtypes:
            for backend in backends_:
                entry = check_case(case, backend, dtype, device, seed + i)
                entries.append(entry)
                if not entry["passed"]:
                    print(f"   {entry['status']}: {case.op} {case.label} {backend} {entry['dtype']}: "
                          f"{entry.get('error') or entry.get('failed') or entry.get('dispatched')}", flush=True)
        report.checkpoint()
    result["summary"] = summarize(entries, lambda e: e["status"])
    print(f"   {sum(e['passed'] for e in entries)}/{len(entries)} passed; {len(skipped)} cases skipped", flush=True)


def stage_determinism(result, report, cases, backends_, dtypes, device, seed, budget) -> None:
    entries = result.setdefault("entries", [])
    skipped = result.setdefault("skipped", [])
    for i, case in enumerate(cases):
        if budget.spent(STAGE_SHARE["determinism"]):
            skipped.append({"op": case.op, "case": case.label, "reason": budget.reason(STAGE_SHARE["determinism"])})
            continue
        for dtype in dtypes:
            for backend in backends_:
                entries.append(determinism_case(case, backend, dtype, device, seed + i))
        report.checkpoint()
    result["summary"] = summarize(entries, lambda e: {True: "bitwise", False: "differs"}.get(e["bitwise"], "error"))
    nondet = [f"{e['op']} {e['backend']} {e['dtype']} {e['case']}: {e.get('differs') or e.get('error')}"
              for e in entries if e.get("bitwise") is not True]
    print(f"   {len(entries) - len(nondet)}/{len(entries)} bitwise identical"
          + "".join(f"\n   {n}" for n in nondet[:10]), flush=True)


def summarize(entries, category) -> dict:
    """{op: {backend: {dtype: {"total": n, <category>: n, ...}}}}"""
    out: dict = {}
    for e in entries:
        cell = out.setdefault(e["op"], {}).setdefault(e["backend"], {}).setdefault(e["dtype"], {"total": 0})
        cell["total"] += 1
        cell[category(e)] = cell.get(category(e), 0) + 1
    return out


def _timing_inputs(case: OpCase, dtype, device, seed):
    torch.manual_seed(seed)
    grad_names = case.grads if case.time_grads is None else case.time_grads
    t = _leaves(case.make(device), dtype, grad_names)
    with torch.no_grad():
        outs = case.ref(t)  # for the outputs' shapes
    grad_outs = [torch.randn_like(o) for o in outs]
    return t, grad_names, grad_outs


def _arm(fn_outs: Callable[[], tuple], leaves, grad_outs, mode, backend=None):
    def call():
        with elr_ext.use_backend(backend) if backend else contextlib.nullcontext():
            if mode == "fwd":
                with torch.no_grad():
                    fn_outs()
            else:
                torch.autograd.grad(fn_outs(), leaves, grad_outs)
    return call


def time_case(case, dtype, mode, backends_, device, seed, repeats, min_sample_s) -> List[dict]:
    """One row per arm: each backend forced (backward included), plus the dense layer and, for FDN,
    eager PyTorch; the arms timed interleaved by the harness."""
    t, grad_names, grad_outs = _timing_inputs(case, dtype, device, seed)
    leaves = [t[n] for n in grad_names]
    arms = {b: _arm(lambda: case.ours(t), leaves, grad_outs, mode, b) for b in backends_}
    if case.dense is not None:
        dense_fn, dense_leaves = case.dense(t)
        arms["dense"] = _arm(dense_fn, dense_leaves, grad_outs, mode)
    if case.same is not None:
        arms["eager"] = _arm(lambda: case.same(t), leaves, grad_outs, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback is recorded by stage 2, not repeated per call here
        times = harness.time_arms(arms, device, repeats, min_sample_s)
        peaks = {a: harness.peak_memory_bytes(fn, device) if device.type == "cuda" else None
                 for a, fn in arms.items()}
    moved = case.bytes_moved(t)[mode] if case.bytes_moved else None
    rows = []
    for arm, seconds in times.items():
        row = {"op": case.op, "case": case.label, "params": case.params, "dtype": str(dtype).replace("torch.", ""),
               "mode": mode, "arm": arm, "median_ms": seconds * 1e3, "peak_mem_bytes": peaks[arm]}
        if "dense" in times:
            row["vs_dense"] = seconds / times["dense"]  # > 1: slower than the dense layer
        if moved is not None:
            row["gbps"] = moved / seconds / 1e9
        rows.append(row)
    return rows


def top_kernels(prof, device_type: str, iterations: int, n: int = TOP_KERNELS) -> List[dict]:
    """The n kernels (CPU: ops, by self time) that took the most time, per iteration."""
    totals: dict = {}
    if device_type == "cuda":
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                cell = totals.setdefault(e.name, [0.0, 0])
                cell[0] += e.time_range.elapsed_us()
                cell[1] += 1
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                totals[e.key] = [e.self_cpu_time_total, e.count]
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"name": name[:160], "us_per_iter": us / iterations, "calls_per_iter": calls / iterations}
            for name, (us, calls) in ranked]


def profile_case(case, dtype, backend, device, seed) -> dict:
    from torch.profiler import ProfilerActivity, profile

    t, grad_names, grad_outs = _timing_inputs(case, dtype, device, seed)
    call = _arm(lambda: case.ours(t), [t[n] for n in grad_names], grad_outs, "fwd+bwd", backend)
    call()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=activities) as prof:
            for _ in range(PROFILE_ITERATIONS):
                call()
            _sync(device)
    return {"op": case.op, "case": case.label, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
            "iterations": PROFILE_ITERATIONS, "top": top_kernels(prof, device.type, PROFILE_ITERATIONS)}


def stage_performance(result, report, cases, backends_, dtypes, device, seed, budget, repeats, min_sample_s,
                      copy_gbps) -> None:
    result.update(repeats=repeats, min_sample_s=min_sample_s, copy_bandwidth_gbps=copy_gbps)
    profiles = result.setdefault("profiles", [])
    rows = result.setdefault("rows", [])
    skipped = result.setdefault("skipped", [])
    errors = result.setdefault("errors", [])
    cases = [c for c in cases if c.timed]
    # the profiler first, one case per op: a few iterations each, and a budget cut must not lose them all
    firsts = list({c.op: c for c in reversed(cases)}.values())
    for case in firsts:
        for backend in backends_:
            if budget.spent():
                skipped.append({"profile": True, "op": case.op, "case": case.label, "backend": backend,
                                "reason": budget.reason()})
                continue
            try:
                profiles.append(profile_case(case, dtypes[0], backend, device, seed))
            except Exception as exc:
                profiles.append({"op": case.op, "case": case.label, "backend": backend,
                                 "error": f"{type(exc).__name__}: {exc}"})
    report.checkpoint(0)
    # half precision first: that is where the dispatch table has the most to decide
    for dtype in dtypes:
        for i, case in enumerate(cases):
            for mode in ("fwd+bwd", "fwd"):
                where = {"op": case.op, "case": case.label, "dtype": str(dtype).replace("torch.", ""), "mode": mode}
                if budget.spent():
                    skipped.append({**where, "reason": budget.reason()})
                    continue
                try:
                    new = time_case(case, dtype, mode, backends_, device, seed + i, repeats, min_sample_s)
                except Exception as exc:  # recorded; the next case runs
                    errors.append({**where, "error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc()[-2000:]})
                    print(f"   error: {case.op} {case.label} {where['dtype']} {mode}: {errors[-1]['error']}", flush=True)
                    continue
                for row in new:
                    if "gbps" in row and copy_gbps:
                        row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
                rows.extend(new)
                print("   " + f"{case.op} {case.label} {where['dtype']} {mode}: "
                      + "  ".join(f"{r['arm']}={r['median_ms']:.3f}ms" for r in new), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                report.checkpoint()
    print(f"   {len(rows)} timing rows; {len(skipped)} skipped; {len(errors)} errors", flush=True)


def _jit_function(obj):
    """The JITFunction under a triton Autotuner / Heuristics wrapper, or None."""
    from triton.runtime.jit import JITFunction

    for _ in range(4):
        if isinstance(obj, JITFunction):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def _compiled_kernels(jit) -> tuple:
    """(compiled kernels, where they were found): JITFunction.device_caches (Triton >= 3.2:
    device -> (kernel_cache, ...)) or .cache (older: device -> {key: kernel})."""
    caches = getattr(jit, "device_caches", None)
    if caches is not None:
        return [k for entry in caches.values() for k in entry[0].values()], "device_caches"
    cache = getattr(jit, "cache", None)
    if isinstance(cache, dict):
        return [k for per_device in cache.values() for k in per_device.values()], "cache"
    return None, "neither JITFunction.device_caches nor JITFunction.cache exists in this Triton"


def _constexprs(kernel) -> dict:
    src = getattr(kernel, "src", None)
    constants = getattr(src, "constexprs", None) or getattr(src, "constants", None) or {}
    names = getattr(getattr(src, "fn", None), "arg_names", None)
    out = {}
    for key, value in constants.items():
        if isinstance(key, tuple) and len(key) == 1 and names:
            key = names[key[0]]
        if isinstance(value, (int, float, bool, str)) or value is None:
            out[str(key)] = value
    return out


def triton_kernel_report(modules) -> dict:
    """Registers and spills of every compiled kernel of the Triton modules (after they ran), the
    autotuner's picks alongside."""
    kernels, seen = [], set()
    for module in modules:
        for attr, obj in vars(module).items():
            jit = _jit_function(obj)
            if jit is None or id(jit) in seen:  # a helper jit function imported by several modules: once
                continue
            seen.add(id(jit))
            entry = {"kernel": f"{getattr(jit, 'module', module.__name__)}.{getattr(jit, '__name__', attr)}"}
            compiled, where = _compiled_kernels(jit)
            if compiled is None:
                entry["unavailable"] = where
                kernels.append(entry)
                continue
            if not compiled and obj is jit:  # a jit helper inlined into the kernels: nothing of its own
                continue
            entry["found_in"] = where
            entry["compiled"] = []
            for k in compiled:
                if getattr(k, "n_regs", None) is None and hasattr(k, "_init_handles"):
                    try:
                        k._init_handles()
                    except Exception as exc:
                        entry.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
                meta = getattr(k, "metadata", None)
                entry["compiled"].append({
                    "n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
                    "num_warps": getattr(meta, "num_warps", None), "num_stages": getattr(meta, "num_stages", None),
                    "shared_bytes": getattr(meta, "shared", None), "constexprs": _constexprs(k)})
            tuned = getattr(obj, "cache", None) if obj is not jit else None
            if isinstance(tuned, dict):
                entry["autotuned"] = {str(key): str(config) for key, config in tuned.items()}
            regs = [c["n_regs"] for c in entry["compiled"] if c["n_regs"] is not None]
            spills = [c["n_spills"] for c in entry["compiled"] if c["n_spills"] is not None]
            entry.update(max_regs=max(regs, default=None), max_spills=max(spills, default=None))
            kernels.append(entry)
    return {"kernels": kernels,
            "any_spills": any((k.get("max_spills") or 0) > 0 for k in kernels),
            "compiled_count": sum(len(k.get("compiled", [])) for k in kernels)}


def stage_triton(result: dict, device: torch.device) -> None:
    if device.type != "cuda":
        result["unavailable"] = "the Triton kernels are compiled for a GPU only on a CUDA device"
        return
    reason = backends.unavailable_reason("triton", "cuda", device)
    if reason:
        result["unavailable"] = reason
        return
    names = ("elr_ext.triton.fdn", "elr_ext.triton.kron_lora", "elr_ext.triton.lowrank_proj")
    modules = [sys.modules[m] for m in names if m in sys.modules]
    if not modules:
        result["unavailable"] = "no Triton kernel ran in this process (stages 2-4 ran none on the triton backend)"
        return
    result.update(triton_kernel_report(modules))
    for k in result["kernels"]:
        print(f"   {k['kernel']}: {len(k.get('compiled', []))} compiled, max regs {k.get('max_regs')}, "
              f"max spills {k.get('max_spills')}{' ' + k['unavailable'] if 'unavailable' in k else ''}", flush=True)


# ------------------------------------------------------------- stage 6: the planner on this card
TRAIN_STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")
PLAN_AUTOCAST = "bfloat16"  # the GPU checks' mixed precision; on the CPU both sides run fp32 (train_step.py)


@dataclasses.dataclass(frozen=True)
class PlanCheck:
    """One configuration and arm of benchmarks/train_step.py, planned (`--job plan --simulate`) and
    measured (`--job memory`), each in its own fresh process. estimate_s: the wall seconds the two
    processes take side by side on the machine the list is meant for (a plan is 10-60 s of one core;
    the measured process builds the backbone on the CPU, and a decomposed arm runs decompose's SVDs
    there before the card sees a step)."""

    config: str
    batch: int
    latent: int
    arm: str
    estimate_s: float

    def where(self) -> dict:
        return {"config": self.config, "batch": self.batch, "latent": self.latent, "arm": self.arm}


# On a GPU: the tiny config and SD 2.1 at 512 px (latents 64), all run at once: the plans on CPU
# cores, each measured process on the card with its own caching allocator (so its
# max_memory_allocated is its own); together about 90 s, what --plan-reserve keeps.
GPU_PLAN_CHECKS = (
    PlanCheck("tiny", 2, 32, "baseline", 30), PlanCheck("tiny", 2, 32, "elr", 45),
    PlanCheck("sd21", 1, 64, "baseline", 60), PlanCheck("sd21", 1, 64, "elr", 90),
)
# --dry-run --stages ...,6: the CPU planner against peak RSS, one arm (its two processes take about 20 s
# side by side on two shared cores; latents 16 would take as long, with a peak too small to read off RSS)
CPU_PLAN_CHECKS = (PlanCheck("tiny", 1, 32, "baseline", 30),)


def _card_pattern(family: str):
    """"rtx4090" finds "GeForce RTX 4090", "a100" finds "A100-SXM4-80GB"; "l4" does not find "L40S"."""
    body = re.sub(r"([a-z])(\d)", r"\1[ -]?\2", family)
    return re.compile(rf"(?<![a-z0-9]){body}(?![a-z0-9])")


def plan_card(name: str, capability=None, total_memory_bytes: Optional[int] = None) -> dict:
    """The elr_ext.plan.DEVICES card to plan for the CUDA device called `name`
    (torch.cuda.get_device_name): the card family the name gives (H100, H200, A100, ...), and within
    it the entry nearest the memory the name states ("80GB") or the device has. A name no entry
    matches is recorded with match "unknown": planned as the entry nearest its compute capability
    (which decides flash against memory-efficient attention) and memory, or, without a capability,
    not planned (plan_device None, and why)."""
    from elr_ext.plan import DEVICES

    low = name.lower()
    stated = re.search(r"(\d+)\s*gb\b", low)
    memory = float(stated.group(1)) if stated else (total_memory_bytes / 2 ** 30 if total_memory_bytes else None)
    out = {"name": name, "capability": list(capability) if capability else None,
           "memory_gib": None if memory is None else round(memory, 1)}
    families: Dict[str, list] = {}
    for spec in DEVICES.values():
        families.setdefault(spec.name.split("-")[0], []).append(spec)
    for family, specs in families.items():
        if not _card_pattern(family).search(low):
            continue
        spec = specs[0] if memory is None else min(specs, key=lambda s: abs(s.memory_gib - memory))
        out.update(match="name", plan_device=spec.name, planned_as=spec.description)
        if memory is None and len(specs) > 1:
            out["note"] = (f"the card's memory is not known: planned as {spec.name} (the planned peak does not "
                           "depend on the card's memory, only whether it fits)")
        elif memory is not None and abs(spec.memory_gib - memory) > 0.1 * spec.memory_gib:
            out["note"] = (f"this card has {memory:.0f} GiB, {spec.name} {spec.memory_gib:g}: the planned peak does "
                           "not depend on the card's memory, only whether it fits")
        return out
    out["match"] = "unknown"
    if capability is None:
        out.update(plan_device=None, reason=f"no elr_ext.plan.DEVICES card matches {name!r}, and without its "
                                            "compute capability there is no nearest one to plan for")
        return out
    level = capability[0] * 10 + capability[1]

    def distance(spec):
        major, minor = spec.compute_capability
        return abs(major * 10 + minor - level), abs(spec.memory_gib - memory) if memory is not None else 0.0

    spec = min(DEVICES.values(), key=distance)
    out.update(plan_device=spec.name, planned_as=spec.description,
               reason=f"no elr_ext.plan.DEVICES card matches {name!r}: planned as the nearest by compute "
                      f"capability and memory, {spec.name} (sm_{spec.compute_capability[0]}"
                      f"{spec.compute_capability[1]}, {spec.memory_gib:g} GiB)")
    return out


@dataclasses.dataclass
class ChildJob:
    """One fresh `python <args>` process of stage 6: `entry` indexes the stage's entries, `side` is
    "plan" or "measured"; `tries`: runs in all while torch kills the process (SIGABRT / SIGSEGV:
    elr_ext.plan.crash_signal)."""

    entry: int
    side: str
    args: List[str]
    env: Dict[str, str]
    tries: int = 1


def run_child_jobs(jobs: List[ChildJob], deadline: float) -> List[dict]:
    """Run every job at once, each in a fresh process, until time.monotonic() reaches `deadline`
    (a process still running then is killed). One outcome per job: {"result": the JSON object of its
    last stdout line or None, "error", "tries", "seconds", "returncode"}."""
    def one(job: ChildJob) -> dict:
        outcome: dict = {"result": None, "tries": 0}
        start = time.monotonic()
        while outcome["tries"] < job.tries:
            left = deadline - time.monotonic()
            if left < 1:
                outcome["error"] = outcome.get("error", "") + " (no time left in the budget for another try)" \
                    if outcome["tries"] else "skipped: no time left in the budget"
                break
            outcome["tries"] += 1
            try:
                proc = subprocess.run([sys.executable] + job.args, env=job.env, capture_output=True, text=True,
                                      timeout=left, check=False)
            except subprocess.TimeoutExpired:
                outcome["error"] = f"killed after {time.monotonic() - start:.0f} s: the time budget ran out"
                break
            outcome["returncode"] = proc.returncode
            lines = proc.stdout.strip().splitlines()
            if proc.returncode <= 0 and lines:  # killed after it printed its result (in teardown): the result holds
                try:
                    outcome["result"] = json.loads(lines[-1])
                    outcome.pop("error", None)
                    if proc.returncode:
                        outcome["note"] = f"killed by {signal.Signals(-proc.returncode).name} after printing its result"
                    break
                except ValueError:
                    pass
            if proc.returncode < 0:
                why = f"killed by {signal.Signals(-proc.returncode).name}"
            else:
                why = f"exit status {proc.returncode}" + ("" if proc.returncode else ", no JSON line on stdout")
            outcome["error"] = f"{why}: {proc.stderr.strip()[-1500:]}"
            if crash_signal(proc.returncode) is None:  # not torch's crash (docs/planning.md): the same on a retry
                break
        outcome["seconds"] = round(time.monotonic() - start, 2)
        return outcome

    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(one, jobs))


def child_threads(checks, decomposed_arms, gpu: bool, cpus: Optional[int] = None) -> Dict[tuple, int]:
    """Intra-op threads per (check, side). On the CPU of a dry run one each (a shared 2-core machine:
    a second thread waiting on a descheduled one makes a tiny step 100x slower). On a GPU machine the
    plans run fake tensors (no arithmetic) and the tiny measured processes little: one each; the
    SD-sized measured ones share the other cores, a decomposed arm (decompose's SVDs on the CPU)
    twice the share."""
    out = {(c, side): 1 for c in checks for side in ("plan", "measured")}
    big = [c for c in checks if c.config != "tiny"]
    if not gpu or not big:
        return out
    cpus = cpus or len(os.sched_getaffinity(0))
    spare = max(len(big), cpus - 2 * len(checks) + len(big))
    weights = {c: 2 if c.arm in decomposed_arms else 1 for c in big}
    for c in big:
        out[(c, "measured")] = max(1, spare * weights[c] // sum(weights.values()))
    return out


def _compare(entry: dict, plan: Optional[dict], measured: Optional[dict]) -> None:
    """The planned and measured peaks of one entry and the relative error, both without the batch:
    the measured peak is over what the process held before the build (the inputs), so the plan's
    inputs are taken off its peak."""
    if plan:
        peak = plan.get("peak") or {}
        split = peak.get("split") or {}
        entry.update(plan_peak_bytes=plan["peak_memory_bytes"], plan_inputs_bytes=split.get("inputs", 0),
                     planned_bytes=plan["peak_memory_bytes"] - split.get("inputs", 0), plan_split=split,
                     plan_phase=peak.get("phase"), plan_where=peak.get("where"), plan_op=peak.get("op"),
                     plan_fits=plan.get("fits"), seconds_to_plan=plan.get("seconds_to_plan"))
    if measured:
        entry.update(measured_bytes=measured["peak_memory_bytes"],
                     measured_total_bytes=measured.get("peak_total_bytes"))
    if plan and measured:
        keys = ("trainable_params", "total_params")
        entry["same_model"] = all(plan.get(k) == measured.get(k) for k in keys)
        if entry["measured_bytes"] > 0:
            entry["error"] = (entry["planned_bytes"] - entry["measured_bytes"]) / entry["measured_bytes"]
        else:
            entry["failed"]["measured"] = f"measured peak {entry['measured_bytes']} bytes: nothing to compare"
    entry["status"] = "ok" if entry.get("error") is not None else "error"
    if not entry.get("failed"):
        entry.pop("failed", None)


def stage_planner(result: dict, report: Report, device: torch.device, budget: Budget, checks=None,
                  runner: Optional[Callable] = None) -> None:
    """elr_ext.plan's peak for this card against the measured one, per configuration and arm of
    benchmarks/train_step.py: the plan in a fresh process (`--job plan --simulate --plan-device
    <card>`, run again when torch kills it), the step measured in another (`--job memory`: on CUDA
    torch.cuda.max_memory_allocated, on the CPU peak RSS, over what the inputs took)."""
    import train_step  # the arms and the configurations; if it cannot be imported, this stage alone fails

    gpu = device.type == "cuda"
    if gpu:
        card = plan_card(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device),
                         torch.cuda.get_device_properties(device).total_memory)
    else:
        card = {"name": harness.device_name(device), "match": "cpu", "plan_device": "cpu"}
    checks = list(checks or (GPU_PLAN_CHECKS if gpu else CPU_PLAN_CHECKS))
    autocast = PLAN_AUTOCAST if gpu else None
    result.update(card=card, autocast=autocast,
                  measured_by="torch.cuda.max_memory_allocated over the measured steps minus what the process "
                  "held before the build" if gpu else "peak RSS over the measured steps minus the RSS before the "
                  "build (fixed mmap threshold)",
                  error_is="(planned - measured) / measured; planned = the plan's peak minus its inputs")
    entries = result.setdefault("entries", [])
    skipped = result.setdefault("skipped", [])
    print(f"   {card['name']}: planned as {card['plan_device']} ({card['match']})"
          + (f"; {card['reason']}" if card.get("reason") else ""), flush=True)
    if card["plan_device"] is None:
        skipped += [{**c.where(), "reason": f"skipped: {card['reason']}"} for c in checks]
        return
    chosen = []
    for c in checks:
        left = budget.remaining()
        if c.arm not in train_step.ARMS:
            skipped.append({**c.where(), "reason": f"skipped: {c.arm!r} is not an arm of train_step.py"})
        elif left < c.estimate_s:
            skipped.append({**c.where(), "reason": f"skipped: time budget: {max(0.0, left):.0f} s of --budget "
                            f"{budget.seconds:.0f} s left, this check takes about {c.estimate_s:.0f} s"})
        else:
            chosen.append(c)
    for s in skipped:
        print(f"   {s['config']} b{s['batch']} s{s['latent']} {s['arm']}: {s['reason']}", flush=True)
    if not chosen:
        return
    threads = child_threads(chosen, {a for a, arm in train_step.ARMS.items() if arm.decomposed}, gpu)
    steps = ["--warmup", "1", "--steps", "2" if gpu else "1"]  # the first step makes the optimizer's state
    jobs = []
    for c in chosen:
        cfg = train_step.StepConfig(c.config, c.batch, c.latent)
        entries.append({**c.where(), "description": cfg.describe(), "plan_device": card["plan_device"],
                        "autocast": autocast, "status": "running", "failed": {}})
        shape = ["--config", c.config, "--batch", str(c.batch), "--latent", str(c.latent)] \
            + (["--dtype", autocast] if autocast else [])
        for side, args, extra, tries in (
                ("plan", ["--job", "plan", "--simulate", "--plan-device", card["plan_device"]], {}, PLAN_TRIES),
                ("measured", ["--job", "memory", "--device", device.type] + steps,
                 {harness._MMAP_ENV: "65536"}, 1)):  # the mmap threshold of train_step.py's memory runs
            n = str(threads[(c, side)])
            env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, **extra)
            jobs.append(ChildJob(len(entries) - 1, side, [TRAIN_STEP, "--child", c.arm] + args + shape, env, tries))
    report.checkpoint(0)
    if gpu:
        torch.cuda.empty_cache()  # what stages 2-4 left cached goes back to the card for the measured processes
    outcomes = (runner or run_child_jobs)(jobs, time.monotonic() + budget.remaining())
    got: Dict[tuple, dict] = {}
    for job, outcome in zip(jobs, outcomes, strict=True):
        entry = entries[job.entry]
        entry[f"{job.side}_process"] = {k: v for k, v in outcome.items() if k not in ("result", "error")}
        if outcome.get("result") is not None:
            got[(job.entry, job.side)] = outcome["result"]
        else:
            entry["failed"][job.side] = outcome.get("error") or "no result"
    for i, entry in enumerate(entries):
        _compare(entry, got.get((i, "plan")), got.get((i, "measured")))
        mib = 2 ** 20
        line = f"   {entry['config']} b{entry['batch']} s{entry['latent']} {entry['arm']}: "
        if entry["status"] == "ok":
            line += (f"planned {entry['planned_bytes'] / mib:.1f} MiB, measured {entry['measured_bytes'] / mib:.1f} "
                     f"MiB, error {entry['error'] * 100:+.1f} %")
        else:
            line += "; ".join(f"{side} failed: {why[:300]}" for side, why in entry.get("failed", {}).items())
        print(line, flush=True)
    errors = [e["error"] for e in entries if e["status"] == "ok"]
    result["summary"] = {"compared": len(errors), "failed": len(entries) - len(errors), "skipped": len(skipped),
                         "error_min": min(errors, default=None), "error_max": max(errors, default=None)}


def correctness_table(entries) -> dict:
    """{(op, backend, dtype): False when a check failed or errored, True when none did and at least one
    call really ran on that backend, None when every call fell back to another backend}."""
    verdict: dict = {}
    for e in entries:
        key = (e["op"], e["backend"], e["dtype"])
        if e["status"] in ("failed", "error") or verdict.get(key) is False:
            verdict[key] = False
        elif e["status"] == "passed":
            verdict[key] = True
        else:
            verdict.setdefault(key, None)
    return verdict


def _geomean(values):
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def pick_dispatch(rows: List[dict], correct: dict, dtypes, candidates=DISPATCH_CANDIDATES) -> dict:
    """For each (GPU_DISPATCH op, dtype), the faster of the candidate backends that passed stage 2 for
    every op the entry decides: by the geometric mean over the cases of the fwd+bwd time ratio (fwd
    where no fwd+bwd time exists), on the cases every eligible backend has a time for.

    rows: stage 4's rows ({"op", "case", "dtype", "mode", "arm", "median_ms"}); correct:
    {(op, backend, dtype): bool} (correctness_table). Returns {(op, dtype): {"backend": name or None,
    "eligible", "excluded": {backend: why}, "ratios": {backend: {mode: {"geomean", "min", "max",
    "cases"}}} (time over the chosen backend's), "reason"}}."""
    picks = {}
    for op, timed_ops in DISPATCH_TIMED.items():
        for dtype in dtypes:
            excluded, eligible = {}, []
            for b in candidates:
                verdicts = [correct.get((o, b, dtype)) for o in DISPATCH_CORRECT[op]]
                if any(v is False for v in verdicts):
                    excluded[b] = "failed stage 2"
                elif not any(verdicts):
                    excluded[b] = "never ran in stage 2 (not checked, or every call fell back)"
                else:
                    eligible.append(b)
            times: dict = {}  # mode -> case -> backend -> ms
            for r in rows:
                if r["op"] in timed_ops and r["dtype"] == dtype and r["arm"] in eligible:
                    times.setdefault(r["mode"], {}).setdefault(r["case"], {})[r["arm"]] = r["median_ms"]
            with_times = [b for b in eligible if any(b in per for m in times.values() for per in m.values())]
            for b in eligible:
                if b not in with_times:
                    excluded[b] = "not timed in stage 4"
            pick = {"backend": None, "eligible": with_times, "excluded": excluded, "ratios": {}}
            picks[(op, dtype)] = pick
            mode = next((m for m in ("fwd+bwd", "fwd") if any(all(b in per for b in with_times)
                                                             for per in times.get(m, {}).values())), None)
            if not with_times or mode is None:
                pick["reason"] = "no backend both correct and timed"
                continue
            common = {case: per for case, per in times[mode].items() if all(b in per for b in with_times)}
            base = with_times[0]
            score = {b: _geomean([per[b] / per[base] for per in common.values()]) for b in with_times}
            best = min(with_times, key=lambda b: score[b])
            pick["backend"] = best
            pick["decided_by"] = mode
            for b in with_times:
                for m, per_case in times.items():
                    ratios = [per[b] / per[best] for per in per_case.values() if b in per and best in per]
                    if ratios:
                        pick["ratios"].setdefault(b, {})[m] = {"geomean": _geomean(ratios), "min": min(ratios),
                                                               "max": max(ratios), "cases": len(ratios)}
    return picks


def format_dispatch(picks: dict, capability, existing: dict) -> str:
    """The GPU_DISPATCH literal of elr_ext/backends.py with this card's measured choices at its
    capability, the other capabilities' entries kept; the ratios in comments."""
    cap = tuple(capability)
    table = {key: dict(entry) for key, entry in existing.items()}
    comments = {}
    for key, pick in picks.items():
        if pick["backend"] is None:
            continue
        table.setdefault(key, {})[cap] = pick["backend"]
        parts = []
        for b, modes in pick["ratios"].items():
            if b == pick["backend"]:
                continue
            parts += [f"{b}/{pick['backend']} {m} {r['geomean']:.2f}x "
                      f"({r['min']:.2f}-{r['max']:.2f}, {r['cases']} cases)" for m, r in modes.items()]
        if not parts:
            parts = [f"only {pick['backend']} was correct and timed"]
        comments[key] = "; ".join(parts)
    lines = ["GPU_DISPATCH = {"]
    for key in sorted(table):
        entry = ", ".join(f'({arch[0]}, {arch[1]}): "{backend}"' for arch, backend in sorted(table[key].items()))
        comment = f"  # sm_{cap[0]}{cap[1]} measured: {comments[key]}" if key in comments else ""
        lines.append(f'    ("{key[0]}", "{key[1]}"): {{{entry}}},{comment}')
    lines.append("}")
    return "\n".join(lines)


def stage_dispatch(result: dict, data: dict, dtypes, capability) -> None:
    stages = data.get("stages", {})
    rows = stages.get("performance", {}).get("result", {}).get("rows", [])
    entries = stages.get("correctness", {}).get("result", {}).get("entries", [])
    if not rows:
        raise RuntimeError("stage 4 left no timing rows to decide from")
    picks = pick_dispatch(rows, correctness_table(entries), dtypes)
    literal = format_dispatch(picks, capability, backends.GPU_DISPATCH)
    ast.literal_eval(literal.split("=", 1)[1])  # what is printed must paste into backends.py
    result.update(capability=list(capability), literal=literal,
                  picks={f"{op}|{dtype}": pick for (op, dtype), pick in picks.items()})
    print(literal, flush=True)


# ---------------------------------------------------------------------------------------- markdown
def markdown(data: dict) -> str:
    stages = data.get("stages", {})
    lines = [f"# GPU check: {data.get('card')}", "",
             f"`{data.get('command')}` at {data.get('started')}; stages: "
             + ", ".join(f"{s['stage']} {name} {s['status']}" + (f" ({s['seconds']:.0f} s)" if "seconds" in s else "")
                         for name, s in stages.items()), ""]
    for name, s in stages.items():
        if s["status"] == "error":
            lines += [f"**stage {s['stage']} ({name}) failed**: `{s.get('error')}`", ""]
    env = stages.get("environment", {}).get("result", {})
    if env:
        dev = env.get("device", {})
        gpu = f", capability {dev['capability']}, {dev['sms']} SMs" if "sms" in dev else ""
        copy = f", copy bandwidth {dev['copy_bandwidth_gbps']:.0f} GB/s" if "copy_bandwidth_gbps" in dev else ""
        lines += ["## 1. Environment", "", f"- device: {dev.get('name')}{gpu}{copy}",
                  f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
                  f"backends {env.get('available_backends')}", ""]
    for key, title, good in (("correctness", "2. Correctness (passed / total)", "passed"),
                             ("determinism", "3. Determinism (bitwise / total)", "bitwise")):
        res = stages.get(key, {}).get("result", {})
        summary = res.get("summary")
        if not summary:
            continue
        dtypes = sorted({d for per_op in summary.values() for per_b in per_op.values() for d in per_b})
        margin: dict = {}  # the worst error as a fraction of its bound, per op, backend and dtype
        for e in res.get("entries", []):
            for c in (e.get("checks") or {}).values():
                if c.get("bound"):
                    where = (e["op"], e["backend"], e["dtype"])
                    margin[where] = max(margin.get(where, 0.0), c["err"] / c["bound"])
        lines += [f"## {title}", "", "| op | backend | " + " | ".join(dtypes) + " |",
                  "|---|---|" + "---|" * len(dtypes)]
        for op, per_op in summary.items():
            for b, per_b in per_op.items():
                cells = [f"{per_b[d].get(good, 0)}/{per_b[d]['total']}"
                         + "".join(f", {n} {k}" for k, n in per_b[d].items() if k not in (good, "total"))
                         + (f" (err <= {margin[op, b, d]:.2f} bound)" if (op, b, d) in margin else "")
                         if d in per_b else "-" for d in dtypes]
                lines.append(f"| {op} | {b} | " + " | ".join(cells) + " |")
        bad = [e for e in res.get("entries", []) if (e.get("status") not in (None, "passed") if key == "correctness"
                                                      else e.get("bitwise") is not True)]
        for e in bad[:30]:
            lines.append(f"- {e.get('status', 'not bitwise')}: {e['op']} {e['backend']} {e['dtype']} {e['case']}: "
                         f"{e.get('error') or e.get('failed') or e.get('differs') or e.get('dispatched')}")
        if res.get("skipped"):
            lines.append(f"- {len(res['skipped'])} cases skipped: {res['skipped'][0]['reason']}")
        lines.append("")
    perf = stages.get("performance", {}).get("result", {})
    if perf.get("rows"):
        arms = list(dict.fromkeys(r["arm"] for r in perf["rows"]))
        lines += ["## 4. Performance", "",
                  "Median ms per call, [peak MiB]; (x dense) = time over the dense layer's; % = FDN's effective "
                  "bandwidth over the copy bandwidth.", "",
                  "| op | case | dtype | mode | " + " | ".join(arms) + " |", "|---|---|---|---|" + "---|" * len(arms)]
        groups: dict = {}
        for r in perf["rows"]:
            groups.setdefault((r["op"], r["case"], r["dtype"], r["mode"]), {})[r["arm"]] = r
        for (op, case, dtype, mode), per_arm in groups.items():
            cells = []
            for arm in arms:
                r = per_arm.get(arm)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['median_ms']:.3f}"
                if r.get("peak_mem_bytes") is not None:
                    cell += f" [{r['peak_mem_bytes'] / 2**20:.1f}]"
                if "vs_dense" in r and arm != "dense":
                    cell += f" ({r['vs_dense']:.2f}x)"
                if "pct_of_copy" in r:
                    cell += f" {r['pct_of_copy']:.0f}%"
                cells.append(cell)
            lines.append(f"| {op} | {case} | {dtype} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    if perf.get("skipped"):
        lines += [f"{len(perf['skipped'])} timing or profiling cases skipped: {perf['skipped'][0]['reason']}", ""]
    for e in perf.get("errors", []):
        lines.append(f"- error: {e['op']} {e['case']} {e['dtype']} {e['mode']}: {e['error']}")
    for p in perf.get("profiles", []):
        lines.append(f"- profile {p['op']} {p.get('backend')} {p.get('dtype')} {p['case']}: " + (
            p["error"] if "error" in p
            else "; ".join(f"{k['name'][:60]} {k['us_per_iter']:.1f} us" for k in p["top"][:4])))
    tri = stages.get("triton", {}).get("result", {})
    if tri:
        lines += ["", "## 5. Triton kernels", ""]
        if "unavailable" in tri:
            lines.append(f"unavailable: {tri['unavailable']}")
        for k in tri.get("kernels", []):
            lines.append(f"- {k['kernel']}: {len(k.get('compiled', []))} compiled, max regs {k.get('max_regs')}, "
                         f"max spills {k.get('max_spills')}" + (f" ({k['unavailable']})" if "unavailable" in k else ""))
    planner = stages.get("planner", {}).get("result", {})
    if planner:
        lines += ["", "## 6. Planner against the measured peak", ""] + planner_lines(planner)
    disp = stages.get("dispatch", {}).get("result", {})
    if disp.get("literal"):
        lines += ["", "## 7. Dispatch table implied", "", "```python", disp["literal"], "```"]
    return "\n".join(lines) + "\n"


def planner_lines(res: dict) -> List[str]:
    card = res.get("card", {})
    lines = [f"{card.get('name')}: planned as `{card.get('plan_device')}` (match: {card.get('match')})"
             + (f"; {card['reason']}" if card.get("reason") else "") + (f"; {card['note']}" if card.get("note") else "")
             + f". Autocast {res.get('autocast') or 'off (fp32)'}; measured: {res.get('measured_by')}; "
             f"error = {res.get('error_is')}.", ""]
    entries = res.get("entries", [])
    if entries:
        lines += ["| configuration | arm | planned MiB | measured MiB | error | planned peak in "
                  "| planned split (MiB) |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        def mib(key, e=e):
            return "-" if e.get(key) is None else f"{e[key] / 2 ** 20:.1f}"

        error = "-" if e.get("error") is None else f"{e['error'] * 100:+.1f} %"
        split = ", ".join(f"{k} {v / 2 ** 20:.1f}" for k, v in (e.get("plan_split") or {}).items() if v)
        where = " ".join(str(e[k]) for k in ("plan_phase", "plan_where", "plan_op") if e.get(k))
        lines.append(f"| {e['config']} b{e['batch']} {e['latent']}x{e['latent']} | {e['arm']} | {mib('planned_bytes')} "
                     f"| {mib('measured_bytes')} | {error} | {where or '-'} | {split or '-'} |")
    for e in entries:
        for side, why in (e.get("failed") or {}).items():
            lines.append(f"- {e['config']} b{e['batch']} s{e['latent']} {e['arm']}: {side} failed: `{why[-300:]}`")
        if e.get("same_model") is False:
            lines.append(f"- {e['config']} b{e['batch']} s{e['latent']} {e['arm']}: the planned and measured "
                         "parameter counts differ")
    for s in res.get("skipped", []):
        lines.append(f"- {s['config']} b{s['batch']} s{s['latent']} {s['arm']}: {s['reason']}")
    return lines


# -------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="stages 1-3 on the CPU backends, small shapes")
    parser.add_argument("--out", default=None, help="folder of the JSON and .md (default: benchmarks/results; "
                        "with --dry-run a fresh temporary folder)")
    parser.add_argument("--budget", type=float, default=520.0, help="seconds from the start after which the "
                        "remaining cases are skipped and marked so")
    parser.add_argument("--plan-reserve", type=float, default=100.0, help="the last seconds of --budget kept for "
                        "stage 6 when it runs: stages 2-4 stop taking cases at --budget minus this")
    parser.add_argument("--stages", default=None,
                        help="comma-separated stage numbers (default: 1-7; 1-3 with --dry-run, where 6 adds the "
                        "planner check on the CPU, about 30 s more)")
    parser.add_argument("--only", default=None, metavar="REGEX", help="only the cases whose 'op label' matches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=None, help="timing samples per arm (default 7; 3 on the CPU)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stages = {int(s) for s in (args.stages or ("1,2,3" if args.dry_run else "1,2,3,4,5,6,7")).split(",")}
    budget = Budget(args.budget, args.plan_reserve if 6 in stages else 0.0)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --dry-run runs stages 1-3 on the CPU backends", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        # the shapes are tiny: a second thread only adds the parallel regions' hand-offs (3x the wall
        # time on a shared 2-core machine)
        torch.set_num_threads(1)
        backends_ = elr_ext.available_backends("cpu")
        cases = odd_cases()
        card = "dryrun_cpu"
        out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
        copy_bytes, repeats, min_sample_s = 1 << 24, args.repeats or 3, 0.002
    else:
        backends_ = list(GPU_BACKENDS)
        cases = sd_cases() + odd_cases()
        card = card_slug(torch.cuda.get_device_name(device))
        out = args.out or harness.RESULTS_DIR
        copy_bytes, repeats, min_sample_s = 1 << 28, args.repeats or 7, 0.01
    if args.only:
        cases = [c for c in cases if re.search(args.only, f"{c.op} {c.label}")]
    cases = round_robin(cases)
    dtype_names = ["bfloat16", "float16", "float32"]
    dtypes = [DTYPES[d] for d in dtype_names]
    report = Report(os.path.join(out, f"gpu_{card}.json"), {
        "script": "benchmarks/gpu_check.py", "command": " ".join(["python benchmarks/gpu_check.py"] + sys.argv[1:]),
        "card": harness.device_name(device), "device_type": device.type, "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget, "reserve_s": budget.reserve,
        "stages_run": sorted(stages), "seed": args.seed,
        "backends": backends_, "dtypes": dtype_names, "cases": len(cases), "stages": {},
    })
    report.save()
    print(f"gpu_check: {report.data['card']}; backends {backends_}; {len(cases)} cases; writing {report.json_path}",
          flush=True)
    runnable = [b for b in backends_ if backends.unavailable_reason(b, device.type, device) is None]
    report.data["unavailable_backends"] = {b: backends.unavailable_reason(b, device.type, device)
                                           for b in backends_ if b not in runnable}
    for b, why in report.data["unavailable_backends"].items():
        print(f"   backend {b} cannot run here: {why}", flush=True)
    common = dict(report=report, cases=cases, backends_=runnable, dtypes=dtypes, device=device, seed=args.seed,
                  budget=budget)
    if 1 in stages:
        run_stage(report, 1, "environment", lambda r: stage_environment(r, device, copy_bytes))
    if 2 in stages:
        run_stage(report, 2, "correctness", lambda r: stage_correctness(r, **common))
    if 3 in stages:
        run_stage(report, 3, "determinism", lambda r: stage_determinism(r, **common))
    if 4 in stages:
        copy_gbps = report.data["stages"].get("environment", {}).get("result", {}).get("device", {}).get(
            "copy_bandwidth_gbps")
        # on a GPU only Stable Diffusion's shapes are timed: the odd ones are launch overhead alone
        timed = dict(common, cases=cases if args.dry_run else [c for c in cases if c.sd])
        run_stage(report, 4, "performance", lambda r: stage_performance(
            r, **timed, repeats=repeats, min_sample_s=min_sample_s, copy_gbps=copy_gbps))
    if 5 in stages:
        run_stage(report, 5, "triton", lambda r: stage_triton(r, device))
    if 6 in stages:
        run_stage(report, 6, "planner", lambda r: stage_planner(r, report, device, budget))
    if 7 in stages:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
        run_stage(report, 7, "dispatch", lambda r: stage_dispatch(r, report.data, dtype_names, capability))
    report.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report.data["seconds"] = round(budget.elapsed(), 2)
    report.save()
    print(f"gpu_check: {report.data['seconds']:.1f} s; wrote {report.json_path} and {report.md_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
