"""The CUDA kernels compile for sm_70 (V100), which nvcc 13 can no longer target.

NVRTC 12.x (the nvidia-cuda-nvrtc-cu12 wheel, with the headers of the nvidia-cuda-runtime-cu12 wheel;
.ci/setup installs both into build/nvrtc-cu12) compiles the torch-free kernel headers
csrc/kernels/fdn.cuh and kron_lora.cuh with ELR_EXT_NVRTC defined, which keeps their host launch
code, std headers and runtime API out of the translation unit, for compute_70 (PTX) and sm_70
(cubin). Every kernel is instantiated in every dtype the launchers instantiate it in, through
nvrtcAddNameExpression, and must come out under its lowered (mangled) name; the kernel tables here
must name every __global__ function of the headers and, where a built CUDA extension is there, be
exactly the set of kernels it ships. The compiler runs in a child process (libnvrtc.so.12 never
meets the CUDA 13 libraries torch loads), with the defines torch's build gives nvcc.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
HEADERS = {"fdn": "kernels/fdn.cuh", "kron_lora": "kernels/kron_lora.cuh"}
ARCH = "sm_70"

DTYPES = ("float", "double", "__half", "__nv_bfloat16")
VEC = "elr::cuda_common::kVec<{T}>"  # the 128-bit pack the launchers pick when alignment allows
# kernel -> the template arguments after T with which the launchers instantiate it ("" : none).
KERNELS = {
    "fdn": {
        "elr::fdn_detail::fdn_stats_kernel": ["1", VEC],
        "elr::fdn_detail::fdn_forward_apply_kernel": ["1", VEC],
        "elr::fdn_detail::fdn_backward_reduce_kernel": ["1", VEC],
        "elr::fdn_detail::fdn_backward_apply_kernel": ["1", VEC],
        "elr::fdn_detail::fdn_backward_affine_rows_kernel": ["1", VEC],
        "elr::fdn_detail::fdn_backward_affine_cols_kernel": [""],
        "elr::fdn_detail::fdn_backward_affine_cols_finalize_kernel": [""],
    },
    "kron_lora": {
        "elr::kron_detail::kron_fused_forward_kernel": ["true", "false"],
        "elr::kron_detail::kron_fused_backward_kernel": ["true", "false"],
        "elr::kron_detail::kron_sum_rows_kernel": [""],
        "elr::kron_detail::kron_mix_forward_kernel": [""],
        "elr::kron_detail::kron_mix_backward_kernel": [""],
        "elr::kron_detail::kron_delta_product_kernel": [""],
        "elr::kron_detail::kron_delta_expand_kernel": [""],
        "elr::kron_detail::kron_delta_grad_A_kernel": [""],
        "elr::kron_detail::kron_delta_grad_B_kernel": [""],
        "elr::kron_detail::kron_delta_grad_U_kernel": [""],
        "elr::kron_detail::kron_delta_grad_V_kernel": [""],
    },
}
# torch's BuildExtension passes these to nvcc for the shipped binary (its --expt-relaxed-constexpr
# has no NVRTC twin; -default-device makes the unannotated inline helpers, such as FdnShape's
# accessors, device functions, as host-and-device code needs under NVRTC).
OPTIONS = ["-std=c++20", "-default-device", "-lineinfo", "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def name_expressions(family):
    exprs = []
    for kernel, extras in KERNELS[family].items():
        for dtype in DTYPES:
            for extra in extras:
                args = dtype + (", " + extra.format(T=dtype) if extra else "")
                exprs.append(f"&{kernel}<{args}>")
    return exprs


# ---- Finding the CUDA 12 wheels ----------------------------------------------------------------
def wheel_roots():
    """Where the cu12 wheels may be: $ELR_EXT_NVRTC12_HOME, .ci/setup's --target folder, then the
    interpreter's site-packages (a plain `pip install`)."""
    roots = [os.environ.get("ELR_EXT_NVRTC12_HOME"), os.path.join(ROOT, "build", "nvrtc-cu12")]
    roots += [p for p in sys.path if p.endswith("site-packages")]
    return [r for r in roots if r]


