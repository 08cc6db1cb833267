"""Build elr-ext: the CPU C++ extension always (where a C++ compiler exists), the CUDA extension
when torch has CUDA and nvcc is found.

Switches (the ones flash-attention and xformers users know):
  ELR_EXT_NO_BUILD=1                  pure-Python install (the `torch` reference backend only)
  ELR_EXT_CUDA_ARCHS / TORCH_CUDA_ARCH_LIST   e.g. "7.0;8.0;9.0+PTX"
  ELR_EXT_NO_CUDA=1                   skip the CUDA extension even when it could build
  MAX_JOBS                            parallel compile jobs (honoured by ninja via torch)

Install with `pip install -e . --no-build-isolation` after torch is installed. Everything the build
decided (backends, CUDA version, archs, what it dropped and why) is printed and written to
elr_ext/_build_info.json, which `elr_ext.build_info()` reads.

The CUDA kernels' resources: ptxas reports every kernel's registers, stack frame, spill stores and
loads and shared memory per arch as it compiles (`-Xptxas -v`, in the build log), and after the
build `cuobjdump --dump-resource-usage` on the built elr_ext/_C_cuda*.so gives the same per kernel
and arch (REG, STACK, SHARED, LOCAL): one "[elr-ext cuda-resources]" log line each, the table in
build/cuda_resources.json and a summary under "cuda_resources" in _build_info.json.
tests/test_cuda_resources.py checks the shipped binary with the same parser.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0+PTX"]


def log(msg):
    print(f"[elr-ext build] {msg}", flush=True)


def truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """CUDA_HOME, resolving the trap of a wrapper script in /usr/local/bin that makes torch guess
    /usr/local: prefer $CUDA_HOME, then /usr/local/cuda, then nvcc's real location."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def nvcc_supported_archs(nvcc):
    """Compute capabilities nvcc can target, from `nvcc --list-gpu-arch` (e.g. compute_75 -> 7.5)."""
    res = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    caps = set()
    for token in res.stdout.split():
        match = re.fullmatch(r"compute_(\d+)(\d)[a-z]?", token.strip())
        if match:
            caps.add(f"{match.group(1)}.{match.group(2)}")
    return caps


def choose_archs(nvcc, cuda_version):
    requested = os.environ.get("ELR_EXT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    archs = re.split(r"[;\s,]+", requested.strip()) if requested else list(DEFAULT_ARCHS)
    archs = [a for a in archs if a]
    supported = nvcc_supported_archs(nvcc)
    kept, dropped = [], []
    for arch in archs:
        base = arch.replace("+PTX", "")
        if supported is not None and base not in supported:
            why = f"nvcc {cuda_version[0]}.{cuda_version[1]} cannot target sm_{base.replace('.', '')}"
            if base == "7.0":
                why += " (CUDA 13 removed sm_70; build V100 kernels with a CUDA 12.x toolkit)"
            dropped.append({"arch": arch, "reason": why})
        else:
            kept.append(arch)
    return kept, dropped


def cuda_library_include_dirs():
    """Headers of the pip `nvidia` wheels (cusparse.h, cublas_v2.h ...) that torch's CUDA headers
    include but a bare toolkit may lack."""
    import torch

    # torch's own site-packages first: in a venv with --system-site-packages the wheels sit beside torch,
    # not in the venv's purelib
    roots = [os.path.dirname(os.path.dirname(torch.__file__)), sysconfig.get_paths()["purelib"]]
    found = []
    for root in dict.fromkeys(roots):
        found += sorted(d for d in glob.glob(os.path.join(root, "nvidia", "cu*", "include")) if os.path.isdir(d))
    return found


def sources(folder, patterns):
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join("csrc", folder, pattern))
    return sorted(found)


