"""Benchmark of the fused low-rank projections (eq. 2, docs/method.md) at Stable Diffusion 2.1's
attention shapes.

Cases: self-attention q, k, v (K = 3 projections of the hidden states [tokens, d]) at SD's levels
(d, tokens) = (320, 2*4096), (640, 2*1024), (1280, 2*256), (1280, 2*64) (batch 2, as with
classifier-free guidance at 512x512), and cross-attention k, v (K = 2 projections of the text context
[2*77, 1024] to d); ranks d/8, d/4, d/2. No biases (SD's to_q/to_k/to_v have none).

Arms, in one process, interleaved (benchmarks/harness.py); "K" is 3 or 2:
  dense Linear xK        K nn.Linear(in, d), the teacher's layers
  unfused low-rank xK    K times nn.Linear(in, r) then nn.Linear(r, d): the straightforward student
  concatenated eager     elr_ext.reference.lowrank_proj: one matmul over the stacked downs, then the ups
  torch.compile          torch.compile(fullgraph=True) of that reference
  elr-ext                elr_ext.lowrank_proj on the device's default backend
  elr-ext cuda/triton    on a GPU, each backend forced (GPU_DISPATCH in elr_ext/backends.py is read
                         from their ratio)
Forward runs under no_grad; forward+backward takes the gradients of x and of every weight (Stage I
trains them all, and x is an activation of the UNet).

    python benchmarks/lowrank_proj.py           # the whole grid (CPU fp32; GPU fp16 + bf16)
    python benchmarks/lowrank_proj.py --quick   # tiny shapes, few repeats: a smoke run
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import elr_ext  # noqa: E402
from elr_ext import reference  # noqa: E402

SELF_LEVELS = [(320, 2 * 4096), (640, 2 * 1024), (1280, 2 * 256), (1280, 2 * 64)]
CONTEXT_DIM, CONTEXT_TOKENS = 1024, 2 * 77
RANK_DIVISORS = [8, 4, 2]
# (kind, d, in, tokens, rank divisor)
QUICK = [("self", 64, 64, 128, 4), ("cross-kv", 64, 96, 32, 4)]


def grid():
    cases = [("self", d, d, m, div) for d, m in SELF_LEVELS for div in RANK_DIVISORS]
    cases += [("cross-kv", d, CONTEXT_DIM, CONTEXT_TOKENS, div)
              for d in (320, 640, 1280) for div in RANK_DIVISORS]
    return cases


def make_case(kind, d, d_in, tokens, divisor, device, dtype, gpu_backends=()) -> harness.Case:
    K = 3 if kind == "self" else 2
    r = d // divisor

    def build_arms(mode):
        torch.manual_seed(0)
        factory = dict(device=device, dtype=dtype)
        dense = [torch.nn.Linear(d_in, d, bias=False, **factory) for _ in range(K)]
        unfused = [torch.nn.Sequential(torch.nn.Linear(d_in, r, bias=False, **factory),
                                       torch.nn.Linear(r, d, bias=False, **factory)) for _ in range(K)]
        downs = [seq[0].weight for seq in unfused]  # the same factors for every low-rank arm
        ups = [seq[1].weight for seq in unfused]
        x = torch.randn(tokens, d_in, **factory, requires_grad=True)
        compiled = torch.compile(reference.lowrank_proj, fullgraph=True)
        low_rank = [x, *downs, *ups]
        dense_leaves = [x] + [layer.weight for layer in dense]
        fns = {
            f"dense Linear x{K}": (lambda: [layer(x) for layer in dense], dense_leaves),
            f"unfused low-rank x{K}": (lambda: [seq(x) for seq in unfused], low_rank),
            "concatenated eager": (lambda: reference.lowrank_proj(x, downs, ups), low_rank),
            "torch.compile": (lambda: compiled(x, downs, ups), low_rank),
            harness.OURS: (lambda: elr_ext.lowrank_proj(x, downs, ups), low_rank),
        }
        grads = [torch.randn(tokens, d, **factory) for _ in range(K)]

        def arm(fn, leaves):
            if mode == "fwd":
                def call():
                    with torch.no_grad():
                        fn()
                return call
            return lambda: torch.autograd.grad(fn(), leaves, grads)
        arms = {name: arm(fn, leaves) for name, (fn, leaves) in fns.items()}
        for backend in gpu_backends:  # forced for the whole call, backward included
            arms[f"{harness.OURS} {backend}"] = elr_ext.use_backend(backend)(arm(*fns[harness.OURS]))
        return arms

    label = f"{kind} K={K} {d_in}->{d} M={tokens} r={r}"
    params = {"kind": kind, "K": K, "d_in": d_in, "d_out": d, "tokens": tokens, "rank": r}
    return harness.Case(label, params, build_arms)


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    compiled_for = elr_ext.backends.native_implementations("lowrank_proj_forward")
    print(f"elr_ext backends on {device.type}: {elr_ext.available_backends(device.type)}; "
          f"lowrank_proj compiled for {compiled_for}")
    gpu_backends = [b for b in ("cuda", "triton") if device.type == "cuda"
                    and elr_ext.backends.unavailable_reason(b, "cuda") is None]
    if "triton" not in gpu_backends:
        print(f"triton arm skipped: {elr_ext.backends.unavailable_reason('triton', 'cuda')} (a GPU arm)")
    for dtype in harness.dtypes_for(args):
        cases = [make_case(*spec, device, dtype, gpu_backends) for spec in (QUICK if args.quick else grid())]
        harness.run("lowrank_proj", cases, device, dtype, repeats=3 if args.quick else args.repeats,
                    out_dir=args.out_dir, tag="_quick" if args.quick else "")


if __name__ == "__main__":
    main()
