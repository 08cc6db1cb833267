"""The one place that knows which backends exist, which are available here, and which one an op
uses for a tensor.

Backends:
  cuda    compiled CUDA kernels (elr_ext._C_cuda), sm_70 and newer
  cpu     compiled C++ kernels (elr_ext._C)
  triton  Triton kernels: CUDA devices of sm_80 and newer, or the CPU under TRITON_INTERPRET=1
  torch   the pure-PyTorch reference (elr_ext/reference.py); always available

Default: the fastest available backend that implements the op for the tensor's device. Override
with the environment variable ELR_EXT_BACKEND or the `use_backend` context manager. A requested
backend that cannot run an op on a device falls back to the default, with one warning per
(op, backend, device type).

Planning (the end of this file): `planned_backend` says whose allocations the ops' fake kernels
describe, and the helpers the ops' `workspaces` functions share.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import math
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BACKENDS = ("cuda", "cpu", "triton", "torch")
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# GPU dispatch table: which of cuda / triton an op uses, per dtype and compute capability, where
# the _PREFERENCE order (cuda first) is not the best choice. Key (op, dtype name); value
# {minimum capability: backend}, the highest minimum at or below the device's capability wins;
# anything absent keeps the _PREFERENCE order. benchmarks/gpu_check.py prints the table its
# measurements imply (stage 6); paste it here with the card's name. Measured entries: none yet.
# Reasoned entries:
#   - kron_lora, fp16/bf16, sm_80+: triton. Its fused kernels run the rank-space products
#     (X V_cat^T, smat U_cat, dY U_cat^T) with tl.dot on the tensor cores; the CUDA fused kernels
#     run them on the SIMT pipes (csrc/kernels/kron_lora.cuh), and the base GEMM is cuBLAS in both.
#   - everything else, cuda: kron_lora fp32/fp64 and bf16 below sm_80 (the CUDA kernels only convert
#     bf16, so they run on sm_70/75, where Triton does not), fdn (memory-bound: both backends move the
#     same bytes), lowrank_proj (cuBLAS GEMMs on the cuda backend).
GPU_DISPATCH = {
    ("kron_lora", "float16"): {(8, 0): "triton"},
    ("kron_lora", "bfloat16"): {(8, 0): "triton"},
}
_capability: dict = {}  # device index -> (major, minor)

_state = threading.local()
_warned: set = set()
_native: dict = {}  # backend -> module or None
_missing: dict = {}  # backend -> reason it is unavailable
_loaded = False


def _load_native() -> None:
    """Import the compiled extensions once; record why one is missing instead of failing."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for backend, module in (("cpu", "elr_ext._C"), ("cuda", "elr_ext._C_cuda")):
        try:
            _native[backend] = importlib.import_module(module)
        except (ImportError, OSError) as exc:  # not built, or built against another torch
            _native[backend] = None
            built = compiled_info().get("skipped", {}).get(backend)
            _missing[backend] = built or f"{module} failed to import: {exc}"
    if _native.get("cpu") is None:
        warnings.warn(
            "elr_ext: the compiled CPU kernels are not available "
            f"({_missing['cpu']}); ops fall back to the pure-PyTorch reference. "
            "elr_ext.build_info() says what was built.",
            RuntimeWarning,
            stacklevel=3,
        )
    elif _native.get("cuda") is None and torch.cuda.is_available():
        warnings.warn(
            "elr_ext: a GPU is present but the compiled CUDA kernels are not available "
            f"({_missing['cuda']}); CUDA tensors use the Triton or reference backend.",
            RuntimeWarning,
            stacklevel=3,
        )


def compiled_info() -> dict:
    """What setup.py decided at build time (elr_ext/_build_info.json), or {} for a source tree
    that was never built."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


_triton_import_error: list = []  # filled once: ops ask per call, and a failed import is not cached


def _capability_of(device: torch.device | None) -> tuple:
    """(major, minor) of a CUDA device (the current one when `device` has no index), cached."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(index)
    return _capability[index]


