"""The build and the package's promises about it: what was compiled, arch selection, and an import
that survives a missing native part."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import elr_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_setup_module():
    spec = importlib.util.spec_from_file_location("elr_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


def fake_nvcc(tmp_path, archs):
    path = tmp_path / "nvcc"
    path.write_text("#!/bin/sh\necho '" + " ".join(f"compute_{a}" for a in archs) + "'\n")
    path.chmod(0o755)
    return str(path)


def test_default_arch_list_drops_sm70_on_cuda13_and_says_why(tmp_path, monkeypatch):
    setup = load_setup_module()
    monkeypatch.delenv("ELR_EXT_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    kept, dropped = setup.choose_archs(fake_nvcc(tmp_path, [75, 80, 86, 89, 90, 100]), (13, 0))
    assert kept == ["7.5", "8.0", "8.6", "8.9", "9.0+PTX"]
    assert [d["arch"] for d in dropped] == ["7.0"] and "12.x" in dropped[0]["reason"]


def test_cuda12_keeps_sm70_and_env_overrides(tmp_path, monkeypatch):
    setup = load_setup_module()
    nvcc = fake_nvcc(tmp_path, [50, 60, 70, 75, 80, 86, 89, 90])
    monkeypatch.delenv("ELR_EXT_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert setup.choose_archs(nvcc, (12, 4))[0] == ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0+PTX"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")
    assert setup.choose_archs(nvcc, (12, 4)) == (["8.0", "9.0+PTX"], [])
    monkeypatch.setenv("ELR_EXT_CUDA_ARCHS", "7.0;12.0")  # ELR_EXT_CUDA_ARCHS wins
    kept, dropped = setup.choose_archs(nvcc, (12, 4))
    assert kept == ["7.0"] and dropped[0]["arch"] == "12.0"


def test_build_info_reports_what_was_built():
    info = elr_ext.build_info()
    compiled = info["compiled"]
    if not compiled:
        pytest.skip("source tree not built (pip install -e . --no-build-isolation)")
    for backend in ("cpu", "cuda"):
        if backend in compiled["backends_built"]:
            assert f"{backend}_binary" in info, f"{backend} was built but its binary does not import"
        else:
            assert compiled["skipped"][backend], "a skipped backend says why"
    if "cpu" in compiled["backends_built"]:
        assert "cpu" in elr_ext.available_backends("cpu")
        assert info["cpu_binary"]["torch_version"] == torch.__version__.split("+")[0]
        assert info["cpu_binary"]["openmp"], "the CPU kernels must be built with OpenMP (at::parallel_for)"
    assert info["backends"]["torch"]["available_on"] == ["cuda", "cpu"]


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None and not os.path.exists(
    "/usr/local/cuda/bin/nvcc"), reason="torch without CUDA, or no nvcc: the CUDA extension is not built here")
def test_cuda_extension_compiles_links_and_registers_its_kernels():
    info = elr_ext.build_info()
    assert "cuda" in info["compiled"]["backends_built"], info["compiled"]["skipped"]
    assert info["cuda_binary"]["archs"] == ";".join(info["compiled"]["cuda"]["archs"])
    for op in ("fdn_forward", "fdn_backward"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"elr_ext_native::{op}", key), (op, key)


IMPORT_WITHOUT_NATIVE = """
import importlib.abc, sys, warnings

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("elr_ext._C", "elr_ext._C_cuda"):
            raise ImportError("blocked by the test: " + name)

sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, elr_ext
    z = torch.randn(2, 4, 3, 3)
    out = elr_ext.fdn(z, z.clone(), z.clone(), num_groups=2)
    out = elr_ext.fdn(z, z.clone(), z.clone(), num_groups=2)
messages = [str(w.message) for w in caught if "elr_ext" in str(w.message)]
assert len(messages) == 1, messages
assert "reference" in messages[0] and "build_info" in messages[0], messages[0]
assert elr_ext.available_backends("cpu") == ["torch"]
print("fell back:", elr_ext.build_info()["backends"]["cpu"]["missing_because"]["cpu"])
"""


def test_import_without_native_parts_warns_once_and_falls_back():
    res = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_NATIVE], capture_output=True, text=True, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if k != "ELR_EXT_BACKEND"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "blocked by the test" in res.stdout


# ---- CUDA kernel resources in the build log ---------------------------------------------------------
CUOBJDUMP_SAMPLE = """
Fatbin elf code:
================
arch = sm_75
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN3elr10fdn_detail16fdn_stats_kernelIfLi4EEEvNS0_6TilingEPKT_PNS_7AccTypeIS3_E4typeE:
  REG:40 STACK:0 SHARED:96 LOCAL:0 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN3elr11kron_detail20kron_mix_forward_kernelIfEEvNS_9KronShapeEPKT_S5_PS3_:
  REG:80 STACK:24 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin ptx code:
