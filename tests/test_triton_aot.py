"""Register use of the Triton kernels, compiled ahead of time for sm_80 and sm_90: no configuration
that autotuning can pick at SD training shapes may spill or use local memory.

No GPU is needed: Triton's compiler and its bundled ptxas run on the host, and the bundled
cuobjdump reads the resources (registers, stack frame, local memory) from the cubin; the PTX is
searched for `.local` too. What is compiled is what the host code launches: its launch helper is
replaced by a recorder and the ops' host functions run on meta tensors (nothing is allocated), so
the arguments, constexprs and placeholders are the real ones. Each recorded launch goes through
the autotuner's own prune function over its own configuration list, and every configuration kept
is compiled through Triton's own argument specialisation (the signature and the divisibility
attributes a launch would have).

Covered for sm_80 (108 SMs, for the host's split heuristics) and sm_90 (132 SMs), at 8192 tokens:
- Kronecker LoRA in fp16, bf16 and fp32, one training step of a frozen layer (forward, then the
  backward with its recompute and rank-gradient reductions): linear layers d_in -> d_out = 320,
  640, 1280 square, the feed-forward 1280 -> 10240 and 5120 -> 1280, and the conv adapter's
  unfolded inputs 2880 -> 320, 5760 -> 640, 11520 -> 1280 (backward to the factors only); with the
  paper's eq. 9 factors a1 = a2 = n = T for n in {2, 4, 8} and r in {4, 8, 16}, and the balanced
  split at T = 4, r = 8, wherever `kron_lora.supported` takes them.
- FDN in bf16 at 320 x 64^2 and 1280 x 8^2 (32 groups, batch 2: the most and the fewest splits),
  SiLU with a full-size modulation and none with a per-channel one, forward and backward (fp16,
  fp32 and 640 x 32^2, 1280 x 16^2 were measured once, docs/triton.md: left out for time).
- the low-rank projections in bf16 and fp32 (tensor-core and FMA dots): q, k, v downs of rank 32
  from 640 channels, forward and backward (320 and 1280 compile to the same specialisations; fp16
  was measured once).
A kernel, signature, constexpr and attribute combination met more than once compiles once; the
compiled resources are cached across the tests of this file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="the kernels are defined for the interpreter in this process")
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

ARCHS = {80: 108, 90: 132}  # compute capability: SMs of the A100 / H100 the split heuristics see
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOKENS = 8192  # two 64 x 64 latents
LINEAR = ((320, 320), (640, 640), (1280, 1280), (1280, 10240), (5120, 1280))  # (d_in, d_out)
CONV = ((2880, 320), (5760, 640), (11520, 1280))  # (in * 3 * 3, out)
EQ9 = tuple((n, r) for n in (2, 4, 8) for r in (4, 8, 16))
FDN_SHAPES = ((320, 64), (1280, 8))  # (channels, side): the most and the fewest splits
FDN_DTYPES = (torch.bfloat16,)
LOWRANK_WIDTHS = (640,)  # 320 and 1280 specialise to the same kernels
LOWRANK_DTYPES = (torch.bfloat16, torch.float32)  # tensor-core and FMA dots


def _modules():
    from elr_ext.triton import fdn, kron_lora, lowrank_proj

    return fdn, kron_lora, lowrank_proj


# ------------------------------------------------------------------------------ recording launches
def meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


@contextlib.contextmanager
def recording(sms: int):
    """Inside: the Triton host functions accept meta tensors and record their launches
    (kernel, args, kwargs) instead of running them."""
    modules = _modules()
    launches = []

    def record(kernel, grid, *args, **kwargs):
        launches.append((kernel, args, kwargs))
        kernel.best_config = kernel.configs[0]  # read by host code after a launch, never used here

    with pytest.MonkeyPatch.context() as mp:
        for module in modules:
            mp.setattr(module, "launch", record)
            mp.setattr(module, "check_device", lambda op, t: None)
            mp.setattr(module, "num_sms", lambda device: sms)
        for module in modules:
            for value in vars(module).values():
                if isinstance(value, triton.runtime.Autotuner):
                    mp.setattr(value, "best_config", None, raising=False)
        yield launches


def kron_factors():
    """(label, T, a1, a2, b1, b2, r, d_in, d_out, conv) of every layer and factorisation covered."""
    from elr_ext.nn.kron_lora import factorization

    out = []
    for layers, conv in ((LINEAR, False), (CONV, True)):
        for d_in, d_out in layers:
            for n, r in EQ9:
                out.append((f"eq9 n={n} r={r} {d_in}->{d_out}", n, n, n, d_out // n, d_in // n, r, d_in, d_out, conv))
            (a1, b1), (a2, b2) = factorization(d_out), factorization(d_in)
            out.append((f"balanced T=4 r=8 {d_in}->{d_out}", 4, a1, a2, b1, b2, 8, d_in, d_out, conv))
    return out


def kron_step(dtype, T, a1, a2, b1, b2, r, d_in, d_out, conv):
    """The Kronecker host calls of one training step (the frozen layer's weight and bias given)."""
    kl = _modules()[1]
    x, grad_y = meta(TOKENS, d_in, dtype=dtype), meta(TOKENS, d_out, dtype=dtype)
    A, U, V = meta(T, a1, a2, dtype=dtype), meta(T, b1, r, dtype=dtype), meta(T, r, b2, dtype=dtype)
    empty_t, empty_s = meta(0, a2, T * r, dtype=dtype), meta(0, a1, T * r, dtype=dtype)
    if conv:  # the conv adapter's backward: rank space, to the factors only (no weight here)
        kl.backward(grad_y, x, A, U, V, empty_t, empty_s, None, 0.5, [False, True, True, True, False, False])
        return
    weight, bias = meta(d_out, d_in, dtype=dtype), meta(d_out, dtype=dtype)
    kl.forward(x, A, U, V, weight, bias, 0.5, False)
    kl.backward(grad_y, x, A, U, V, empty_t, empty_s, weight, 0.5, [True, True, True, True, False, False])


def fdn_step(dtype, channels, side):
    fdn = _modules()[0]
    z = meta(2, channels, side, side, dtype=dtype)
    stats = meta(2, 32, dtype=torch.float32)
    for activation, affine in (("silu", z.shape), ("none", (2, channels, 1, 1))):
        gamma, beta = meta(*affine, dtype=dtype), meta(*affine, dtype=dtype)
        fdn.forward(z, gamma, beta, 32, 1e-5, activation)
        fdn.backward(z, z, gamma, beta, stats, stats, 32, activation, (True, True, True))


def lowrank_step(dtype, width):
    lowrank = _modules()[2]
    x = meta(TOKENS, width, dtype=dtype)
    downs = [meta(32, width, dtype=dtype) for _ in range(3)]
    ups = [meta(width, 32, dtype=dtype) for _ in range(3)]
    biases = [meta(width, dtype=dtype), meta(0, dtype=dtype), meta(width, dtype=dtype)]
    _, h = lowrank.forward(x, downs, ups, biases)
    grads = [meta(TOKENS, width, dtype=dtype) for _ in range(3)]
    lowrank.backward(grads, x, h, downs, ups, True, True, (True,) * 3, (True,) * 3)


@functools.lru_cache(maxsize=None)
def recorded(cc: int) -> tuple:
    """(kernel, args, kwargs, label) of every launch covered, for sm_<cc>."""
    kl = _modules()[1]
    out = []
    with recording(ARCHS[cc]) as launches:
        for dtype in DTYPES:
            for label, T, a1, a2, b1, b2, r, d_in, d_out, conv in kron_factors():
                if not kl.supported(meta(T, a1, a2, dtype=dtype), meta(T, b1, r, dtype=dtype)):
                    continue
                start = len(launches)
                kron_step(dtype, T, a1, a2, b1, b2, r, d_in, d_out, conv)
                out += [(*launch, f"{label} {dtype}") for launch in launches[start:]]
            for channels, side in FDN_SHAPES if dtype in FDN_DTYPES else ():
                start = len(launches)
                fdn_step(dtype, channels, side)
                out += [(*launch, f"fdn {channels}x{side}^2 {dtype}") for launch in launches[start:]]
            for width in LOWRANK_WIDTHS if dtype in LOWRANK_DTYPES else ():
                start = len(launches)
                lowrank_step(dtype, width)
                out += [(*launch, f"lowrank {width} {dtype}") for launch in launches[start:]]
    return tuple(out)


# ------------------------------------------------------------------------------------- compiling
def pruned(kernel, args, kwargs) -> list:
    """The configurations the autotuner would benchmark for this launch (its own prune)."""
    if len(kernel.configs) == 1:
        return list(kernel.configs)
    kernel.nargs = dict(zip(kernel.arg_names, args))
    try:
        return kernel.prune_configs(kwargs)
    finally:
        kernel.nargs = None


@functools.lru_cache(maxsize=None)
def _backend(cc: int):
    target = GPUTarget("cuda", cc, 32)
    return target, make_backend(target)


@functools.lru_cache(maxsize=None)
def _binder(jit, cc: int):
    return create_function_from_signature(jit.signature, jit.params, _backend(cc)[1])


def specialise(kernel, cc, args, kwargs, config):
    """What a launch with this configuration compiles, through the JIT's own binder (argument
    specialisation) and packing: (key, number of specialised attributes, ASTSource, options).
    The key leaves the attributes (divisibility by 16 of integers and pointers) out."""
    jit = kernel.fn
    backend = _backend(cc)[1]
    full = {**kwargs, **config.all_kwargs(), "debug": False,
            "instrumentation_mode": triton.knobs.compilation.instrumentation_mode}
    bound, specialization, options = _binder(jit, cc)(*args, **full)
    options, signature, constexprs, attrs = jit._pack_args(backend, full, bound, specialization, options)
    key = (jit.__name__, cc, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(options.__dict__.items())))
    return key, len(attrs), ASTSource(jit, signature, constexprs, attrs), options


