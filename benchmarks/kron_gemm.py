"""Benchmark of the Kronecker-product LoRA GEMM (eq. 9) at Stable Diffusion's linear-layer shapes.

Arms, in one process, interleaved (benchmarks/harness.py):
  build-dW + F.linear   dW = sum_t A_t kron (U_t V_t) built every step, then one dense product
  peft LoKr             peft's LoKr layer on the frozen nn.Linear, in its usual configuration: one
                        Kronecker term, its balanced split (decompose_factor=-1), rank r
  LyCORIS LoKr          LyCORIS's LokrModule, default mode (factor=-1: the balanced split, rank r),
                        and `LyCORIS bypass` (bypass_mode)
  eager factorised      elr_ext.reference.kron_lora_linear (the einsum chain, no dW)
  torch.compile         torch.compile of the eager factorised reference
  elr-ext               elr_ext.kron_lora_linear on the device's default backend, eq. 9's factors
                        (n terms, A_i n x n, U_i d_out/n x r, V_i r x d_in/n: the modules' default)
  elr-ext cuda/triton   on a GPU, each backend forced (GPU_DISPATCH in elr_ext/backends.py is read
                        from their ratio)
The peers always include the frozen base layer, so they run only in the cases with a base weight.

    python benchmarks/kron_gemm.py            # a representative subset (CPU fp32; GPU fp16 + bf16)
    python benchmarks/kron_gemm.py --full     # the whole grid (every layer x tokens x terms x rank)
    python benchmarks/kron_gemm.py --quick    # small shapes: a smoke run
    python benchmarks/kron_gemm.py --conv     # KronLoRAConv2d at SD 2.1's 3x3 convs (results kron_conv_*):
                                              # elr_ext.kron_lora_conv2d against building dW + F.conv2d
"""

from __future__ import annotations

import itertools
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import elr_ext  # noqa: E402
from elr_ext import reference  # noqa: E402

# (d_in, d_out): attention projections at SD's three widths, and the feed-forward pair
LAYERS = [(320, 320), (640, 640), (1280, 1280), (1280, 10240), (5120, 1280)]
TOKENS = [2 * 4096, 2 * 1024, 2 * 256]
TERMS = [2, 4, 8]
RANKS = [4, 8, 16]
SUBSET = [((320, 320), 2 * 4096, 4, 8), ((640, 640), 2 * 1024, 4, 8), ((1280, 1280), 2 * 256, 4, 8),
          ((1280, 10240), 2 * 256, 4, 8), ((5120, 1280), 2 * 256, 4, 8), ((640, 640), 2 * 1024, 8, 16),
          ((640, 640), 2 * 1024, 2, 4)]
QUICK = [((64, 96), 128, 2, 4), ((96, 64), 64, 4, 2)]
# (channels, side, batch): SD 2.1's resnet 3x3 convs at 256 px (latent 32) and 512 px (latent 64)
CONV = [(320, 32, 2), (640, 16, 2), (1280, 8, 2), (320, 64, 2), (640, 32, 2), (1280, 16, 2)]
CONV_QUICK = [(16, 8, 2)]


def peer_layers(base: torch.nn.Linear, r: int):
    """peft's and LyCORIS's LoKr on copies of `base` as their users configure them: the balanced split
    of each dimension (w1 about sqrt(d_out) x sqrt(d_in)), w2 = w2_a w2_b of rank r, non-zero factors
    (their init zeroes one factor)."""
    layers = {}
    try:
        import copy

        import peft

        model = peft.get_peft_model(torch.nn.Sequential(copy.deepcopy(base)),
                                    peft.LoKrConfig(r=r, alpha=r, target_modules=["0"], decompose_factor=-1))
        layers["peft LoKr"] = model.base_model.model[0]
    except ImportError:
        pass
    try:
        import copy

        from lycoris.modules.lokr import LokrModule

        for name, bypass in (("LyCORIS LoKr", False), ("LyCORIS bypass", True)):
            module_base = copy.deepcopy(base)
            module = LokrModule("bench", module_base, lora_dim=r, alpha=r, factor=-1, bypass_mode=bypass)
            module.apply_to()
            layers[name] = module_base  # apply_to routes the base layer's forward through LoKr
            layers[name]._lokr = module
    except ImportError:
        pass
    for layer in layers.values():
        for p in (getattr(layer, "_lokr", layer)).parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
    return layers


