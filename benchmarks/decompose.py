"""A Stable Diffusion family's UNet decomposed with elr_ext.decompose's default policy: the parameter table.

    python benchmarks/decompose.py --architecture sd15|sd21|sdxl [--svd-dtype float32|float64] [--seed 0]
                                   [--materialize full|per-layer]

The UNet is built from the family's config (elr_ext.architectures) with random weights; nothing is
downloaded. Under the default policy (rank_ratio) the ranks and parameter counts depend only on the
shapes; the reconstruction errors are those of random (Kaiming-initialised) weights, not of the
trained model. The text encoder(s) and the VAE are counted from their configs on the meta device
(SDXL: CLIP ViT-L/14 as CLIPTextModel and OpenCLIP bigG/14 as CLIPTextModelWithProjection), so
that the whole pipeline can be counted before and after (for SD 2.1, against the paper's
1290M -> 790M, Table 1).

--materialize: how the random UNet comes to exist.
    full       built on the CPU in fp32 as a whole, then decomposed (UNet2DConditionModel(**config)).
               The default for sd15 and sd21 (0.86 B parameters, 3.5 GB).
    per-layer  built on the meta device; each nn.Linear / nn.Conv2d in turn gets CPU storage and its
               type's default initialisation (reset_parameters, the distribution a full build gives),
               is decomposed and its dense weight dropped, so that at most one dense layer exists at a
               time and the peak is about the decomposed UNet's size. The default for sdxl (2.57 B
               parameters, 10.3 GB in fp32 as a whole). The norms stay on the meta device (counted,
               never run). The random numbers are drawn in a different order than a full build's, so
               the errors differ from a full build's in their later digits; the counts are the same.

Writes benchmarks/results/decompose_<architecture>.{txt,json}. SVDs run on the CPU: --svd-dtype
float32 by default here (1.8 s against 3.9 s in fp64 for one 1280 x 11520 conv weight, measured side
by side; the parameter counts do not depend on it, the errors move in the 7th digit); decompose's own
default is fp64. The wall time depends mostly on what else the machine runs: the load average, the
CPU and the date are recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (RESULTS_DIR)

import elr_ext  # noqa: E402
from elr_ext.architectures import ARCHITECTURES, architecture  # noqa: E402
from elr_ext.decompose import DEFAULT_RANK_RATIO, DecomposeReport  # noqa: E402
from elr_ext.nn.counting import count_parameters  # noqa: E402

TITLES = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL base"}
DEFAULT_MATERIALIZE = {"sd15": "full", "sd21": "full", "sdxl": "per-layer"}
PAPER = {"sd21": {"whole_model_before": 1290e6, "whole_model_after": 790e6}}  # Table 1 (SD 2.1 only)

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
    (r"^add_embedding\.", "added embedding MLP (text_time)"),
    (r"^conv_(in|out)$", "conv_in / conv_out"),
]
STEM = "stem (conv_in, time embedding, conv_norm_out, conv_out)"
ADDED = "add_embedding (pooled text + time ids, text_time)"


def role(name: str) -> str:
    return next((label for pattern, label in ROLES if re.search(pattern, name)), "other")


def block_of(name: str, unet) -> str:
    """'down_blocks.1 (CrossAttnDownBlock2D)' for anything under down_blocks.1; SDXL's added
    embedding on its own; the rest of the top level is the stem."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        key = ".".join(parts[:2])
        return f"{key} ({type(unet.get_submodule(key)).__name__})"
    if parts[0] == "mid_block":
        return f"mid_block ({type(unet.mid_block).__name__})"
    if parts[0] == "add_embedding":
        return ADDED
    return STEM


def params_by_block(unet) -> dict:
    counts = defaultdict(int)
    for name, p in unet.named_parameters():
        counts[block_of(name, unet)] += p.numel()
    return counts


def meta_count(build) -> int:
    with torch.device("meta"):
        return count_parameters(build())


