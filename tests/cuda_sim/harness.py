"""Running simulated CUDA kernels from pytest (docs/testing.md): a forked child with a timeout, NaN-poisoned
shared-memory outputs, the fp64-reference tolerance rule, and the simulated device's SM count and arch.

The child touches no torch code: it calls the ctypes library on pointers the parent prepared, writing
into shared-memory outputs the parent poisoned with NaN; the parent then checks. A kernel that hangs
fails its test instead of blocking the suite (the simulator itself aborts at once on a barrier or
shuffle that not every thread reaches). A launch the simulator refused as a GPU would (more than
48 KB of dynamic shared memory without the cudaFuncSetAttribute opt-in, more than the arch allows,
bad grid or block dimensions) fails the test too, with the simulator's message, unless the test
passes allow_launch_failures=True.

The simulated device (the same switch for every simulation library, FDN and Kronecker LoRA alike):

    from cuda_sim.harness import SM_COUNTS, simulated_device

    @pytest.mark.parametrize("sm_count", SM_COUNTS)         # 80, 108, 132: V100, A100, H100 SXM
    def test_something(sim, sm_count):
        with simulated_device(sim, sm_count=sm_count, arch=90):
            run_in_child(child)                              # the fork inherits the setting

It sets what cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount / ...ComputeCapability... /
...MaxSharedMemoryPerBlockOptin) and cudaGetDeviceProperties answer and which shared-memory limit
launches are checked against (ARCH_SHARED_OPTIN_BYTES), and restores the previous device on exit.
Outside of it the device is $ELR_CUDA_SIM_SM_COUNT SMs (default 4: launchers that size grids by the
SM count keep simulated grids short) of arch $ELR_CUDA_SIM_ARCH (default 80). The raw entry points
are elr_cuda_sim_set_sm_count / elr_cuda_sim_set_arch (and get_) of every library (cuda_sim.h).

A grid sized for a 100-SM GPU has hundreds of blocks per kernel, and a simulated 256-thread block
costs milliseconds (tens under load): simulated_device(..., geometry_only=True) checks and counts
every launch (elr_cuda_sim_stats) without running a block, so the launchers' geometry at real
problem sizes and SM counts costs nothing; the kernels' results at the same blocks-per-group or
split counts are then checked on fewer groups.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
import traceback

import pytest
import torch

from .build import loaded_sims

CHILD_TIMEOUT_S = 60.0

# SM counts of the GPUs the kernels are tuned for: V100 (80), A100 (108), H100 SXM (132).
SM_COUNTS = (80, 108, 132)
# The per-block dynamic shared memory each simulated arch allows after the opt-in (cuda_sim.h,
# from the CUDA C++ Programming Guide's per-compute-capability table); 48 KB without it.
ARCH_SHARED_OPTIN_BYTES = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                           90: 227 * 1024}
DEFAULT_DYNAMIC_SHARED_BYTES = 48 * 1024


@contextlib.contextmanager
def simulated_device(lib, sm_count: int | None = None, arch: int | None = None, geometry_only: bool | None = None):
    """Within the block, `lib`'s simulated GPU has `sm_count` SMs and compute capability `arch`
    (70, 75, 80, 86, 89 or 90), and with geometry_only=True launches are checked and counted but
    run nothing; None keeps the current value. Set it in the parent, around run_in_child: the
    forked child inherits it."""
    before = (lib.elr_cuda_sim_get_sm_count(), lib.elr_cuda_sim_get_arch(), lib.elr_cuda_sim_get_geometry_only())
    try:
        if sm_count is not None and lib.elr_cuda_sim_set_sm_count(int(sm_count)) != 0:
            raise ValueError(f"simulated SM count must be positive, got {sm_count}")
        if arch is not None and lib.elr_cuda_sim_set_arch(int(arch)) != 0:
            raise ValueError(f"no simulated arch {arch}; known: {sorted(ARCH_SHARED_OPTIN_BYTES)}")
        if geometry_only is not None:
            lib.elr_cuda_sim_set_geometry_only(int(bool(geometry_only)))
        yield lib
    finally:
        lib.elr_cuda_sim_set_sm_count(before[0])
        lib.elr_cuda_sim_set_arch(before[1])
        lib.elr_cuda_sim_set_geometry_only(before[2])


def launch_failures(lib) -> tuple[int, str]:
    """(launches `lib` refused since the last reset, the latest one's message)."""
    msg = ctypes.create_string_buffer(512)
    count = lib.elr_cuda_sim_launch_failures(msg, len(msg))
    return int(count), msg.value.decode(errors="replace")


def _check_launches(allow_launch_failures):
    for lib in loaded_sims():
        count, msg = launch_failures(lib)
        if count and not allow_launch_failures:
            raise AssertionError(f"{count} simulated launch(es) refused, as a GPU would refuse them; latest: {msg}")


def run_in_child(fn, timeout=CHILD_TIMEOUT_S, allow_launch_failures=False):
    """fn() in a forked child; fails the test on a crash, an exception, a timeout or (unless
    allow_launch_failures) a launch the simulator refused."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, leave without running atexit handlers
        os.close(read_end)
        code = 0
        try:
            for lib in loaded_sims():
                lib.elr_cuda_sim_reset_launch_failures()
            fn()
            _check_launches(allow_launch_failures)
        except BaseException:
            report = traceback.format_exc()
            print(report, end="", file=sys.stderr, flush=True)
            os.write(write_end, report.encode(errors="replace")[-8000:])  # within the pipe buffer: no block
            code = 1
        os._exit(code)
    os.close(write_end)
    try:
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
        report = os.read(read_end, 16384).decode(errors="replace")
    finally:
        os.close(read_end)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        pytest.fail(f"simulated kernel crashed: {name} (see the captured stderr)")
    last = report.strip().splitlines()[-1] if report.strip() else "see the captured stderr"
    assert os.WEXITSTATUS(status) == 0, f"simulation call raised in the child: {last}"


def poisoned(shape, dtype):
    """A NaN-filled contiguous output in shared memory (the child's writes reach the parent)."""
    return torch.full(shape, float("nan"), dtype=dtype).share_memory_()


def shared(t):
    """A contiguous shared-memory copy of t (an output the kernel accumulates onto)."""
    return t.detach().clone().contiguous().share_memory_()


def ptr(t):
    return None if t is None else t.data_ptr()


def assert_close(got, ref64, eager, name):
    """The rule of docs/testing.md: at most twice eager PyTorch's error in the same dtype; fp32 within
    1e-5 relative, fp64 within 1e-10 relative; fp16/bf16 get one unit of their precision on top."""
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
