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
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import threading
import warnings
from typing import Iterable, Iterator

import torch

BACKENDS = ("cuda", "cpu", "triton", "torch")
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

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


def _triton_reason(device_type: str) -> str | None:
    """None when Triton can run on this device type, else why not."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not installed"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton runs on the CPU only under TRITON_INTERPRET=1"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        if torch.cuda.get_device_capability() < (8, 0):
            return "Triton kernels need compute capability 8.0 or newer"
        return None
    return f"Triton does not run on {device_type}"


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None when `backend` can run on `device_type`, else a sentence saying why not."""
    _load_native()
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend does not run on {device_type} tensors"
        return _missing.get("cpu")
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend does not run on {device_type} tensors"
        if _missing.get("cuda"):
            return _missing["cuda"]
        return None if torch.cuda.is_available() else "built, but no CUDA device is present"
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


def select(op: str, device: torch.device, implemented: Iterable[str]) -> str:
    """The backend that runs `op` on `device`, among the backends that implement it."""
    implemented = tuple(implemented)
    device_type = device.type
    requested = requested_backend()
    if requested is not None:
        reason = unavailable_reason(requested, device_type)
        if reason is None and requested not in implemented:
            reason = f"{op} has no {requested} implementation"
        if reason is None:
            return requested
        key = (op, requested, device_type)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"elr_ext: backend {requested!r} requested for {op} on {device_type} but {reason}; "
                "using the default backend",
                RuntimeWarning,
                stacklevel=4,
            )
    for backend in _PREFERENCE.get(device_type, ("torch",)):
        if backend in implemented and unavailable_reason(backend, device_type) is None:
            return backend
    return "torch"


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