def extensions_and_info():
    info = {"backends_built": [], "skipped": {}, "cuda": None}
    if truthy("ELR_EXT_NO_BUILD"):
        info["skipped"]["cpu"] = "ELR_EXT_NO_BUILD=1: pure-Python install"
        info["skipped"]["cuda"] = "ELR_EXT_NO_BUILD=1: pure-Python install"
        return [], {}, info

    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch
    from torch.utils import cpp_extension

    ext_modules = []
    cxx = os.environ.get("CXX", "c++")
    cxx_flags = ["-O3"]  # torch adds the C++ standard it needs (C++17 up to 2.9, C++20 after)
    # at::parallel_for is an inline `#pragma omp parallel`: without -fopenmp it runs serially.
    # libgomp resolves to the copy torch ships and has already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    if shutil.which(cxx) is None:
        info["skipped"]["cpu"] = f"no C++ compiler ({cxx}) found"
    else:
        ext_modules.append(
            cpp_extension.CppExtension(
                "elr_ext._C",
                ["csrc/ops.cpp"] + sources("cpu", ["*.cpp"]),
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": cxx_flags + openmp},
                extra_link_args=openmp,
            )
        )
        info["backends_built"].append("cpu")

    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if truthy("ELR_EXT_NO_CUDA"):
        info["skipped"]["cuda"] = "ELR_EXT_NO_CUDA=1"
    elif torch.version.cuda is None:
        info["skipped"]["cuda"] = f"torch {torch.__version__} is a CPU-only build"
    elif nvcc is None:
        info["skipped"]["cuda"] = "nvcc not found (set CUDA_HOME)"
    elif "cpu" not in info["backends_built"]:
        info["skipped"]["cuda"] = "the CUDA extension needs the CPU extension (op schemas)"
    else:
        version = nvcc_version(nvcc)
        archs, dropped = choose_archs(nvcc, version)
        for d in dropped:
            log(f"dropping CUDA arch {d['arch']}: {d['reason']}")
        if not archs:
            info["skipped"]["cuda"] = "no requested CUDA arch is supported by nvcc"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
            arch_string = ";".join(archs)
            defines = [f'-DELR_EXT_CUDA_ARCHS="{arch_string}"']
            ext_modules.append(
                cpp_extension.CUDAExtension(
                    "elr_ext._C_cuda",
                    sources("cuda", ["*.cpp", "*.cu"]) + sources("kernels", ["*.cu"]),
                    include_dirs=[os.path.join(HERE, "csrc")] + cuda_library_include_dirs(),
                    extra_compile_args={
                        "cxx": cxx_flags + defines,
                        "nvcc": ["-O3", "-lineinfo", "-Xptxas", "-v"] + defines,
                    },
                )
            )
            info["backends_built"].append("cuda")
            info["cuda"] = {
                "toolkit": f"{version[0]}.{version[1]}" if version else "unknown",
                "torch_cuda": torch.version.cuda,
                "cuda_home": cuda_home,
                "archs": archs,
                "dropped_archs": dropped,
            }
    for backend, why in info["skipped"].items():
        log(f"not building the {backend} extension: {why}")
    log(f"building: {', '.join(info['backends_built']) or 'nothing (pure Python)'}")
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExtReportingCudaResources(base):
        def run(self):
            super().run()
            for ext in self.extensions:
                if ext.name == "elr_ext._C_cuda":
                    report_cuda_resources(self.get_ext_fullpath(ext.name), info)
                    # build_py copied _build_info.json before the extensions were built: a wheel
                    # gets the file with the resources summary from build_lib
                    staged = os.path.join(self.build_lib, "elr_ext", "_build_info.json")
                    source = os.path.join(HERE, "elr_ext", "_build_info.json")
                    if os.path.isdir(os.path.dirname(staged)) and not os.path.samefile(os.path.dirname(staged),
                                                                                       os.path.dirname(source)):
                        shutil.copyfile(source, staged)

    return ext_modules, {"build_ext": BuildExtReportingCudaResources}, info


# ---- CUDA kernel resources (cuobjdump) ----------------------------------------------------------
def find_cuobjdump():
    """$ELR_EXT_CUOBJDUMP, the toolkit's, PATH's, else the copy triton ships (torch's CUDA wheels
    bring triton; a toolkit without its binary utilities has no cuobjdump)."""
    candidates = [os.environ.get("ELR_EXT_CUOBJDUMP")]
    cuda_home = os.environ.get("CUDA_HOME") or find_cuda_home()
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    except (ImportError, ValueError):
        pass
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


_RESOURCE_LINE = re.compile(r"(\w+)(?:\[\d+\])?:(\d+)")


def parse_resource_usage(text, arch=None):
    """`cuobjdump --dump-resource-usage` output -> one dict per (elf arch, function): arch ("sm_90"),
    name (mangled), reg, stack, shared, local (bytes; registers a count). The PTX sections of a fat
    binary carry no resources and are skipped; a bare cubin names no arch: pass it."""
    records, function, elf = [], None, True
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Fatbin "):
            arch, function = None, None
            elf = line.startswith("Fatbin elf code")
        elif line.startswith("arch = ") and elf:
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function ") and line.endswith(":"):
            function = line[len("Function "):-1]
        elif function and arch and line.startswith("REG:"):
            fields = {k.lower(): int(v) for k, v in _RESOURCE_LINE.findall(line)}
            records.append({"arch": arch, "name": function, "reg": fields.get("reg", 0),
                            "stack": fields.get("stack", 0), "shared": fields.get("shared", 0),
                            "local": fields.get("local", 0)})
            function = None
    return records