def make_case(layer_shape, tokens, n, r, with_base, device, dtype, gpu_backends=()) -> harness.Case:
    d_in, d_out = layer_shape

    def build_arms(mode):
        torch.manual_seed(0)
        base = torch.nn.Linear(d_in, d_out).to(device, dtype).requires_grad_(False)
        weight, bias = (base.weight, base.bias) if with_base else (None, None)
        A = (torch.randn(n, n, n, device=device, dtype=dtype) / n).requires_grad_()
        U = (torch.randn(n, d_out // n, r, device=device, dtype=dtype) / r ** 0.5).requires_grad_()
        V = (torch.randn(n, r, d_in // n, device=device, dtype=dtype) / d_in ** 0.5).requires_grad_()
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        compiled = torch.compile(reference.kron_lora_linear, fullgraph=True)

        def build_dw(x):
            w = reference.kron_delta(A, U, V)
            return F.linear(x, w + weight, bias) if with_base else F.linear(x, w)

        fns = {"build-dW + F.linear": (build_dw, [x, A, U, V])}
        if with_base:
            for name, layer in peer_layers(base, r).items():
                params = [p for p in getattr(layer, "_lokr", layer).parameters() if p.requires_grad]
                fns[name] = (layer, [x] + params)
        fns["eager factorised"] = (lambda x: reference.kron_lora_linear(x, A, U, V, weight, bias), [x, A, U, V])
        fns["torch.compile"] = (lambda x: compiled(x, A, U, V, weight, bias), [x, A, U, V])
        fns[harness.OURS] = (lambda x: elr_ext.kron_lora_linear(x, A, U, V, weight, bias), [x, A, U, V])
        grad = torch.randn(tokens, d_out, device=device, dtype=dtype)

        def arm(fn, leaves):
            if mode == "fwd":
                def call():
                    with torch.no_grad():
                        fn(x)
                return call
            return lambda: torch.autograd.grad(fn(x), leaves, grad)
        arms = {name: arm(fn, leaves) for name, (fn, leaves) in fns.items()}
        for backend in gpu_backends:  # forced for the whole call, backward included
            arms[f"{harness.OURS} {backend}"] = elr_ext.use_backend(backend)(arm(*fns[harness.OURS]))
        return arms

    label = f"{d_in}->{d_out} M={tokens} n={n} r={r}{' +base' if with_base else ''}"
    params = {"d_in": d_in, "d_out": d_out, "tokens": tokens, "terms": n, "rank": r, "base": with_base}
    return harness.Case(label, params, build_arms)


def make_conv_case(channels, side, batch, n, r, device, dtype) -> harness.Case:
    """KronLoRAConv2d's forward+backward on a frozen 3x3 conv: dW built and F.conv2d's own autograd
    (which forms the [out, in*9] weight gradient) against elr_ext.kron_lora_conv2d (which does not)."""

    def build_arms(mode):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype).requires_grad_(False)
        layer = elr_ext.nn.KronLoRAConv2d(conv, terms=n, rank=r)
        torch.nn.init.normal_(layer.U, std=0.02)
        A, U, V = layer.A, layer.U, layer.V
        x = torch.randn(batch, channels, side, side, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch, channels, side, side, device=device, dtype=dtype)

        def build_dw(x):
            weight = conv.weight + layer.scale * elr_ext.kron_delta(A, U, V).view_as(conv.weight)
            return F.conv2d(x, weight, conv.bias, 1, 1)

        fns = {"build-dW + F.conv2d": build_dw, harness.OURS: layer}

        def arm(fn):
            if mode == "fwd":
                def call():
                    with torch.no_grad():
                        fn(x)
                return call
            return lambda: torch.autograd.grad(fn(x), [x, A, U, V], grad)
        return {name: arm(fn) for name, fn in fns.items()}

    label = f"conv3x3 {channels}ch {side}x{side} b{batch} n={n} r={r}"
    params = {"channels": channels, "side": side, "batch": batch, "terms": n, "rank": r}
    return harness.Case(label, params, build_arms)


# The project's targets on the default grid (fwd+bwd): with the base, elr-ext at least these multiples
# faster than each peer; the Kronecker term alone at least 10x building dW where the layer is wide.
TARGETS_WITH_BASE = {"peft LoKr": 2.0, "LyCORIS bypass": 1.3}
TARGET_KRON_ALONE = ("build-dW + F.linear", 10.0, 640)


def target_lines(result: dict) -> list:
    """One line per (case, target): the measured ratio, the target, met or not."""
    lines = []
    for row in result["rows"]:
        p = row["params"]
        if row["mode"] != "fwd+bwd" or not row["speedup_of_ours"]:
            continue
        want = None
        if p["base"] and row["arm"] in TARGETS_WITH_BASE:
            want = TARGETS_WITH_BASE[row["arm"]]
        elif not p["base"] and row["arm"] == TARGET_KRON_ALONE[0] and min(p["d_in"], p["d_out"]) >= TARGET_KRON_ALONE[2]:
            want = TARGET_KRON_ALONE[1]
        if want is not None:
            met = "met" if row["speedup_of_ours"] >= want else "NOT met"
            lines.append(f"{row['case']:36s} vs {row['arm']:20s} {row['speedup_of_ours']:6.2f}x (target {want}x): {met}")
    return lines


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv, extra=[("--full", "the whole grid of the issue"),
                                                                   ("--conv", "the 3x3 conv adapter instead")])
    device = torch.device(args.device)
    if args.conv:
        for dtype in harness.dtypes_for(args):
            cases = [make_conv_case(c, side, b, 4, 8, device, dtype) for c, side, b in (CONV_QUICK if args.quick else CONV)]
            cases = [case for case in cases if not args.only or re.search(args.only, case.label)]
            harness.run("kron_conv", cases, device, dtype, repeats=3 if args.quick else args.repeats,
                        out_dir=args.out_dir, tag="_quick" if args.quick else "")
        return
    if args.quick:
        grid = QUICK
    elif args.full:
        grid = [(layer, m, n, r) for layer, m, n, r in itertools.product(LAYERS, TOKENS, TERMS, RANKS)]
    else:
        grid = SUBSET
    print(f"elr_ext backends on {device.type}: {elr_ext.available_backends(device.type)}; kron_lora compiled for "
          f"{elr_ext.backends.native_implementations('kron_lora_forward')}")
    gpu_backends = [b for b in ("cuda", "triton") if device.type == "cuda"
                    and elr_ext.backends.unavailable_reason(b, "cuda") is None]
    if "triton" not in gpu_backends:
        print(f"triton arm skipped: {elr_ext.backends.unavailable_reason('triton', 'cuda')} (a GPU arm)")
    for dtype in harness.dtypes_for(args):
        cases = [make_case(layer, m, n, r, with_base, device, dtype, gpu_backends)
                 for layer, m, n, r in grid for with_base in (False, True)]
        cases = [case for case in cases if not args.only or re.search(args.only, case.label)]
        tag = "_quick" if args.quick else ("_full" if args.full else "")
        result = harness.run("kron_gemm", cases, device, dtype, repeats=3 if args.quick else args.repeats,
                             out_dir=args.out_dir, tag=tag)
        lines = target_lines(result)
        print("\ntargets (fwd+bwd):\n" + "\n".join(lines))
        path = os.path.join(args.out_dir, f"kron_gemm_{device.type}_{str(dtype).replace('torch.', '')}{tag}_targets.txt")
        with open(path, "w") as f:
            f.write(f"{result['device']}, {result['time']}, torch {result['torch']}\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
