"""Registers and local memory of the CUDA kernels in the binary that ships, per arch.

`cuobjdump --dump-resource-usage` on the built elr_ext/_C_cuda*.so (no GPU needed; the parser is
setup.py's, which logs the same table at build time and writes it to build/cuda_resources.json) gives
every kernel's registers (REG), stack frame (STACK: spilled registers and local arrays), shared and
local memory for each arch it was compiled for. A hot kernel must use no stack and no local memory:
a spill there is paid on every training step.

Hot: every kernel that runs each training step, which is every kernel of the extension (the FDN
forward and backward kernels, the Kronecker LoRA kernels of the fused and GEMM paths, and the
kron_delta kernels of the conv layers, whose weight delta is built each step); lowrank_proj has no
kernel of its own (cuBLAS). Exception, by name: the float64 instantiations, the dtype of gradcheck
and of the reference runs, never of training (their resources are still reported, not asserted).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

import elr_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Mangled-name prefixes (elr::fdn_detail::..., elr::kron_detail::...): no demangler needed.
FAMILIES = {"fdn": "_ZN3elr10fdn_detail", "kron_lora": "_ZN3elr11kron_detail"}
# The element type is every kernel template's first argument: ..._kernel<double, ...> mangles "_kernelId".
FP64 = re.compile(r"_kernelId")


def load_setup_module():
    spec = importlib.util.spec_from_file_location("elr_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


def is_hot(record):
    return record["name"].startswith(tuple(FAMILIES.values())) and not FP64.search(record["name"])


def local_memory_users(records):
    """The hot kernels (per arch) with a stack frame or local memory, as readable lines."""
    return sorted(f"{r['arch']}: {r['kernel']} (REG {r['reg']}, STACK {r['stack']}, LOCAL {r['local']})"
                  for r in records if is_hot(r) and (r["stack"] or r["local"]))


def resource_table(records):
    return "\n".join(f"{r['arch']} REG {r['reg']:3d} STACK {r['stack']:4d} SHARED {r['shared']:5d} "
                     f"LOCAL {r['local']:4d}  {r['kernel']}" for r in sorted(records, key=lambda r: (r["kernel"],
                                                                                                    r["arch"])))


@pytest.fixture(scope="module")
def shipped():
    """(path of the built CUDA extension, its per-kernel per-arch resources)."""
    info = elr_ext.build_info()
    compiled = info.get("compiled") or {}
    folder = os.path.dirname(elr_ext.__file__)
    binaries = sorted(glob.glob(os.path.join(folder, "_C_cuda*.so")))
    if not binaries:
        if "cuda" in compiled.get("backends_built", []):
            why = "_build_info.json lists it as built, but there is no binary (a build still running, or failed)"
        else:
            why = (compiled.get("skipped") or {}).get("cuda", "not built")
        pytest.skip(f"no CUDA extension (elr_ext/_C_cuda*.so): {why}")
    setup = load_setup_module()
    try:
        records = setup.cuda_resource_usage(binaries[0])
    except RuntimeError as err:
        pytest.skip(str(err))
    print(resource_table(records))  # the table, in the log of a failing run
    return binaries[0], records, compiled


def test_binary_has_every_kernel_family_for_every_built_arch(shipped):
    binary, records, compiled = shipped
    archs = {r["arch"] for r in records}
    wanted = {"sm_" + a.replace("+PTX", "").replace(".", "") for a in (compiled.get("cuda") or {}).get("archs", [])}
    assert wanted <= archs, f"{binary}: archs {sorted(archs)}, the build asked for {sorted(wanted)}"
    for family, ns in FAMILIES.items():
        for arch in archs:
            assert any(r["name"].startswith(ns) and r["arch"] == arch for r in records), f"no {family} kernel for {arch}"


def test_hot_kernels_neither_spill_nor_use_local_memory(shipped):
    binary, records, _ = shipped
    hot = [r for r in records if is_hot(r)]
    assert hot, f"no hot kernel found in {binary}"
    offenders = local_memory_users(records)
    assert not offenders, (f"{len(offenders)} hot kernel-arch pairs use a stack frame or local memory (spills or "
                           "local arrays) in " + os.path.basename(binary) + ":\n" + "\n".join(offenders))


def test_parser_reads_cuobjdump_resource_usage():
    """setup.py's parser on cuobjdump's format: fat binary sections per arch, PTX sections skipped."""
    text = """
Fatbin elf code:
================
arch = sm_75
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN3elr10fdn_detail16fdn_stats_kernelIfLi4EEEvNS0_6TilingEPKT_PNS_7AccTypeIS3_E4typeE:
  REG:40 STACK:0 SHARED:96 LOCAL:0 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin ptx code:
================
arch = sm_90
 Function _Z1kv:
  REG:1 STACK:1 SHARED:1 LOCAL:1

Fatbin elf code:
================
arch = sm_90
 Function _Z1kv:
  REG:32 STACK:16 SHARED:1280 LOCAL:8 CONSTANT[0]:540
"""
    records = load_setup_module().parse_resource_usage(text)
    assert [(r["arch"], r["reg"], r["stack"], r["shared"], r["local"]) for r in records] == [
        ("sm_75", 40, 0, 96, 0), ("sm_90", 32, 16, 1280, 8)]
    cubin = load_setup_module().parse_resource_usage(" Function _Z1kv:\n  REG:8 STACK:0 SHARED:0 LOCAL:0\n", "sm_70")
    assert cubin == [{"arch": "sm_70", "name": "_Z1kv", "reg": 8, "stack": 0, "shared": 0, "local": 0}]
