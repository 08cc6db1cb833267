"""Stable Diffusion 2.1's UNet decomposed with elr_ext.decompose's default policy: the parameter table.

    python benchmarks/decompose_sd21.py [--svd-dtype float32|float64] [--seed 0]

The UNet is built from SD 2.1's config written below, with random weights (nothing is downloaded):
parameter counts and ranks depend only on the shapes under the default policy (rank_ratio), the
reconstruction errors are those of random (Kaiming-initialised) weights, not of the trained model.
The text encoder (OpenCLIP ViT-H/14 text tower as transformers' CLIPTextModel) and the VAE are
counted from their SD 2.1 configs on the meta device, so that the whole-model total can be set
against the paper's 1290M -> 790M (Table 1).

Writes benchmarks/results/decompose_sd21.{txt,json}. SVDs run on the CPU: --svd-dtype float32 by
default here (1.8 s against 3.9 s in fp64 for one 1280 x 11520 conv weight, measured side by side here;
the parameter counts do not depend on it, the errors move in the 7th digit); decompose's own default
is fp64. The wall time depends mostly on what else the machine runs: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (RESULTS_DIR)

import elr_ext  # noqa: E402
from elr_ext.decompose import DEFAULT_RANK_RATIO  # noqa: E402
from elr_ext.architectures import SD21_UNET_CONFIG  # noqa: E402

SD21_TEXT_ENCODER = dict(  # text_encoder/config.json (CLIPTextModel)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)
SD21_VAE = dict(  # vae/config.json (AutoencoderKL)
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=768,
    block_out_channels=(128, 256, 512, 512), act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
PAPER = {"whole_model_before": 1290e6, "whole_model_after": 790e6}

# Which part of a UNet block a layer is, by its qualified name (first match wins).
ROLES = [
    (r"attn1\.to_[qkv]$", "self-attention q/k/v"),
    (r"attn2\.to_q$", "cross-attention q"),
    (r"attn2\.to_[kv]$", "cross-attention k/v (text context)"),
    (r"attn[12]\.to_out\.0$", "attention output"),
    (r"\.ff\.", "feed-forward (GEGLU)"),
    (r"\.proj_(in|out)$", "transformer proj_in/proj_out"),
    (r"resnets\.\d+\.conv[12]$", "resnet 3x3 convs"),
    (r"conv_shortcut$", "resnet 1x1 shortcuts"),
    (r"time_emb_proj$", "resnet time projections"),
    (r"(down|up)samplers\.", "down/upsampler convs"),
    (r"^time_embedding\.", "time embedding MLP"),
    (r"^conv_(in|out)$", "conv_in / conv_out"),
]


def role(name: str) -> str:
    return next((label for pattern, label in ROLES if re.search(pattern, name)), "other")


def block_of(name: str, unet) -> str:
    """'down_blocks.1 (CrossAttnDownBlock2D)' for anything under down_blocks.1, else the top-level name."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        key = ".".join(parts[:2])
        return f"{key} ({type(unet.get_submodule(key)).__name__})"
    if parts[0] == "mid_block":
        return f"mid_block ({type(unet.mid_block).__name__})"
    return "stem (conv_in, time embedding, conv_norm_out, conv_out)"


def params_by_block(unet) -> dict:
    counts = defaultdict(int)
    for name, p in unet.named_parameters():
        counts[block_of(name, unet)] += p.numel()
    return counts