def _triton_reason(device_type: str, device: torch.device | None = None) -> str | None:
    """None when Triton can run on this device type (and on `device`, when given), else why not."""
    if not _triton_import_error:
        try:
            importlib.import_module("triton")
            _triton_import_error.append(None)
        except ImportError as exc:
            _triton_import_error.append(f"triton is not installed ({exc})")
    if _triton_import_error[0] is not None:
        return _triton_import_error[0]
    # Triton fixes interpreted or compiled when a kernel is defined (elr_ext/triton/__init__.py)
    defined_interpreted = getattr(sys.modules.get("elr_ext.triton"), "INTERPRETED", None)
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on the CPU only under TRITON_INTERPRET=1"
        if defined_interpreted is False:
            return "the Triton kernels were defined before TRITON_INTERPRET=1 was set"
        return None
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        if _capability_of(device) < (8, 0):
            return "Triton kernels need compute capability 8.0 or newer"
        if defined_interpreted:
            return "the Triton kernels were defined under TRITON_INTERPRET=1 (CPU tensors only)"
        return None
    return f"Triton does not run on {device_type}"


def _arch_runs(built: str, capability: tuple) -> bool:
    """Whether code built for `built` ("8.0", "9.0+PTX") runs on a device of `capability`: SASS of the
    same major and a minor at or below the device's, or PTX of an arch at or below it (JIT)."""
    major, minor = (int(v) for v in built.replace("+PTX", "").split("."))
    if (major, minor) > tuple(capability):
        return False
    return built.endswith("+PTX") or major == capability[0]


def _cuda_arch_reason(device: torch.device) -> str | None:
    """Why the CUDA binary has no kernel image for `device`, or None. A build that does not record its
    arch list (older binaries) is trusted."""
    archs = (compiled_info().get("cuda") or {}).get("archs")
    if not archs:
        return None
    capability = _capability_of(device)
    if any(_arch_runs(a, capability) for a in archs):
        return None
    sm = f"sm_{capability[0]}{capability[1]}"
    return (f"elr_ext._C_cuda was built for {', '.join(archs)}, which has no kernel image for this GPU's {sm}; "
            f"rebuild with ELR_EXT_CUDA_ARCHS={capability[0]}.{capability[1]}"
            + (" and a CUDA 12.x toolkit (CUDA 13 cannot target sm_70)" if capability < (7, 5) else ""))


def unavailable_reason(backend: str, device_type: str, device: torch.device | None = None) -> str | None:
    """None when `backend` can run on `device_type` (and on `device`, when given: a CUDA binary
    without this GPU's arch, or Triton on a GPU older than sm_80), else a sentence saying why not."""
    _load_native()
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(device_type, device)
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend does not run on {device_type} tensors"
        return _missing.get("cpu")
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend does not run on {device_type} tensors"
        if _missing.get("cuda"):
            return _missing["cuda"]
        if not torch.cuda.is_available():
            return "built, but no CUDA device is present"
        return _cuda_arch_reason(device) if device is not None else None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


_registered: dict = {}


def native_implementations(native_op: str) -> tuple:
    """The compiled backends whose binary registers a kernel for torch.ops.elr_ext_native.<native_op>
    (a binary built from an older tree may lack an op)."""
    if native_op not in _registered:
        _load_native()
        found = []
        for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            try:
                registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"elr_ext_native::{native_op}", key)
            except RuntimeError:  # the schema itself is missing
                registered = False
            if _native.get(backend) is not None and registered:
                found.append(backend)
        _registered[native_op] = tuple(found)
    return _registered[native_op]


def available_backends(device_type: str) -> list:
    return [b for b in BACKENDS if unavailable_reason(b, device_type) is None]


def _check_name(backend: str | None, where: str) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{where}={backend!r} is not a backend; expected one of {', '.join(BACKENDS)}")


def requested_backend() -> str | None:
    """The backend asked for by use_backend() (innermost) or ELR_EXT_BACKEND, else None."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("ELR_EXT_BACKEND") or None
    _check_name(env, "ELR_EXT_BACKEND")
    return env


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the ops inside the block on `backend` ("cuda", "cpu", "triton" or "torch")."""
    _check_name(backend, "backend")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


