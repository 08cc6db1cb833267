"""Build the CPU simulations of the CUDA kernels (tests/cuda_sim/*_sim.cpp) as ctypes libraries.

Each library is compiled once per content: the file name carries a hash of every source it includes
(the sim entry point, cuda_sim.h and csrc/), so an edit anywhere rebuilds and an unchanged tree
reuses the cached .so. The cache lives in $ELR_CUDA_SIM_CACHE, else <repo>/.pytest_cache/cuda_sim,
else a folder under the system temp dir.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


class SimBuildUnavailable(RuntimeError):
    """No host compiler, or no CUDA headers for __half/__nv_bfloat16: the simulation cannot be built."""


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def _cache_dir() -> Path:
    if "ELR_CUDA_SIM_CACHE" in os.environ:
        path = Path(os.environ["ELR_CUDA_SIM_CACHE"])
    elif os.access(REPO, os.W_OK):
        path = REPO / ".pytest_cache" / "cuda_sim"
    else:
        path = Path(tempfile.gettempdir()) / f"elr_cuda_sim_{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sources_digest(entry: Path, flags: list[str]) -> str:
    digest = hashlib.sha256(" ".join(flags).encode())
    headers = sorted(p for p in CSRC.rglob("*") if p.suffix in {".h", ".cuh", ".hpp"})
    files = [entry, HERE / "cuda_sim.h", *headers]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_sim(name: str) -> Path:
    """Compile tests/cuda_sim/<name>.cpp into a shared library (cached) and return its path."""
    cxx = compiler()
    if cxx is None:
        raise SimBuildUnavailable("no C++ compiler (g++ or $CXX) found")
    include = CUDA_HOME / "include"
    if not (include / "cuda_fp16.h").exists():
        raise SimBuildUnavailable(f"{include}/cuda_fp16.h not found (set CUDA_HOME)")
    entry = HERE / f"{name}.cpp"
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra",
             f"-I{CSRC}", f"-I{HERE}", f"-I{include}"]
    target = _cache_dir() / f"{name}-{_sources_digest(entry, flags)}.so"
    if target.exists():
        return target
    tmp = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent builders each write their own, then rename
    result = subprocess.run([cxx, *flags, str(entry), "-o", str(tmp)], capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {entry.name} failed:\n{result.stderr[-8000:]}")
    os.replace(tmp, target)
    return target


_vp, _i64, _int, _dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


# The entry points every simulation library exports (ELR_CUDA_SIM_EXPORT_STATS() in cuda_sim.h):
# launch statistics, the simulated device (SM count, arch) and the launches it refused.
STATS_FUNCTIONS = {
    "elr_cuda_sim_stats": ([ctypes.POINTER(_i64)], None),
    "elr_cuda_sim_reset_stats": ([], None),
    "elr_cuda_sim_set_sm_count": ([_int], _int),
    "elr_cuda_sim_get_sm_count": ([], _int),
    "elr_cuda_sim_set_arch": ([_int], _int),
    "elr_cuda_sim_get_arch": ([], _int),
    "elr_cuda_sim_set_geometry_only": ([_int], None),
    "elr_cuda_sim_get_geometry_only": ([], _int),
    "elr_cuda_sim_launch_failures": ([ctypes.c_char_p, _i64], _i64),
    "elr_cuda_sim_reset_launch_failures": ([], None),
}

_LOADED: list[ctypes.CDLL] = []


def loaded_sims() -> list[ctypes.CDLL]:
    """Every simulation library load_sim has loaded in this process (the harness checks their
    refused launches after each child)."""
    return list(_LOADED)


def load_sim(name: str, functions: dict | None = None) -> ctypes.CDLL:
    """Build (cached) and load tests/cuda_sim/<name>.cpp. `functions` maps an exported C function to
    (argtypes, restype); the entry points of STATS_FUNCTIONS are declared too."""
    lib = ctypes.CDLL(str(build_sim(name)))
    for fname, (argtypes, restype) in {**STATS_FUNCTIONS, **(functions or {})}.items():
        fn = getattr(lib, fname)
        fn.argtypes = argtypes
        fn.restype = restype
    if all(lib._handle != other._handle for other in _LOADED):
        _LOADED.append(lib)
    return lib


def load_fdn_sim() -> ctypes.CDLL:
    """The FDN kernels on the CPU: elr_fdn_sim_forward / elr_fdn_sim_backward (see fdn_sim.cpp)
    plus the simulator's launch statistics."""
    return load_sim("fdn_sim", {
        "elr_fdn_sim_forward": ([_int, _i64, _i64, _i64, _i64, _int, _int, _int, _dbl] + [_vp] * 6, _int),
        "elr_fdn_sim_backward": ([_int, _i64, _i64, _i64, _i64, _int, _int, _int] + [_vp] * 9, _int),
        "elr_cuda_sim_shared_roundtrip": ([_i64, _int, _vp, _vp], None),
    })
