"""elr_ext.backends on a pretend GPU: which backend a CUDA tensor gets when the binary lacks its arch,
when Triton meets a GPU older than sm_80, and per device rather than per current device. No GPU
is needed: CUDA's availability, the binary's arch list and the devices' capabilities are patched."""

from __future__ import annotations

import warnings

import pytest
import torch

from elr_ext import backends


@pytest.fixture
def pretend_gpu(monkeypatch):
    """CUDA available, a CUDA binary built for `archs`, devices of the given capabilities."""

    def setup(archs, capabilities, current=0):
        backends._load_native()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setitem(backends._native, "cuda", object())
        monkeypatch.setitem(backends._missing, "cuda", None)
        monkeypatch.setattr(backends, "_capability", dict(enumerate(capabilities)))
        monkeypatch.setattr(backends, "compiled_info", lambda: {"cuda": {"archs": archs}})
        monkeypatch.setattr(backends, "_warned", set())

    return setup


@pytest.mark.parametrize("built, capability, runs", [
    ("7.0", (7, 0), True), ("7.5", (7, 0), False), ("8.0", (8, 6), True), ("8.6", (8, 0), False),
    ("8.0", (9, 0), False), ("9.0+PTX", (9, 0), True), ("8.0+PTX", (9, 0), True), ("9.0+PTX", (8, 9), False),
])
def test_arch_compatibility_rule(built, capability, runs):
    """SASS runs within its major at a minor at or above its own; PTX runs (JIT) on any later arch."""
    assert backends._arch_runs(built, capability) is runs


def test_cuda_build_without_the_gpus_arch_falls_back_with_one_warning(pretend_gpu):
    pretend_gpu(["7.5", "8.0", "8.6", "8.9", "9.0+PTX"], [(7, 0)])
    device = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picks = [backends.select("kron_lora", device, ("cuda", "torch"), torch.float16) for _ in range(3)]
    assert picks == ["torch"] * 3
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "sm_70" in messages[0] and "ELR_EXT_CUDA_ARCHS=7.0" in messages[0] and "CUDA 12" in messages[0]
    assert backends.unavailable_reason("cuda", "cuda", device) is not None


def test_cuda_build_with_a_compatible_arch_is_chosen(pretend_gpu):
    pretend_gpu(["7.5", "8.0", "9.0+PTX"], [(8, 6), (9, 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("fdn", torch.device("cuda", 0), ("cuda", "torch"), torch.float32) == "cuda"
        assert backends.select("fdn", torch.device("cuda", 1), ("cuda", "torch"), torch.float32) == "cuda"


def test_triton_reads_the_tensors_device_not_the_current_one(pretend_gpu, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "_triton_import_error", [None])
    pretend_gpu(["8.0"], [(9, 0), (7, 5)], current=0)
    assert "8.0 or newer" in backends.unavailable_reason("triton", "cuda", torch.device("cuda", 1))
    pretend_gpu(["8.0"], [(7, 5), (9, 0)], current=0)
    import sys

    monkeypatch.setitem(sys.modules, "elr_ext.triton", None)  # no kernels defined yet in either mode
    assert backends.unavailable_reason("triton", "cuda", torch.device("cuda", 1)) is None


def test_dispatch_table_uses_the_tensors_device(pretend_gpu, monkeypatch):
    monkeypatch.setattr(backends, "GPU_DISPATCH", {("kron_lora", "bfloat16"): {(8, 0): "triton"}})
    pretend_gpu(["7.5", "8.0"], [(7, 5), (8, 0)], current=0)
    assert backends.table_choice("kron_lora", torch.device("cuda", 0), torch.bfloat16) is None
    assert backends.table_choice("kron_lora", torch.device("cuda", 1), torch.bfloat16) == "triton"


def test_choose_offers_triton_only_where_it_has_a_kernel(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    x = torch.zeros(2, 3)
    with backends.use_backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picked = backends.choose("kron_lora", "kron_delta", x, triton=False)
    assert picked in ("cpu", "torch")
    assert any("kron_lora has no triton implementation" in str(w.message)
               or "Triton runs on the CPU only" in str(w.message) for w in caught)