def meta_count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def millions(n) -> str:
    return f"{n / 1e6:,.1f}M"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svd-dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "decompose_sd21"))
    args = parser.parse_args(argv)
    print(f"settings: svd_dtype={args.svd_dtype} seed={args.seed} policy=default (rank_ratio={DEFAULT_RANK_RATIO:.4g}) "
          f"threads={torch.get_num_threads()}")

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = meta_count(lambda: CLIPTextModel(CLIPTextConfig(**SD21_TEXT_ENCODER)))
    vae = meta_count(lambda: AutoencoderKL(**SD21_VAE))

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
    build_s = time.perf_counter() - t0
    blocks_before = params_by_block(unet)

    load_start = os.getloadavg()[0]  # other jobs on a shared machine stretch the wall time: record it
    t0, cpu0 = time.perf_counter(), time.process_time()
    report = elr_ext.decompose(unet, svd_dtype=getattr(torch, args.svd_dtype))
    decompose_s, decompose_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    load = (load_start, os.getloadavg()[0])
    blocks_after = params_by_block(unet)
    assert report.params_after == sum(p.numel() for p in unet.parameters())

    roles = defaultdict(lambda: {"layers": 0, "decomposed": 0, "before": 0, "after": 0, "ranks": set(), "errors": []})
    for layer in report.layers:
        r = roles[role(layer.name)]
        r["layers"] += 1
        r["before"] += layer.params_before
        r["after"] += layer.params_after
        if layer.rank is not None:
            r["decomposed"] += 1
            r["ranks"].add(layer.rank)
            r["errors"].append(layer.rel_error)
    other = report.params_before - sum(r["before"] for r in roles.values())  # norms, embeddings' non-layers

    whole_before = report.params_before + text_encoder + vae
    whole_after = report.params_after + text_encoder + vae
    lines = [
        "SD 2.1 UNet (random weights) decomposed by elr_ext.decompose, default policy "
        f"rank_ratio={DEFAULT_RANK_RATIO:.4g}, split us, min_saving 0, SVD in {args.svd_dtype} on the CPU",
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; build {build_s:.1f} s, decompose {decompose_s:.1f} s wall "
        f"({decompose_cpu_s:.1f} s CPU; 1-min load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, "
        f"on {os.cpu_count()} cores)",
        "",
        f"{'block':<56} {'before':>10} {'after':>10} {'kept':>7}",
    ]
    for key in blocks_before:
        lines.append(f"{key:<56} {millions(blocks_before[key]):>10} {millions(blocks_after[key]):>10} "
                     f"{100 * blocks_after[key] / blocks_before[key]:>6.1f}%")
    lines += ["", f"{'layer role':<40} {'layers':>7} {'decomp.':>7} {'before':>10} {'after':>10} "
                  f"{'ranks':>12} {'rel. err (mean)':>16}"]
    for label in [label for _, label in ROLES] + ["other"]:
        if label not in roles:
            continue
        r = roles[label]
        ranks = f"{min(r['ranks'])}-{max(r['ranks'])}" if r["ranks"] else "-"
        err = f"{sum(r['errors']) / len(r['errors']):.3f}" if r["errors"] else "-"
        lines.append(f"{label:<40} {r['layers']:>7} {r['decomposed']:>7} {millions(r['before']):>10} "
                     f"{millions(r['after']):>10} {ranks:>12} {err:>16}")
    lines.append(f"{'norms and other non-layer parameters':<40} {'':>7} {'':>7} {millions(other):>10} {millions(other):>10}")
    kept = report.kept_dense
    lines += [
        "",
        f"layers: {len(report.decomposed)} decomposed, {len(kept)} kept dense"
        + (": " + "; ".join(f"{l.name} ({l.reason})" for l in kept) if kept else ""),
        f"attention processors installed: {len(report.attention_processors)}",
        "",
        f"UNet:            {report.params_before:,} -> {report.params_after:,} "
        f"({millions(report.params_before)} -> {millions(report.params_after)}, "
        f"{100 * report.params_after / report.params_before:.1f}% kept)",
        f"text encoder:    {text_encoder:,} (unchanged)",
        f"VAE:             {vae:,} (unchanged)",
        f"whole model:     {millions(whole_before)} -> {millions(whole_after)}   "
        f"(paper, Table 1: {millions(PAPER['whole_model_before'])} -> {millions(PAPER['whole_model_after'])})",
    ]
    text = "\n".join(lines)
    print(text)

    result = {
        "settings": {"svd_dtype": args.svd_dtype, "seed": args.seed, "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
        "unet_config": SD21_UNET_CONFIG, "policy": report.policy,
        "seconds": {"build": build_s, "decompose": decompose_s, "decompose_cpu": decompose_cpu_s},
        "load_average": {"start": load[0], "end": load[1], "cores": os.cpu_count()},
        "unet": {"before": report.params_before, "after": report.params_after},
        "text_encoder": text_encoder, "vae": vae,
        "whole_model": {"before": whole_before, "after": whole_after}, "paper": PAPER,
        "blocks": {k: {"before": blocks_before[k], "after": blocks_after[k]} for k in blocks_before},
        "roles": {k: {**v, "ranks": sorted(v["ranks"])} for k, v in roles.items()},
        "layers": report.to_dict()["layers"],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".txt", "w") as f:
        f.write(text + "\n\nper layer:\n" + str(report) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}.txt and {args.out}.json")
    return result


if __name__ == "__main__":
    main()
