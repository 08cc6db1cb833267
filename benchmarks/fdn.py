"""Benchmark of the fused FDN op (eq. 8) at Stable Diffusion's UNet levels at 512 px.

Arms, in one process, interleaved: `eager` (group_norm, mul, add as Uni-ControlNet writes it),
`torch.compile` of that, and `elr-ext` (elr_ext.fdn on the default backend for the device); on a
GPU also `elr-ext cuda` and `elr-ext triton` (each backend forced), whose ratio is what
GPU_DISPATCH in elr_ext/backends.py is read from.
gamma and beta are full size (they come from 3x3 convs of the condition features), with and without
the fused SiLU. On a GPU it also reports the forward's effective bandwidth against the card's
measured copy bandwidth.

    python benchmarks/fdn.py            # CPU fp32 (or GPU fp16 + bf16 when a GPU is present)
    python benchmarks/fdn.py --quick    # small shapes, a smoke run
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import elr_ext  # noqa: E402
from elr_ext import reference  # noqa: E402

SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
QUICK_SHAPES = [(2, 64, 16, 16), (1, 128, 8, 8)]
GROUPS = 32


def make_case(shape, activation, device, dtype, gpu_backends=()) -> harness.Case:
    def build_arms(mode):
        z, gamma, beta = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        grad_out = torch.randn(shape, device=device, dtype=dtype)
        compiled = torch.compile(reference.fdn_eager, fullgraph=True)
        fns = {
            "eager": lambda *t: reference.fdn_eager(*t, num_groups=GROUPS, activation=activation),
            "torch.compile": lambda *t: compiled(*t, num_groups=GROUPS, activation=activation),
            harness.OURS: lambda *t: elr_ext.fdn(*t, num_groups=GROUPS, activation=activation),
        }
        if mode == "fwd":
            def arm(fn):
                def call():
                    with torch.no_grad():
                        fn(z, gamma, beta)
                return call
        else:
            inputs = [t.requires_grad_() for t in (z, gamma, beta)]

            def arm(fn):
                return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)
        arms = {name: arm(fn) for name, fn in fns.items()}
        for backend in gpu_backends:  # forced for the whole call, backward included
            arms[f"{harness.OURS} {backend}"] = elr_ext.use_backend(backend)(arm(fns[harness.OURS]))
        return arms

    label = f"{list(shape)} {activation or 'none'}"
    return harness.Case(label, {"shape": list(shape), "groups": GROUPS, "activation": activation}, build_arms)


def copy_bandwidth_gbps(device, nbytes=1 << 28) -> float:
    """The card's measured device-to-device copy bandwidth (read + write bytes per second)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    times = harness.time_arms({"copy": lambda: dst.copy_(src)}, device, repeats=20, min_sample_s=0.02)
    return 2 * nbytes / times["copy"] / 1e9


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else SD_SHAPES
    repeats = 3 if args.quick else args.repeats
    print(f"elr_ext backends on {device.type}: {elr_ext.available_backends(device.type)}")
    gpu_backends = [b for b in ("cuda", "triton") if device.type == "cuda"
                    and elr_ext.backends.unavailable_reason(b, "cuda") is None]
    if "triton" not in gpu_backends:
        print(f"triton arm skipped: {elr_ext.backends.unavailable_reason('triton', 'cuda')} (a GPU arm)")
    for dtype in harness.dtypes_for(args):
        cases = [make_case(s, act, device, dtype, gpu_backends) for s in shapes for act in (None, "silu")]
        result = harness.run("fdn", cases, device, dtype, repeats=repeats, out_dir=args.out_dir,
                             tag="_quick" if args.quick else "")
        if device.type == "cuda":
            copy = copy_bandwidth_gbps(device)
            print(f"copy bandwidth {copy:.0f} GB/s; forward effective bandwidth of {harness.OURS} "
                  "(reads z, gamma, beta; writes out):")
            for row in result["rows"]:
                if row["arm"] == harness.OURS and row["mode"] == "fwd":
                    moved = 4 * torch.Size(row["params"]["shape"]).numel() * torch.empty((), dtype=dtype).element_size()
                    gbps = moved / (row["median_ms"] * 1e-3) / 1e9
                    print(f"  {row['case']:30s} {gbps:7.0f} GB/s = {100 * gbps / copy:5.1f}% of copy")


if __name__ == "__main__":
    main()
