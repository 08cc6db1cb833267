"""The cards a plan estimates for: memory, peak dense throughput per dtype and memory bandwidth,
from the vendors' datasheets (dense figures: the 2x "with sparsity" numbers are not used).

Tensor-core peaks apply to matrix products (GEMM, convolution, attention); every other op is
timed by its bytes against the bandwidth. `peak_flops(dtype, kind)` is the number the roofline
uses: fp16/bf16 products on tensor cores, fp32 products on the fp32 pipes, except convolutions on
cards with TF32, which cuDNN runs in TF32 by default in PyTorch (torch.backends.cudnn.allow_tf32);
fp32 matmuls stay fp32 (torch.backends.cuda.matmul.allow_tf32 is False by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

TERA = 1e12
GIB = 2 ** 30


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    description: str
    memory_gib: float  # the card's memory as marketed (HBM / GDDR capacity)
    fp32_tflops: float  # FP32 (non-tensor) dense peak
    fp16_tflops: float  # FP16 tensor cores, FP32 accumulate, dense
    bf16_tflops: Optional[float]  # None: no bf16 tensor cores (V100, T4)
    tf32_tflops: Optional[float]  # None: no TF32 (before Ampere)
    bandwidth_gbs: float  # memory bandwidth, GB/s
    compute_capability: tuple
    source: str  # the datasheet the figures come from

    @property
    def flash_attention(self) -> bool:
        """PyTorch's flash-attention kernel needs sm_80 or newer; older cards run the memory-efficient one."""
        return self.compute_capability >= (8, 0)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak_flops(self, dtype: torch.dtype, kind: str) -> float:
        """FLOP/s of a matrix product (`kind` "mm", "conv" or "attention") in `dtype`."""
        if dtype == torch.float16:
            return self.fp16_tflops * TERA
        if dtype == torch.bfloat16:
            # without bf16 tensor cores PyTorch runs bf16 products on the fp32 pipes
            return (self.bf16_tflops or self.fp32_tflops) * TERA
        if dtype == torch.float32 and kind == "conv" and self.tf32_tflops:
            return self.tf32_tflops * TERA
        return self.fp32_tflops * TERA


DEVICES: Dict[str, DeviceSpec] = {d.name: d for d in (
    DeviceSpec("v100-16gb", "NVIDIA Tesla V100 SXM2 16 GB", 16, 15.7, 125, None, None, 900, (7, 0),
          "NVIDIA Tesla V100 GPU datasheet (SXM2: FP32 15.7, Tensor 125 TFLOPS, HBM2 900 GB/s)"),
    DeviceSpec("v100-32gb", "NVIDIA Tesla V100 SXM2 32 GB", 32, 15.7, 125, None, None, 900, (7, 0),
          "NVIDIA Tesla V100 GPU datasheet (SXM2: FP32 15.7, Tensor 125 TFLOPS, HBM2 900 GB/s)"),
    DeviceSpec("t4-16gb", "NVIDIA T4 16 GB", 16, 8.1, 65, None, None, 320, (7, 5),
          "NVIDIA T4 datasheet (FP32 8.1, mixed FP16/FP32 65 TFLOPS, GDDR6 320 GB/s)"),
    DeviceSpec("rtx3090-24gb", "NVIDIA GeForce RTX 3090 24 GB", 24, 35.6, 71, 71, 35.6, 936, (8, 6),
          "NVIDIA Ampere GA102 GPU architecture whitepaper (RTX 3090: FP32 35.6, FP16/BF16 tensor with "
          "FP32 accumulate 71, TF32 35.6 TFLOPS dense, 936 GB/s)"),
    DeviceSpec("a100-40gb", "NVIDIA A100 SXM4 40 GB", 40, 19.5, 312, 312, 156, 1555, (8, 0),
          "NVIDIA A100 Tensor Core GPU datasheet (FP32 19.5, TF32 156, FP16/BF16 312 TFLOPS dense, "
          "HBM2 1,555 GB/s)"),
    DeviceSpec("a100-80gb", "NVIDIA A100 SXM4 80 GB", 80, 19.5, 312, 312, 156, 2039, (8, 0),
          "NVIDIA A100 Tensor Core GPU datasheet (FP32 19.5, TF32 156, FP16/BF16 312 TFLOPS dense, "
          "HBM2e 2,039 GB/s)"),
    DeviceSpec("l4-24gb", "NVIDIA L4 24 GB", 24, 30.3, 121, 121, 60, 300, (8, 9),
          "NVIDIA L4 Tensor Core GPU datasheet (FP32 30.3; FP16/BF16 242 and TF32 120 TFLOPS with "
          "sparsity, half that dense; GDDR6 300 GB/s)"),
    DeviceSpec("rtx4090-24gb", "NVIDIA GeForce RTX 4090 24 GB", 24, 82.6, 165.2, 165.2, 82.6, 1008, (8, 9),
          "NVIDIA Ada Lovelace GPU architecture whitepaper (RTX 4090: FP32 82.6, FP16/BF16 tensor with "
          "FP32 accumulate 165.2, TF32 82.6 TFLOPS dense, GDDR6X 1,008 GB/s)"),
    DeviceSpec("h100-80gb", "NVIDIA H100 SXM5 80 GB", 80, 67, 989.4, 989.4, 494.7, 3350, (9, 0),
          "NVIDIA H100 Tensor Core GPU datasheet (SXM: FP32 67; FP16/BF16 1,979 and TF32 989 TFLOPS "
          "with sparsity, half that dense; HBM3 3.35 TB/s)"),
    DeviceSpec("h200-141gb", "NVIDIA H200 SXM 141 GB", 141, 67, 989.4, 989.4, 494.7, 4800, (9, 0),
          "NVIDIA H200 Tensor Core GPU datasheet (SXM: FP32 67; FP16/BF16 1,979 and TF32 989 TFLOPS "
          "with sparsity, half that dense; HBM3e 4.8 TB/s)"),
)}

# What a process holds on a card besides the tensors a plan counts: the CUDA context, cuBLAS /
# cuDNN workspaces and handles (CUDA_MODULE_LOADING=LAZY keeps the context near 0.5 GiB), and the
# caching allocator's fragmentation. A plan "fits" when peak * (1 + FRAGMENTATION) + RESERVED_GIB
# is within the card's memory.
RESERVED_GIB = 1.0
FRAGMENTATION = 0.05


def device_spec(name: str) -> DeviceSpec:
    """The card called `name`; an unknown name is an error that lists the known ones."""
    key = name.lower()
    if key not in DEVICES:
        raise ValueError(f"--plan-device {name!r} is not a known card; known: {', '.join(DEVICES)} "
                         "(or cpu: memory as this CPU's kernels allocate it, no time estimate)")
    return DEVICES[key]


def fits(spec: DeviceSpec, peak_bytes: int) -> bool:
    return peak_bytes * (1 + FRAGMENTATION) + RESERVED_GIB * GIB <= spec.memory_bytes