================
arch = sm_90
code version = [9,0]
compressed
"""


def fake_cuobjdump(tmp_path):
    path = tmp_path / "cuobjdump"
    path.write_text("#!/bin/sh\ncat <<'EOF'\n" + CUOBJDUMP_SAMPLE + "EOF\n")
    path.chmod(0o755)
    return str(path)


def test_parse_resource_usage_reads_elf_sections_and_skips_ptx():
    setup = load_setup_module()
    records = setup.parse_resource_usage(CUOBJDUMP_SAMPLE)
    assert [(r["arch"], r["reg"], r["stack"], r["shared"], r["local"]) for r in records] == [
        ("sm_75", 40, 0, 96, 0), ("sm_75", 80, 24, 0, 0)]
    cubin = setup.parse_resource_usage(" Function _Z1kv:\n  REG:8 STACK:0 SHARED:0 LOCAL:0\n", "sm_70")
    assert cubin == [{"arch": "sm_70", "name": "_Z1kv", "reg": 8, "stack": 0, "shared": 0, "local": 0}]


def test_report_cuda_resources_logs_every_kernel_and_writes_the_table(tmp_path, monkeypatch, capsys):
    setup = load_setup_module()
    monkeypatch.setenv("ELR_EXT_CUOBJDUMP", fake_cuobjdump(tmp_path))
    (tmp_path / "elr_ext").mkdir()
    info = {"backends_built": ["cpu", "cuda"], "skipped": {}, "cuda": {"archs": ["7.5"]}}
    setup.report_cuda_resources(str(tmp_path / "_C_cuda.so"), info, root=str(tmp_path))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[elr-ext cuda-resources] sm_75 REG")]
    assert len(lines) == 2 and any("fdn_stats_kernel<float, 4>" in line for line in lines), out
    assert "[elr-ext build] CUDA kernel resources: 2 kernels on sm_75; at most 80 registers" in out
    assert "stack/local memory (spills) in 1 kernel-arch pair(s)" in out
    table = json.loads((tmp_path / "build" / "cuda_resources.json").read_text())
    assert [r["reg"] for r in table["kernels"]] == [40, 80]
    written = json.loads((tmp_path / "elr_ext" / "_build_info.json").read_text())
    summary = written["cuda"]["resources"]
    assert summary["kernels"] == 2 and summary["max_registers"] == 80 and len(summary["local_memory"]) == 1


def test_report_cuda_resources_without_cuobjdump_says_so(tmp_path, monkeypatch, capsys):
    setup = load_setup_module()
    monkeypatch.setattr(setup, "find_cuobjdump", lambda: None)
    (tmp_path / "elr_ext").mkdir()
    info = {"cuda": {"archs": ["9.0"]}}
    setup.report_cuda_resources(str(tmp_path / "_C_cuda.so"), info, root=str(tmp_path))
    assert "CUDA kernel resources not reported: no cuobjdump" in capsys.readouterr().out
    assert "no cuobjdump" in info["cuda"]["resources"]["error"]
    assert not (tmp_path / "build" / "cuda_resources.json").exists()


@pytest.mark.skipif(torch.version.cuda is None or not os.path.exists("/usr/local/cuda/bin/nvcc") and
                    shutil.which("nvcc") is None, reason="torch without CUDA, or no nvcc: no CUDA extension")
def test_nvcc_flags_ask_ptxas_for_per_kernel_resources(monkeypatch):
    setup = load_setup_module()
    for name in ("ELR_EXT_NO_CUDA", "ELR_EXT_NO_BUILD"):
        monkeypatch.delenv(name, raising=False)
    for name in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST"):  # extensions_and_info sets them; restored after
        monkeypatch.setenv(name, os.environ.get(name, ""))
    ext_modules, cmdclass, info = setup.extensions_and_info()
    cuda = [e for e in ext_modules if e.name == "elr_ext._C_cuda"]
    assert cuda, info["skipped"]
    nvcc = cuda[0].extra_compile_args["nvcc"]
    assert any(a == "-Xptxas" and b == "-v" for a, b in zip(nvcc, nvcc[1:])), nvcc
    assert cmdclass["build_ext"].__name__ == "BuildExtReportingCudaResources"


def test_build_log_has_every_kernels_registers_and_spills_per_arch():
    """What .ci/setup's build/pip-install.log must show for the CUDA extension it built: ptxas's
    per-kernel lines (registers, stack frame, spill stores and loads) and the post-build cuobjdump
    table, which build/cuda_resources.json holds too."""
    info = elr_ext.build_info()["compiled"]
    if not info or "cuda" not in info.get("backends_built", []):
        pytest.skip("no CUDA extension built")
    binaries = glob.glob(os.path.join(ROOT, "elr_ext", "_C_cuda*.so"))
    log_path = os.path.join(ROOT, "build", "pip-install.log")
    if not binaries or not os.path.exists(log_path):
        pytest.skip("no build/pip-install.log next to a built CUDA extension (.ci/setup writes it)")
    if os.path.getmtime(log_path) < os.path.getmtime(binaries[0]):
        pytest.skip("build/pip-install.log predates the built CUDA extension: not the log of this build")
    with open(log_path, errors="replace") as f:
        log = f.read()
    archs = ["sm_" + a.replace("+PTX", "").replace(".", "") for a in info["cuda"]["archs"]]
    for family in ("_ZN3elr10fdn_detail", "_ZN3elr11kron_detail"):
        for arch in archs:
            assert re.search(rf"Compiling entry function '{family}\w*' for '{arch}'", log), (family, arch)
    assert re.search(r"\d+ bytes stack frame, \d+ bytes spill stores, \d+ bytes spill loads", log)
    assert re.search(r"Used \d+ registers", log)
    table_lines = re.findall(
        r"^\s*\[elr-ext cuda-resources\] (sm_\d+) REG +\d+ STACK +\d+ SHARED +\d+ LOCAL +\d+  (.+)$", log, re.M)
    assert {arch for arch, _ in table_lines} >= set(archs), "no per-kernel cuobjdump table in the build log"
    assert any("elr::fdn_detail::" in k for _, k in table_lines) and any("elr::kron_detail::" in k
                                                                         for _, k in table_lines)
    summary = info["cuda"].get("resources", {})
    assert "error" not in summary, summary.get("error")
    with open(os.path.join(ROOT, "build", "cuda_resources.json")) as f:
        table = json.load(f)
    assert os.path.basename(table["binary"]) == os.path.basename(binaries[0])
    assert len(table["kernels"]) == len(table_lines)