def table_choice(op: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """The GPU_DISPATCH entry for `op` on a CUDA `device` in `dtype`, or None."""
    if device.type != "cuda" or dtype is None:
        return None
    entry = GPU_DISPATCH.get((op, str(dtype).replace("torch.", "")))
    if not entry:
        return None
    fitting = [arch for arch in entry if arch <= _capability_of(device)]
    return entry[max(fitting)] if fitting else None


def select(op: str, device: torch.device, implemented: Iterable[str],
           dtype: torch.dtype | None = None) -> str:
    """The backend that runs `op` on `device`, among the backends that implement it: the requested
    one, else the GPU_DISPATCH entry for `dtype` (CUDA devices), else the first available in
    _PREFERENCE. A backend that cannot run (not built, no kernel image for this GPU's arch, Triton
    below sm_80) is passed over with one warning per (op, backend, reason)."""
    implemented = tuple(implemented)
    device_type = device.type
    requested = requested_backend()
    if requested is not None:
        reason = unavailable_reason(requested, device_type, device)
        if reason is None and requested not in implemented:
            reason = f"{op} has no {requested} implementation"
        if reason is None:
            return requested
        _warn_once((op, requested, device_type),
                   f"elr_ext: backend {requested!r} requested for {op} on {device_type} but {reason}; "
                   "using the default backend")
    candidates = (table_choice(op, device, dtype),) + _PREFERENCE.get(device_type, ("torch",))
    for backend in candidates:
        if backend is None or backend not in implemented:
            continue
        reason = unavailable_reason(backend, device_type, device)
        if reason is None:
            return backend
        if device_type == "cuda" and backend == "cuda" and torch.cuda.is_available() and not _missing.get("cuda"):
            _warn_once(("arch", backend, reason), f"elr_ext: {reason}; CUDA tensors use the next backend")
    return "torch"


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def choose(op: str, native_op: str, t: torch.Tensor, triton: bool = True) -> str:
    """The backend for one call of an op's custom op on tensor `t`: the compiled backends whose binary
    registers `native_op`, Triton when it has a kernel for this call (`triton`), the reference always.
    The one dispatch helper of elr_ext/ops/*.py."""
    implemented = native_implementations(native_op) + (("triton",) if triton else ()) + ("torch",)
    return select(op, t.device, implemented, t.dtype)


def build_info() -> dict:
    """What was compiled (backends, CUDA toolkit, archs) and why anything is missing."""
    _load_native()
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "compiled": compiled_info(),
        "backends": {},
    }
    for backend in BACKENDS:
        device_types = {"cpu": ("cpu",), "cuda": ("cuda",)}.get(backend, ("cuda", "cpu"))
        reasons = {d: unavailable_reason(backend, d) for d in device_types}
        info["backends"][backend] = {
            "available_on": [d for d, r in reasons.items() if r is None],
            "missing_because": {d: r for d, r in reasons.items() if r is not None},
        }
    for backend in ("cpu", "cuda"):
        module = _native.get(backend)
        if module is not None and hasattr(module, "build_info"):
            info[f"{backend}_binary"] = dict(module.build_info())
    return info


# ------------------------------------------------------------------------------------ planning
DEFAULT_PLANNED_SM_COUNT = 132  # H100 / H200 SXM: the most SMs among the usual planned cards
_planned = contextvars.ContextVar("elr_ext_planned_backend", default=("cuda", DEFAULT_PLANNED_SM_COUNT))


