"""Parameter counts of the Stage II local control adapter (elr_ext.nn.LocalControlAdapter): trainable
and total, adapter="kron" (ELR, Kronecker updates on a frozen copy) against adapter="full"
(Uni-ControlNet: the whole copy trains), on the tiny configuration and on the UNet shapes of Stable
Diffusion 1.5 and 2.1 (512 px) and SDXL (1024 px), each with a dense backbone and with one decomposed
at rank_ratio 1/3 (Stage I).

    python benchmarks/adapter_params.py        # prints the table, writes benchmarks/results/adapter_params.{txt,json}

Counts depend on shapes only, so the full-size UNets are built on the meta device (no memory, no init time); the
tiny configuration is built for real and checked to give the same counts on the meta device. The
decomposed full-size structure comes from the rank_ratio rule (rank = round(ratio * full rank), a
layer decomposed only where that saves parameters), because elr_ext.decompose's SVDs take minutes
per large layer on a CPU; the rule is checked against elr_ext.decompose on the tiny UNet.

Columns: adapter trainable / adapter total (the copy, Kronecker factors, FDN convs, feature
extractor, zero convs), the backbone UNet, and the whole Stage II model (backbone + adapter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (results folder)

import elr_ext  # noqa: E402
from elr_ext import tiny  # noqa: E402
from elr_ext.decompose import CONFIG_FORMAT, apply_decomposition_config  # noqa: E402
from elr_ext.nn import count_parameters  # noqa: E402
from elr_ext.nn.control_adapter import LocalControlAdapter  # noqa: E402
from elr_ext.architectures import SD15_UNET_CONFIG, SD21_UNET_CONFIG, SDXL_UNET_CONFIG  # noqa: E402

# The UNets at their training size: SD 1.5 and 2.1 at 512 px -> 64 latent, SDXL at 1024 px -> 128.
SD15_UNET = {**SD15_UNET_CONFIG, "sample_size": 64}
SD21_UNET = {**SD21_UNET_CONFIG, "sample_size": 64}
SDXL_UNET = {**SDXL_UNET_CONFIG, "sample_size": 128}
# Uni-ControlNet's condition types of the paper: sketch (1), edges (1), segmentation (3).
CONDITION_CHANNELS = [1, 1, 3]
RANK_RATIO = 1 / 3
# Uni-ControlNet's own feature (inject) channels for SD 1.5 (configs/uni_v15.yaml), for comparison
# with the default here (the UNet's block_out_channels).
UNI_CONTROLNET_FEATURE_CHANNELS = (192, 256, 384, 512)


def rank_ratio_config(unet: nn.Module, ratio: float) -> dict:
    """The decomposition elr_ext.decompose(unet, rank_ratio=ratio) makes (min_saving 0), from the
    shapes alone."""
    layers = {}
    for name, m in unet.named_modules():
        if type(m) not in (nn.Linear, nn.Conv2d) or (isinstance(m, nn.Conv2d) and m.groups != 1):
            continue
        out, inp = m.weight.shape[0], m.weight[0].numel()
        rank = max(1, math.floor(ratio * min(out, inp) + 0.5))
        if rank * (out + inp) < out * inp:
            layers[name] = {"kind": "linear" if isinstance(m, nn.Linear) else "conv2d", "rank": rank}
    return {"format": CONFIG_FORMAT, "layers": layers, "split": "us", "policy": {"rank_ratio": ratio}}


def build_unet(config: dict, decomposed: bool, device: str):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**config)
        if decomposed:
            apply_decomposition_config(unet, rank_ratio_config(unet, RANK_RATIO))
    return unet


def count(config: dict, latent_factor: int, decomposed: bool, mode: str, terms: int, rank: int, device: str,
          feature_channels=None, factor=None) -> dict:
    unet = build_unet(config, decomposed, device)
    with torch.device(device):
        adapter = LocalControlAdapter.from_unet(unet, condition_channels=CONDITION_CHANNELS, adapter=mode, terms=terms,
                                                rank=rank, factor=factor, latent_factor=latent_factor,
                                                feature_channels=feature_channels)
    counts = adapter.parameter_counts()
    backbone = count_parameters(unet)
    return {**counts, "backbone": backbone, "system_total": backbone + counts["total"]}


def check_rules_on_tiny(terms: int, rank: int) -> None:
    """The shortcuts used at full size give what the real thing gives on the tiny UNets (the default
    one and the SDXL-shaped one, whose added embedding and multi-layer transformers the rule must
    cover too)."""
    for config, latent_factor in ((tiny.TINY_UNET_CONFIG, 1), (tiny.TINY_SDXL_UNET_CONFIG, 2)):
        torch.manual_seed(0)
        from diffusers import UNet2DConditionModel

        real = UNet2DConditionModel(**config)
        expected = rank_ratio_config(real, RANK_RATIO)["layers"]
        elr_ext.decompose(real, rank_ratio=RANK_RATIO)
        if real._elr_decompose_config["layers"] != expected:
            raise AssertionError("rank_ratio_config disagrees with elr_ext.decompose on a tiny UNet")
        for decomposed in (False, True):
            for mode in ("kron", "full"):
                cpu = count(config, latent_factor, decomposed, mode, terms, rank, "cpu")
                meta = count(config, latent_factor, decomposed, mode, terms, rank, "meta")
                if cpu != meta:
                    raise AssertionError(f"meta-device counts differ from real ones: {cpu} vs {meta}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--terms", type=int, default=4, help="Kronecker terms n (eq. 9)")
    parser.add_argument("--rank", type=int, default=8, help="rank r of each u_i v_i^T (eq. 9)")
    parser.add_argument("--kron-factor", type=int, default=None,
                        help="the adapter's split (default: eq. 9, n = terms; -1: LoKr's balanced split, "
                             "written to adapter_params_lokr.*)")
    args = parser.parse_args(argv)
    split = "eq. 9 (n = terms)" if args.kron_factor is None else ("LoKr balanced" if args.kron_factor == -1
                                                                   else f"eq. 9 with n = {args.kron_factor}")
    print(f"split={split} terms={args.terms} rank={args.rank} conditions={CONDITION_CHANNELS} decomposed rank_ratio={RANK_RATIO:.4f}")
    check_rules_on_tiny(args.terms, args.rank)

    rows = []
    # (label, UNet config, image-to-latent factor, device, feature channels)
    setups = [("tiny", tiny.TINY_UNET_CONFIG, 1, "cpu", None), ("sd15", SD15_UNET, 8, "meta", None),
              ("sd21", SD21_UNET, 8, "meta", None),
              ("sd21, Uni-ControlNet feature channels", SD21_UNET, 8, "meta", UNI_CONTROLNET_FEATURE_CHANNELS),
              ("sdxl", SDXL_UNET, 8, "meta", None)]
    for label, config, latent_factor, device, feature_channels in setups:
        for decomposed in (False, True):
            for mode in ("full", "kron"):
                c = count(config, latent_factor, decomposed, mode, args.terms, args.rank, device, feature_channels,
                          args.kron_factor)
                rows.append({"config": label, "backbone_kind": "decomposed" if decomposed else "dense", "mode": mode,
                             **c})

    header = (f"{'config':<38} {'backbone':<10} {'mode':<5} {'trainable':>13} {'adapter total':>14} "
              f"{'backbone':>13} {'system total':>14} {'trainable vs full':>18}")
    lines = [header, "-" * len(header)]
    for row in rows:
        full = next(r for r in rows if r["config"] == row["config"] and r["backbone_kind"] == row["backbone_kind"]
                    and r["mode"] == "full")
        lines.append(f"{row['config']:<38} {row['backbone_kind']:<10} {row['mode']:<5} {row['trainable']:>13,} "
                     f"{row['total']:>14,} {row['backbone']:>13,} {row['system_total']:>14,} "
                     f"{row['trainable'] / full['trainable']:>17.3f}x")
    lines += ["", "kron trainable = Kronecker factors + FDN convs + feature extractor + zero convs; full trainable = "
              "the whole adapter (copy + the same new parts).",
              "breakdown (copy / kronecker_factors / fdn_convs / feature_extractor / zero_convs):"]
    for row in rows:
        lines.append(f"  {row['config']}, {row['backbone_kind']}, {row['mode']}: {row['copy']:,} / "
                     f"{row['kronecker_factors']:,} / {row['fdn_convs']:,} / {row['feature_extractor']:,} / "
                     f"{row['zero_convs']:,}")
    text = "\n".join(lines)
    print(text)

    result = {"split": split, "kron_factor": args.kron_factor, "terms": args.terms, "rank": args.rank, "condition_channels": CONDITION_CHANNELS,
              "rank_ratio": RANK_RATIO, "sd15_unet": SD15_UNET, "sd21_unet": SD21_UNET, "sdxl_unet": SDXL_UNET, "tiny_unet": tiny.TINY_UNET_CONFIG, "rows": rows}
    os.makedirs(harness.RESULTS_DIR, exist_ok=True)
    stem = "adapter_params" + ("" if args.kron_factor is None else
                               "_lokr" if args.kron_factor == -1 else f"_factor{args.kron_factor}")
    with open(os.path.join(harness.RESULTS_DIR, stem + ".txt"), "w") as f:
        f.write(f"split={split} terms={args.terms} rank={args.rank} conditions={CONDITION_CHANNELS} "
                f"decomposed rank_ratio={RANK_RATIO:.4f}\n" + text + "\n")
    with open(os.path.join(harness.RESULTS_DIR, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
