"""Running simulated CUDA kernels from pytest (DESIGN.md 5): a forked child with a timeout, NaN-poisoned
shared-memory outputs, and the fp64-reference tolerance rule.

The child touches no torch code: it calls the ctypes library on pointers the parent prepared, writing
into shared-memory outputs the parent poisoned with NaN; the parent then checks. A kernel that hangs
fails its test instead of blocking the suite (the simulator itself aborts at once on a barrier or
shuffle that not every thread reaches).
"""

from __future__ import annotations

import os
import signal
import time
import traceback

import pytest
import torch

CHILD_TIMEOUT_S = 60.0


def run_in_child(fn, timeout=CHILD_TIMEOUT_S):
    """fn() in a forked child; fails the test on a crash, an exception or a timeout."""
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, leave without running atexit handlers
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"simulated kernel still running after {timeout:.0f} s (hang?)")
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        pytest.fail(f"simulated kernel crashed: {name} (see the captured stderr)")
    assert os.WEXITSTATUS(status) == 0, "simulation call raised in the child (see captured stderr)"


def poisoned(shape, dtype):
    """A NaN-filled contiguous output in shared memory (the child's writes reach the parent)."""
    return torch.full(shape, float("nan"), dtype=dtype).share_memory_()


def shared(t):
    """A contiguous shared-memory copy of t (an output the kernel accumulates onto)."""
    return t.detach().clone().contiguous().share_memory_()


def ptr(t):
    return None if t is None else t.data_ptr()


def assert_close(got, ref64, eager, name):
    """DESIGN.md 5: at most twice eager PyTorch's error in the same dtype; fp32 within 1e-5 relative,
    fp64 within 1e-10 relative; fp16/bf16 get one unit of their precision on top."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: element(s) left unwritten (NaN poison survived)"
    err = (got.double() - ref64).abs().max().item()
    base = (eager.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item() + 1e-30
    if got.dtype == torch.float64:
        bound = 1e-10 * scale
    elif got.dtype == torch.float32:
        bound = max(2 * base, 1e-5 * scale)
    else:
        bound = 2 * base + torch.finfo(got.dtype).eps * scale
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (eager {base:.3e}, scale {scale:.3e})"