def demangle(names):
    """Readable names through c++filt where binutils has it, else the mangled ones."""
    names = list(names)
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return out if res.returncode == 0 and len(out) == len(names) else names


def cuda_resource_usage(binary, cuobjdump=None, arch=None):
    """Per-kernel, per-arch resources of a built CUDA binary or cubin (`arch` for a cubin; see
    parse_resource_usage), each with its demangled name as "kernel"; raises RuntimeError when
    cuobjdump is missing or fails."""
    cuobjdump = cuobjdump or find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError("no cuobjdump (CUDA_HOME/bin, PATH or triton's copy; or set ELR_EXT_CUOBJDUMP)")
    res = subprocess.run([cuobjdump, "--dump-resource-usage", binary], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cuobjdump} --dump-resource-usage {binary} failed: {res.stderr.strip()[-2000:]}")
    records = parse_resource_usage(res.stdout, arch)
    for record, readable in zip(records, demangle(r["name"] for r in records)):
        record["kernel"] = readable
    return records


def report_cuda_resources(binary, info, root=HERE):
    """Logs the built binary's per-kernel resources and writes them to <root>/build/cuda_resources.json
    and a summary to _build_info.json. A missing cuobjdump is reported, never fatal."""
    summary = {"binary": os.path.basename(binary), "table": os.path.join("build", "cuda_resources.json")}
    try:
        records = cuda_resource_usage(binary)
    except RuntimeError as err:
        log(f"CUDA kernel resources not reported: {err}")
        summary["error"] = str(err)
        records = None
    if records is not None:
        for r in sorted(records, key=lambda r: (r["kernel"], r["arch"])):
            print(f"[elr-ext cuda-resources] {r['arch']} REG {r['reg']:3d} STACK {r['stack']:5d} "
                  f"SHARED {r['shared']:6d} LOCAL {r['local']:5d}  {r['kernel']}", flush=True)
        local = sorted({f"{r['kernel']} ({r['arch']}: stack {r['stack']}, local {r['local']})"
                        for r in records if r["stack"] or r["local"]})
        archs = sorted({r["arch"] for r in records})
        top = max(records, key=lambda r: r["reg"], default=None)
        summary.update({"kernels": len({r["name"] for r in records}), "archs": archs,
                        "max_registers": top["reg"] if top else 0,
                        "local_memory": local})
        log(f"CUDA kernel resources: {summary['kernels']} kernels on {', '.join(archs)}; at most "
            f"{summary['max_registers']} registers" + (f" ({top['kernel']}, {top['arch']})" if top else "") +
            f"; stack/local memory (spills) in {len(local)} kernel-arch pair(s)")
        for entry in local:
            print(f"[elr-ext cuda-resources] local memory: {entry}", flush=True)
        os.makedirs(os.path.join(root, "build"), exist_ok=True)
        path = os.path.join(root, "build", "cuda_resources.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"binary": binary, "kernels": records}, f, indent=1)
        os.replace(path + ".tmp", path)
    if info.get("cuda"):
        info["cuda"]["resources"] = summary
        write_build_info(info, root)


def write_build_info(info, root=HERE):
    path = os.path.join(root, "elr_ext", "_build_info.json")
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":  # importable by tests without building
    ext_modules, cmdclass, build_info = extensions_and_info()
    write_build_info(build_info)

    setup(
        name="elr-ext",
        version="0.1.0",
        description="Kernel-accelerated PyTorch extension for ELR-Diffusion (efficient low-rank controllable diffusion)",
        packages=find_packages(include=["elr_ext", "elr_ext.*"]),
        package_data={"elr_ext": ["_build_info.json"]},
        python_requires=">=3.9",
        install_requires=["torch>=2.4", "numpy"],
        extras_require={
            # upper bounds: the next major versions are untested; constraints.txt pins what the README used
            "train": ["diffusers<1", "transformers<6", "safetensors", "accelerate<2", "tensorboard",
                      "opencv-python-headless<6", "webdataset", "tqdm", "pyyaml", "torchmetrics", "torch-fidelity",
                      "pillow", "scipy",
                      # --optimizer adamw8bit: 0.50 is the first release whose 8-bit optimisers run on CPU
                      # tensors; it needs Python >= 3.10 (on 3.9 the flag reports bitsandbytes missing)
                      "bitsandbytes>=0.50,<1; python_version >= '3.10'"],
            # wandb: --report-to wandb, tested offline (WANDB_MODE=offline)
            "test": ["pytest", "matplotlib", "peft", "lycoris-lora", "wandb<1"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
