"""The build and the package's promises about it: what was compiled, arch selection, and an import
that survives a missing native part."""

from __future__ import annotations

import importlib.util
import os
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