@contextlib.contextmanager
def planned_backend(name: str, sm_count: int = DEFAULT_PLANNED_SM_COUNT) -> Iterator[None]:
    """Inside the block, the fake kernels of elr_ext's custom ops allocate (as fake tensors) the
    workspaces backend `name` ("cuda", "cpu", "triton" or "torch") would allocate for the call, and
    the ops' `workspaces` functions describe that backend. A memory planner that runs a step under
    FakeTensorMode sets it; outside any block it is "cuda" (a plan is usually for a GPU). A
    TorchDispatchMode tracker does not see what a fake kernel allocates inside itself: it gets the
    same workspaces from each op file's PLAN_WORKSPACES hooks (tracker_hooks).

    sm_count: the planned GPU's multiprocessor count, which sizes the few workspaces that depend on
    the grid (the dA partials of the fused CUDA Kronecker backward, the split partials of the Triton
    kernels); it matters only for calls of fewer tokens than about 2 blocks per SM.

    Kept in a contextvars.ContextVar: nested blocks restore the outer value on exit, and a thread
    started inside a block begins at the default. "triton" loads elr_ext.triton (for the Kronecker
    kernels' `supported`), which fixes Triton's interpreted or compiled mode for the process."""
    if name not in BACKENDS:
        raise ValueError(f"planned backend {name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    if isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count < 1:
        raise ValueError(f"sm_count must be a positive int, got {sm_count!r}")
    token = _planned.set((name, sm_count))
    try:
        yield
    finally:
        _planned.reset(token)


def current_planned_backend() -> str:
    """The backend the fake kernels describe: the innermost planned_backend block's, else "cuda"."""
    return _planned.get()[0]


def planned_sm_count() -> int:
    """The SM count of the innermost planned_backend block, else DEFAULT_PLANNED_SM_COUNT."""
    return _planned.get()[1]


class Workspace(NamedTuple):
    """One transient tensor a backend allocates for a call besides the outputs (elr_ext/ops/*.py:
    `workspaces`)."""
    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def acc_bytes(dtype: torch.dtype) -> int:
    """sizeof(acc_t<T>) for tensors of `dtype`: 8 for fp64, else 4."""
    return 8 if dtype == torch.float64 else 4


def acc_values(name: str, count: int, dtype: torch.dtype) -> Workspace:
    """`count` values of the accumulation type of `dtype` (acc_t<T>: fp64 for fp64, else fp32)."""
    return Workspace(name, (count,), torch.float64 if dtype == torch.float64 else torch.float32)


def byte_workspace(name: str, nbytes: int) -> Workspace:
    """A wrapper's `at::empty({bytes}, kByte)`."""
    return Workspace(name, (nbytes,), torch.uint8)


def align256(nbytes: int) -> int:
    """csrc/kernels/cuda_common.cuh: align256, the rounding of every CUDA byte workspace."""
    return -(-nbytes // 256) * 256


def larger(*phases: Sequence[Workspace]) -> list:
    """The phase with the most bytes: of transients that live one after another, the ones alive at
    the wrapper's peak."""
    return list(max(phases, key=lambda phase: sum(w.nbytes for w in phase)))


def has_symbolic_sizes(tensors: Iterable) -> bool:
    """Whether any tensor (nested lists allowed) has a symbolic size (torch.compile with dynamic
    shapes). The fake kernels then leave the workspaces out: sizing them would guard on the shapes."""
    return any(isinstance(t, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in t.shape)
               for t in tree_flatten(list(tensors))[0])


def allocate(workspaces: Iterable[Workspace], device: torch.device) -> list:
    """The workspaces as (fake, under FakeTensorMode) tensors, alive together until the list goes."""
    return [torch.empty(w.shape, dtype=w.dtype, device=device) for w in workspaces]


GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE


def cpu_parallel_tasks(units: int, numel: int) -> int:
    """How many tasks (each with its own scratch, all alive at once) the CPU wrappers' at::parallel_for
    runs over `units` work units of an op of `numel` values (csrc/aten_wrapper_util.h: AtenParallelFor,
    then ATen's OpenMP invoke_parallel) with torch.get_num_threads() threads."""
    if units <= 0:
        return 0
    grain = max(1, GRAIN_SIZE // max(1, numel // units))
    threads = torch.get_num_threads()
    if units <= grain or units == 1 or threads == 1:
        return 1
    chunk = -(-units // min(threads, -(-units // grain)))
    return -(-units // chunk)


class _AllocationPeak(TorchDispatchMode):
    """Live bytes of the storages the ops run inside it create, and their peak; the storages of
    `inputs` (which views of them return) are not counted."""

    def __init__(self, inputs=()):
        super().__init__()
        self.live = self.peak = 0
        self._seen = weakref.WeakKeyDictionary()
        for t in tree_flatten(list(inputs))[0]:
            if isinstance(t, torch.Tensor):
                self._seen[t.untyped_storage()] = True

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self._seen:
                storage = t.untyped_storage()
                self._seen[storage] = True
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, storage.nbytes())
        return out


def transient_peak(name: str, fn: Callable, *args) -> list:
    """What `fn(*args)` (a backend written in torch ops, e.g. the `torch` backend's functions) holds
    at its peak beyond what it leaves alive (its outputs), measured by running it (on fake tensors
    when the arguments are fake), as one byte workspace: the intermediates of the reference's
    einsums and dtype conversions, without a formula to keep in step with elr_ext/reference.py."""
    with _AllocationPeak(args) as peak:
        out = fn(*args)
        extra = peak.peak - peak.live
        del out
    return [byte_workspace(name, extra)] if extra > 0 else []


def tracker_hooks(workspaces: Callable, ops: Iterable[str]) -> dict:
    """An op file's `workspaces(op, *args)` as the per-op hooks elr_ext.plan.tracker.StepTracker
    takes: {op name: fn(args, kwargs) -> [(shape, dtype)]}, for the current planned backend. A
    TorchDispatchMode does not see what a fake kernel allocates inside itself (the mode is off
    while the op it intercepts runs), so a tracker allocates these beside the op's outputs."""
    def hook(op: str) -> Callable:
        return lambda args, kwargs: [(w.shape, w.dtype) for w in workspaces(op, *args, **(kwargs or {}))]
    return {op: hook(op) for op in ops}