def find_nvrtc12():
    """(libnvrtc.so.12, the cu12 runtime's include dir) or None with the reason."""
    missing = []
    for root in wheel_roots():
        libs = sorted(glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.12*")))
        include = os.path.join(root, "nvidia", "cuda_runtime", "include")
        if libs and os.path.exists(os.path.join(include, "cuda_fp16.h")):
            return (libs[0], include), None
        missing.append(root)
    return None, ("the nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12 wheels are not installed (looked in "
                  + ", ".join(missing) + "; .ci/setup installs them into build/nvrtc-cu12)")


# ---- The child: NVRTC through ctypes -----------------------------------------------------------
def nvrtc_compile(lib_path, source, options, expressions, cubin_path):
    """Compiles `source` with NVRTC; returns a JSON-able dict: result, log, lowered names (by
    expression), the PTX text, and the cubin's size (the cubin itself goes to cubin_path)."""
    nv = ctypes.CDLL(lib_path)
    nv.nvrtcGetErrorString.restype = ctypes.c_char_p
    major, minor = ctypes.c_int(), ctypes.c_int()
    nv.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    count = ctypes.c_int()
    nv.nvrtcGetNumSupportedArchs(ctypes.byref(count))
    archs = (ctypes.c_int * count.value)()
    nv.nvrtcGetSupportedArchs(archs)
    out = {"version": [major.value, minor.value], "archs": list(archs)}

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what}: {nv.nvrtcGetErrorString(rc).decode()}")

    prog = ctypes.c_void_p()
    check(nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"elr_ext_nvrtc.cu", 0, None, None),
          "nvrtcCreateProgram")
    try:
        for expr in expressions:
            check(nv.nvrtcAddNameExpression(prog, expr.encode()), f"nvrtcAddNameExpression({expr})")
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = nv.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetProgramLog(prog, log)
        out.update(result=nv.nvrtcGetErrorString(rc).decode(), ok=rc == 0, log=log.value.decode(errors="replace"))
        if rc != 0:
            return out
        lowered = {}
        for expr in expressions:
            name = ctypes.c_char_p()
            check(nv.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(name)), f"nvrtcGetLoweredName({expr})")
            lowered[expr] = name.value.decode()
        out["lowered"] = lowered
        nv.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        check(nv.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        out["ptx"] = ptx.value.decode(errors="replace")
        check(nv.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        check(nv.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        with open(cubin_path, "wb") as f:
            f.write(cubin.raw)
        out.update(cubin_size=size.value, cubin=cubin_path)
        return out
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


class Compiles:
    """One NVRTC child per family for sm_70 (its PTX is the compute_70 PTX, its cubin the sm_70 code),
    all started at once so that the families compile side by side; results by family."""

    def __init__(self, folder):
        found, self.skip_reason = find_nvrtc12()
        self.children, self.results = {}, {}
        if found is None:
            return
        lib, include = found
        for family in sorted(HEADERS):
            source = f"#define ELR_EXT_NVRTC 1\n#include \"{HEADERS[family]}\"\n"
            request = {"lib": lib, "source": source, "cubin_path": str(folder / f"{family}_{ARCH}.cubin"),
                       "result_path": str(folder / f"{family}.json"),
                       "options": OPTIONS + [f"--gpu-architecture={ARCH}", f"-I{CSRC}", f"-I{include}"],
                       "expressions": name_expressions(family)}
            (folder / f"{family}.request.json").write_text(json.dumps(request))
            stderr = open(folder / f"{family}.stderr", "w+")
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(folder / f"{family}.request.json")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
            self.children[family] = (child, stderr, request["result_path"], time.monotonic())

    def get(self, family):
        if self.skip_reason:
            pytest.skip(self.skip_reason)
        if family not in self.results:
            child, stderr, result_path, started = self.children[family]
            try:
                child.wait(timeout=900)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                pytest.fail(f"NVRTC on {HEADERS[family]} still running after 900 s")
            stderr.seek(0)
            assert child.returncode == 0, f"the NVRTC child failed:\n{stderr.read()[-4000:]}"
            with open(result_path) as f:
                out = json.load(f)
            out["seconds"] = round(time.monotonic() - started, 1)
            self.results[family] = out
        return self.results[family]

    def close(self):
        for child, stderr, _, _ in self.children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
            stderr.close()


@pytest.fixture(scope="module")
def nvrtc(tmp_path_factory):
    compiles = Compiles(tmp_path_factory.mktemp("nvrtc_sm70"))
    yield compiles
    compiles.close()


# ---- Tests ---------------------------------------------------------------------------------------
def declared_kernels(header):
    """The __global__ function names a kernel header declares."""
    with open(os.path.join(CSRC, header)) as f:
        text = f.read()
    return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*|\w+\s+)*(\w+)\s*\(", text))


@pytest.mark.parametrize("family", sorted(HEADERS))
def test_kernel_tables_name_every_kernel_of_the_headers(family):
    listed = {name.rsplit("::", 1)[1] for name in KERNELS[family]}
    declared = declared_kernels(HEADERS[family])
    assert declared, f"no __global__ function found in {HEADERS[family]}"
    assert listed == declared, (f"{HEADERS[family]}: kernels not in this test's table {sorted(declared - listed)}, "
                                f"listed but gone {sorted(listed - declared)}")


@pytest.mark.parametrize("family", sorted(HEADERS))
def test_kernels_compile_for_sm70_with_nvrtc12(nvrtc, family):
    """compute_70 PTX (what a driver JIT-compiles on a V100) and an sm_70 cubin (what a CUDA 12 build
    would ship), with every kernel in every dtype present under its lowered name."""
    out = nvrtc.get(family)
    assert out["version"][0] == 12, f"NVRTC {out['version']} is not a CUDA 12.x NVRTC"
    assert 70 in out["archs"], f"NVRTC {out['version']} cannot target sm_70: {out['archs']}"
    assert out["ok"], f"NVRTC {out['result']} on {HEADERS[family]} for {ARCH}:\n{out['log'][-6000:]}"
    assert set(out["lowered"]) == set(name_expressions(family))
    assert ".target sm_70" in out["ptx"], "the PTX is not compute_70 code"
    entries = set(re.findall(r"\.entry\s+(\w+)\s*\(", out["ptx"]))
    missing = sorted(e for e, name in out["lowered"].items() if name not in entries)
    assert not missing, f"{len(missing)} kernels without a PTX entry, e.g. {missing[:5]}"
    with open(out["cubin"], "rb") as f:
        cubin = f.read()
    assert cubin[:4] == b"\x7fELF" and len(cubin) == out["cubin_size"], "nvrtcGetCUBIN gave no ELF cubin"
    absent = sorted(e for e, name in out["lowered"].items() if name.encode() not in cubin)
    assert not absent, f"{len(absent)} kernels missing from the sm_70 cubin, e.g. {absent[:5]}"


@pytest.mark.parametrize("family", sorted(HEADERS))
def test_sm70_hot_kernels_neither_spill_nor_use_local_memory(nvrtc, family):
    """test_cuda_resources' rule for the one arch the shipped binary lacks, on NVRTC 12's sm_70 cubin."""
    from test_cuda_resources import local_memory_users, resource_table

    out = nvrtc.get(family)
    assert out["ok"], out["log"][-4000:]
    try:
        records = load_setup_module().cuda_resource_usage(out["cubin"], arch=ARCH)
    except RuntimeError as err:
        pytest.skip(str(err))
    assert {r["name"] for r in records} == set(out["lowered"].values())
    print(resource_table(records))
    # NVRTC 12.3+ declares cuda_bf16.h's conversions as out-of-line __device__ functions, so
    # __float2bfloat16_rn stays a call with two by-reference locals (an 8-byte frame) where nvcc
    # inlines it; this kernel builds dW once per step (weight-sized work), not per token.
    nvrtc_call_frames = [r for r in records if "kron_delta_expand" in r["name"] and "nv_bfloat16" in r["name"]]
    assert all(r["stack"] <= 8 and not r["local"] for r in nvrtc_call_frames), resource_table(nvrtc_call_frames)
    exempt = {r["name"] for r in nvrtc_call_frames}
    offenders = local_memory_users([r for r in records if r["name"] not in exempt])
    assert not offenders, f"{len(offenders)} hot kernels use a stack frame or local memory on sm_70:\n" + "\n".join(
        offenders)


def built_cuda_extension():
    spec = importlib.util.find_spec("elr_ext")
    folder = os.path.dirname(spec.origin) if spec and spec.origin else os.path.join(ROOT, "elr_ext")
    found = sorted(glob.glob(os.path.join(folder, "_C_cuda*.so")))
    return found[0] if found else None


def load_setup_module():
    spec = importlib.util.spec_from_file_location("elr_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", sorted(HEADERS))
def test_nvrtc_compiles_exactly_the_kernels_the_extension_ships(nvrtc, family):
    """The kernel tables are the shipped binary's kernels, mangled names and all: NVRTC's sm_70
    build is the build of the same code, not of a hand-picked subset."""
    binary = built_cuda_extension()
    if binary is None:
        pytest.skip("no CUDA extension built (elr_ext/_C_cuda*.so)")
    setup = load_setup_module()
    try:
        records = setup.cuda_resource_usage(binary)
    except RuntimeError as err:
        pytest.skip(str(err))
    prefix = {"fdn": "_ZN3elr10fdn_detail", "kron_lora": "_ZN3elr11kron_detail"}[family]
    shipped = {r["name"] for r in records if r["name"].startswith(prefix)}
    assert shipped, f"no {family} kernel in {binary}"
    out = nvrtc.get(family)
    assert out["ok"], out["log"][-4000:]
    compiled = set(out["lowered"].values())
    assert compiled == shipped, (f"shipped but not in the NVRTC table: {sorted(shipped - compiled)[:8]}; "
                                 f"in the table, not shipped: {sorted(compiled - shipped)[:8]}")


if __name__ == "__main__":  # an NVRTC child of Compiles: argv[1] is the request, written back as asked
    with open(sys.argv[1]) as f:
        req = json.load(f)
    result = nvrtc_compile(req["lib"], req["source"], req["options"], req["expressions"], req["cubin_path"])
    with open(req["result_path"], "w") as f:
        json.dump(result, f)