def millions(n) -> str:
    return f"{n / 1e6:,.1f}M"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pipeline_counts(arch) -> dict:
    """{'text_encoder': n[, 'text_encoder_2': n], 'vae': n}, built on the meta device. The second text
    encoder (SDXL's) carries the projection whose output is the pooled embedding."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    counts = {}
    for i, config in enumerate(arch.text_encoders):
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        key = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        counts[key] = meta_count(lambda: cls(CLIPTextConfig(**config)))
    counts["vae"] = meta_count(lambda: AutoencoderKL(**arch.vae))
    return counts


def layer_group(name: str) -> str:
    """The unit `name` is materialised and decomposed with: its transformer layer or resnet
    ('down_blocks.1.attentions.0.transformer_blocks.3'), else the layer itself."""
    m = re.match(r"^(.*?\.(?:transformer_blocks|resnets)\.\d+)\.", name)
    return m.group(1) if m else name


def decompose_per_layer(unet, svd_dtype) -> DecomposeReport:
    """elr_ext.decompose's default policy on a UNet built on the meta device, a few layers at a time:
    the nn.Linear / nn.Conv2d of one transformer layer or resnet (or one other layer) get CPU storage
    and their default initialisation, then decompose runs with include= those layers (the per-layer
    policy does not look at the other layers; the decomposition config accumulates over the calls).
    Returns one report over all layers, in the model's order."""
    names = [name for name, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and name]
    groups = defaultdict(list)
    for name in names:
        groups[layer_group(name)].append(name)
    before = count_parameters(unet)
    reports, report = {}, None
    for group, members in groups.items():
        for name in members:
            dense = unet.get_submodule(name)
            dense.to_empty(device="cpu")
            dense.reset_parameters()
        del dense  # decompose replaces them in the model: nothing else may keep their weights alive
        report = elr_ext.decompose(unet, include=members, svd_dtype=svd_dtype)
        wanted = set(members)
        reports.update((layer.name, layer) for layer in report.layers if layer.name in wanted)
    return DecomposeReport(before, report.params_after, report.policy, [reports[name] for name in names],
                           report.attention_processors, report.attention_skipped)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", required=True, choices=sorted(ARCHITECTURES))
    parser.add_argument("--svd-dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--materialize", choices=("full", "per-layer"), default=None,
                        help="full: build the dense UNet, then decompose; per-layer: one dense layer at a time "
                             "from the meta device (default: full for sd15/sd21, per-layer for sdxl)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own). On a shared machine 1 can be much faster: "
                             "MKL's SVD with 2 threads on 2 busy cores ran 2-9x slower than with 1, measured here")
    parser.add_argument("--out", default=None, help="output path without extension "
                                                    "(default benchmarks/results/decompose_<architecture>)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    arch = architecture(args.architecture)
    materialize = args.materialize or DEFAULT_MATERIALIZE[arch.name]
    out = args.out or os.path.join(harness.RESULTS_DIR, f"decompose_{arch.name}")
    svd_dtype = getattr(torch, args.svd_dtype)
    title = TITLES[arch.name]
    print(f"settings: architecture={arch.name} materialize={materialize} svd_dtype={args.svd_dtype} seed={args.seed} "
          f"policy=default (rank_ratio={DEFAULT_RANK_RATIO:.4g}) threads={torch.get_num_threads()}")

    from diffusers import UNet2DConditionModel

    pipeline = pipeline_counts(arch)
    encoders = {k: v for k, v in pipeline.items() if k.startswith("text_encoder")}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if materialize == "full":
        unet = UNet2DConditionModel(**arch.unet)
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**arch.unet)
    build_s = time.perf_counter() - t0
    blocks_before = params_by_block(unet)

    load_start = os.getloadavg()[0]  # other jobs on a shared machine stretch the wall time: record it
    t0, cpu0 = time.perf_counter(), time.process_time()
    if materialize == "full":
        report = elr_ext.decompose(unet, svd_dtype=svd_dtype)
    else:
        report = decompose_per_layer(unet, svd_dtype)
    decompose_s, decompose_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    load = (load_start, os.getloadavg()[0])
    blocks_after = params_by_block(unet)
    assert report.params_after == count_parameters(unet)

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

    unchanged = sum(pipeline.values())
    whole_before, whole_after = report.params_before + unchanged, report.params_after + unchanged
    header = [
        f"{title} UNet (random weights) decomposed by elr_ext.decompose, default policy "
        f"rank_ratio={DEFAULT_RANK_RATIO:.4g}, split us, min_saving 0, SVD in {args.svd_dtype} on the CPU",
        f"machine: {cpu_name()} ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {date}; build {build_s:.1f} s, decompose {decompose_s:.1f} s wall "
        f"({decompose_cpu_s:.1f} s CPU; 1-min load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, "
        f"on {os.cpu_count()} cores)",
    ]
    if materialize == "per-layer":
        header.append("built on the meta device, each layer materialised with its default initialisation only for "
                      "its own SVD (the decompose time includes that initialisation)")
    lines = header + ["", f"{'block':<56} {'before':>10} {'after':>10} {'kept':>7}"]
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
    lines.append(f"{'norms and other non-layer parameters':<40} {'':>7} {'':>7} {millions(other):>10} "
                 f"{millions(other):>10}")
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
    ]
    for i, (key, n) in enumerate(encoders.items()):
        lines.append(f"{'text encoder' + ('' if i == 0 else f' {i + 1}') + ':':<17}{n:,} (unchanged)")
    lines.append(f"VAE:             {pipeline['vae']:,} (unchanged)")
    whole = f"whole model:     {millions(whole_before)} -> {millions(whole_after)}"
    paper = PAPER.get(arch.name)
    if paper:
        whole += (f"   (paper, Table 1: {millions(paper['whole_model_before'])} -> "
                  f"{millions(paper['whole_model_after'])})")
    else:
        whole += f"   ({100 * whole_after / whole_before:.1f}% kept)"
    lines.append(whole)
    text = "\n".join(lines)
    print(text)

    result = {
        "architecture": arch.name,
        "settings": {"svd_dtype": args.svd_dtype, "seed": args.seed, "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "machine": platform.machine(), "cpu": cpu_name(),
                     "materialize": materialize, "date": date},
        "unet_config": arch.unet, "policy": report.policy,
        "seconds": {"build": build_s, "decompose": decompose_s, "decompose_cpu": decompose_cpu_s},
        "load_average": {"start": load[0], "end": load[1], "cores": os.cpu_count()},
        "unet": {"before": report.params_before, "after": report.params_after},
        **pipeline,
        "whole_model": {"before": whole_before, "after": whole_after},
        **({"paper": paper} if paper else {}),
        "blocks": {k: {"before": blocks_before[k], "after": blocks_after[k]} for k in blocks_before},
        "roles": {k: {**v, "ranks": sorted(v["ranks"])} for k, v in roles.items()},
        "layers": report.to_dict()["layers"],
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".txt", "w") as f:
        f.write(text + "\n\nper layer:\n" + str(report) + "\n")
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}.txt and {out}.json")
    return result


if __name__ == "__main__":
    main()