_RESOURCES: dict = {}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(cc: int, src, options) -> dict:
    """Registers, stack frame and local memory per thread of one compiled kernel."""
    compiled = triton.compile(src, target=_backend(cc)[0], options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    assert found, report
    regs, stack, _, local = (int(v) for v in found.groups())
    return {"regs": regs, "stack": stack, "local": local, "ptx_local": ".local" in compiled.asm["ptx"]}


def compile_all(cc: int, kernel_names) -> list:
    """(label, config, resources) of every recorded launch of these kernels. Launches that differ
    only in the divisibility attributes of their arguments compile once, as the variant with the
    fewest (the least vectorised loads and stores: the most addresses in registers). Compiled in
    parallel processes, cached across tests."""
    chosen, rows = {}, []
    for kernel, args, kwargs, label in recorded(cc):
        if kernel.fn.__name__ not in kernel_names:
            continue
        for config in pruned(kernel, args, kwargs):
            key, n_attrs, src, options = specialise(kernel, cc, args, kwargs, config)
            if key not in _RESOURCES and (key not in chosen or n_attrs < chosen[key][0]):
                chosen[key] = (n_attrs, src, options)
            rows.append((key, f"{kernel.fn.__name__} {label}", str(config)))
    _JOBS[:] = [(key, cc, src, options) for key, (_, src, options) in chosen.items()]
    if len(_JOBS) > 1 and (os.cpu_count() or 1) > 1 and "fork" in multiprocessing.get_all_start_methods():
        # forked workers see _JOBS (ASTSource does not pickle); triton.compile holds the GIL
        with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
            done = list(pool.map(_compile_job, range(len(_JOBS)), chunksize=4))
    else:
        done = [_compile_job(i) for i in range(len(_JOBS))]
    _RESOURCES.update(done)
    return [(label, config, _RESOURCES[key]) for key, label, config in rows]


_JOBS: list = []


def _compile_job(index: int):
    key, cc, src, options = _JOBS[index]
    return key, resources(cc, src, options)


def offenders(rows) -> list:
    return [f"{label} [{config}]: {res}" for label, config, res in rows
            if res["stack"] or res["local"] or res["ptx_local"]]


# ------------------------------------------------------------------------------------------ tests
KERNELS = {
    "kron_forward": ("_forward_kernel",),
    "kron_backward": ("_backward_kernel",),
    "kron_rank_grad": ("_rank_grad_kernel",),
    "fdn": ("_stats_partial_kernel", "_forward_apply_kernel", "_backward_partial_kernel", "_backward_apply_kernel"),
    "lowrank_proj": ("_gemm_kernel",),
}


@pytest.mark.parametrize("cc", sorted(ARCHS))
@pytest.mark.parametrize("family", sorted(KERNELS))
def test_no_configuration_spills(family, cc):
    rows = compile_all(cc, KERNELS[family])
    assert rows, f"no {family} launch recorded"
    bad = offenders(rows)
    assert not bad, f"{len(bad)} of {len(rows)} compiled configurations spill:\n" + "\n".join(bad[:40])


def test_every_recorded_kron_launch_keeps_a_configuration_within_budget():
    """The prune never falls back to an over-budget configuration at these shapes, and the paper's
    default factors (n = T = 4, r = 8) take the fused path in every dtype."""
    kl = _modules()[1]
    for dtype in DTYPES:
        assert kl.supported(meta(4, 4, 4, dtype=dtype), meta(4, 80, 8, dtype=dtype)), dtype
    seen = 0
    for kernel, args, kwargs, label in recorded(90):
        if kernel.fn.__name__ not in ("_forward_kernel", "_backward_kernel"):
            continue
        nargs = {**dict(zip(kernel.arg_names, args)), **kwargs}
        io = nargs["x_ptr"] if "x_ptr" in nargs else nargs["dy_ptr"]
        which = "forward" if "x_ptr" in nargs else "backward"
        budget = kl.tile_budget(which, io.dtype, nargs["PREC"])
        kept = pruned(kernel, args, kwargs)
        assert kept, label
        for config in kept:
            assert kl.tile_values(config, nargs["R_P"], nargs["BK"]) <= budget, (label, str(config))
            assert config.kwargs["BI"] <= triton.next_power_of_2(nargs["a1"]), (label, str(config))
        seen += 1
    assert seen > 0
